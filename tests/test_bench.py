"""The main job at its smallest preset, and the report generator on a committed sample of results."""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data", "bench_sample_cpu.jsonl")  # bench/run.py's "cpu" preset
sys.path.insert(0, os.path.join(ROOT, "bench"))

import report  # noqa: E402
from helpers import DEVICE  # noqa: E402

SCHEMA = {"gpu", "provider", "mode", "config", "p20", "p50", "p80", "timestamp", "commit", "torch", "triton",
          "us_per_step", "tflops", "peak_fraction", "peak_memory_mb", "rel_err_vs_torch"}


def test_main_job_tiny_preset(tmp_path):
    env = dict(os.environ, RNN_TRITON_STRICT="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--preset", "tiny",
                           "--cells", "LSTM", "--seq", "4", "--no-compile-table", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/1] LSTM" in proc.stdout  # the progress display
    assert (report.CPU_NOTE in (tmp_path / "REPORT.md").read_text()) == (DEVICE.type == "cpu")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r.get("mode")]
    assert {(r["provider"], r["mode"]) for r in measured} == {
        (p, m) for p in ("rnn_triton", "torch.nn", "torch-loop") for m in ("forward", "backward", "forward+backward")}
    for r in measured:
        assert SCHEMA <= set(r) and 0 < r["p20"] <= r["p50"] <= r["p80"]
        assert r["rel_err_vs_torch"] < (1e-4 if DEVICE.type == "cpu" else 5e-3)  # TF32 on a GPU


def test_report_generator_on_the_committed_sample(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "results.jsonl")
    path = report.write_report(str(tmp_path / "results.jsonl"), str(tmp_path))
    text = open(path).read()
    rows = report.load_latest(SAMPLE)
    measured = [r for r in rows if r.get("mode")]
    assert text.count("\n| ") - 1 == len(measured)  # the table: a header, then one row per measurement
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    cells = {r["config"]["cell"] for r in measured}
    for cell in cells:
        assert any(p.startswith(f"speedup_{cell}_") for p in pngs)
        assert any(p.startswith(f"time_vs_T_{cell}_") for p in pngs)
    assert "forward_vs_backward.png" in pngs
    for png in pngs:
        assert f"]({png})" in text and (tmp_path / png).stat().st_size > 1000


def test_flops_count():
    import run
    # LSTM: 2 * T * B * 4H * (I + H) forward
    assert run.flops("LSTM", B=2, T=3, I=5, H=7, layers=1, directions=1, mode="forward") == 2 * 3 * 2 * 28 * 12
    assert run.flops("GRU", 1, 1, 4, 4, 1, 1, "forward+backward") == 3 * 2 * 12 * 8
    # a second layer reads the first's output (2H when bidirectional)
    assert run.flops("RNN_TANH", 1, 1, 3, 4, 2, 2, "forward") == 2 * (2 * 4 * (3 + 4) + 2 * 4 * (8 + 4))
