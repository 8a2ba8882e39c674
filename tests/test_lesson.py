"""The vanishing-gradients lesson at its smallest setting: it runs, and writes sane figures and numbers."""
import json
import math
import os
import subprocess
import sys

from rnn_triton.lessons.vanishing_gradients import CELLS, SETTINGS


def test_lesson_quick(tmp_path):
    # conftest.py turns on Triton's interpreter and strict mode for this process; the lesson trains,
    # so it runs in a child without them, where the CPU modules fall back to torch.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RNN_TRITON_STRICT")}
    proc = subprocess.run([sys.executable, "-m", "rnn_triton.lessons.vanishing_gradients", "--quick",
                           "--seed", "3", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    for name in ("accuracy.png", "gradients.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    lengths = [str(T) for T in SETTINGS["quick"].lengths]
    assert results["seed"] == 3 and set(results["path"]) == set(CELLS)
    for cell in CELLS:
        for T in lengths:
            assert 0 <= results["accuracy"][cell][T] <= 1
            for phase in ("init", "trained"):
                norms = results["grad_norm"][cell][T][phase]
                assert len(norms) == int(T) and all(math.isfinite(g) and g >= 0 for g in norms)
    # --quick's lengths are chosen for the lesson to show (at this seed among others)
    assert "The lesson showed" in proc.stdout, proc.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "Seed 3" in summary and ("torch fallback" in summary or "Triton kernel" in summary)
