"""The main job at its smallest preset: it checks against torch.nn, times, and writes its report."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_tiny_preset_writes_a_labelled_report(tmp_path):
    env = dict(os.environ, RNN_TRITON_STRICT="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--preset", "tiny",
                           "--cells", "LSTM", "GRU", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "REPORT.md").read_text()
    assert "CPU interpreter — timings not meaningful" in report
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["config"]["cell"], r["provider"], r["mode"]) for r in rows} == {
        (c, p, m) for c in ("LSTM", "GRU") for p in ("rnn_triton", "torch.nn")
        for m in ("forward", "forward+backward")}
    for r in rows:
        assert r["ms"] > 0 and r["p20"] <= r["ms"] <= r["p80"] and r["torch"] and r["triton"]
        assert r["rel_err_vs_fp64"] < 1e-4
