"""The main job at its smallest preset, and the report generator on a committed sample of results."""
import json
import os
import shutil
import subprocess
import sys

from PIL import Image

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
                           "--cells", "LSTM", "--seq", "4", "--dtypes", "float32", "--budget-ms", "10",
                           "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for progress in ("phase 1/3: accuracy", "[2/2] LSTM float32", "phase 2/3: timings", "[1/1] LSTM",
                     "phase 3/3: the report"):
        assert progress in proc.stdout
    assert (report.CPU_NOTE in (tmp_path / "REPORT.md").read_text()) == (DEVICE.type == "cpu")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    accuracy = [r for r in rows if r.get("kind") == "accuracy"]
    assert len(accuracy) == 2 and all(r["within_bound"] and r["forward"] < 1e-4 for r in accuracy)
    measured = [r for r in rows if r.get("mode")]
    assert {(r["provider"], r["mode"]) for r in measured} == {
        (p, m) for p in ("rnn_triton", "torch.nn", "torch-loop") for m in ("forward", "backward", "forward+backward")}
    for r in measured:
        assert SCHEMA <= set(r) and 0 < r["p20"] <= r["p50"] <= r["p80"]
        assert r["rel_err_vs_torch"] < (1e-4 if DEVICE.type == "cpu" else 5e-3)  # TF32 on a GPU


def _report(rows, out):
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = open(report.write_report(str(out / "results.jsonl"), str(out))).read()
    titles = {p.name: Image.open(p).text["Title"] for p in out.glob("*.png")}
    for png in titles:  # every figure in the report, a caption under it
        assert f"]({png})\n\n*" in text and (out / png).stat().st_size > 1000
    return text, titles


def test_report_on_the_committed_cpu_sample(tmp_path):
    rows = report.load_latest(SAMPLE)
    text, titles = _report(rows, tmp_path)
    accuracy = [r for r in rows if r.get("kind") == "accuracy"]
    measured = [r for r in rows if r.get("mode")]
    cells = {r["config"]["cell"] for r in measured}
    # no speedups from interpreter timings; every figure labelled as the CPU's
    assert not any(name.startswith("speedup_") for name in titles)
    assert "accuracy.png" in titles and "forward_vs_backward.png" in titles
    assert {f"time_vs_T_{cell}" for cell in cells} <= {name.rsplit("_", 3)[0] for name in titles}
    for name, title in titles.items():
        assert "CPU, Triton interpreter" in title, name
        if name != "accuracy.png":
            assert report.CPU_LABEL in title, name
    assert "forward vs backward, float32 B=" in titles["forward_vs_backward.png"]
    # the accuracy table: one row per check; the measurement table: one per measurement, no empty columns
    table = text.split("## Every measurement")[1].split("\n## ")[0]
    assert table.count("\n| ") - 1 == len(measured)
    header = table[table.index("\n| "):].splitlines()[1]
    for gpu_only in ("TFLOP/s", "% peak", "vs torch.nn", "peak MB"):
        assert gpu_only not in header
    assert text.split("## Accuracy")[1].split("\n## ")[0].count("\n| ") - 1 == len(accuracy)
    assert "[reports/static/README.md](../static/README.md)" in text


def test_report_on_gpu_rows(tmp_path):
    """The same sample as if a GPU had made it (batch 4 and 16): speedup heatmaps, no CPU label."""
    rows = []
    for r in report.load_latest(SAMPLE):
        rows.append(dict(r, gpu="NVIDIA H200"))
        if r.get("mode"):
            rows.append(dict(r, gpu="NVIDIA H200", config=dict(r["config"], B=16)))
    text, titles = _report(rows, tmp_path)
    assert any(name.startswith("speedup_") for name in titles)
    assert not any("CPU" in title for title in titles.values())
    assert "## Speedup over torch.nn" in text and "| TFLOP/s |" in text


def test_flops_count():
    import run
    # LSTM: 2 * T * B * 4H * (I + H) forward
    assert run.flops("LSTM", B=2, T=3, I=5, H=7, layers=1, directions=1, mode="forward") == 2 * 3 * 2 * 28 * 12
    assert run.flops("GRU", 1, 1, 4, 4, 1, 1, "forward+backward") == 3 * 2 * 12 * 8
    # a second layer reads the first's output (2H when bidirectional)
    assert run.flops("RNN_TANH", 1, 1, 3, 4, 2, 2, "forward") == 2 * (2 * 4 * (3 + 4) + 2 * 4 * (8 + 4))


def test_heads_bench_tiny_preset(tmp_path):
    """bench/heads.py: ours measured and within float64's tolerance; what cannot run says why."""
    env = dict(os.environ, RNN_TRITON_STRICT="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "heads.py"), "--preset", "tiny",
                           "--budget-ms", "5", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "heads.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r["provider"] == "rnn_triton"]
    assert {(r["config"]["function"], r["mode"]) for r in ours} == {
        (f, m) for f in ("lstm", "slstm") for m in ("forward", "forward+backward")}
    assert all(0 < r["p20"] <= r["p50"] <= r["p80"] and r["rel_err_vs_fp64"] < 1e-4 for r in ours)
    assert all(r["skipped"] for r in rows if r["provider"] != "rnn_triton" and "mode" not in r)
    assert "| lstm | 2 x 16 |" in (tmp_path / "HEADS.md").read_text()
