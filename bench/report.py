"""Turn benchmark results (results.jsonl from bench/run.py) into REPORT.md with matplotlib plots.

    python bench/report.py reports/h200/results.jsonl [--out reports/h200]

Uses the newest run in the file (its timestamp). Plots: the speedup of rnn_triton over torch.nn as
a heatmap over batch x hidden size per cell and mode; time against sequence length per provider;
forward against backward. Then a table of every measurement, what was skipped and why, and the
environment.
"""
import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COMPILE_TABLE = "compile_sm90.md"  # written beside the results by bench/run.py on a CPU
CPU_NOTE = ("**CPU interpreter — timings not meaningful.** The Triton kernels ran through Triton's "
            "interpreter on the CPU and torch.nn ran its CPU implementation: the correctness checks "
            "are real, the times say nothing about a GPU.")


def load_latest(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    newest = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == newest]


def _key(c):
    return (c["cell"], c["dtype"], c["B"], c["T"], c["I"], c["H"], c["layers"], c["bidirectional"])


def _speedups(rows):
    """{(config key, mode): torch.nn p50 / rnn_triton p50}."""
    times = {(_key(r["config"]), r["mode"], r["provider"]): r["p50"] for r in rows if r.get("mode")}
    return {(k, m): t / times[(k, m, "rnn_triton")] for (k, m, p), t in times.items()
            if p == "torch.nn" and (k, m, "rnn_triton") in times}


def _save(fig, out, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def plot_heatmaps(rows, out):
    """One heatmap per (cell, dtype, mode) over batch x hidden, at the most common T; file names."""
    speed = _speedups(rows)
    groups = defaultdict(dict)
    for (k, mode), s in speed.items():
        cell, dtype, B, T, I, H, layers, bidir = k
        groups[(cell, dtype, mode, T, I, layers, bidir)][(B, H)] = s
    files = []
    for (cell, dtype, mode, T, I, layers, bidir), grid in sorted(groups.items()):
        Bs, Hs = sorted({b for b, _ in grid}), sorted({h for _, h in grid})
        if len(Bs) * len(Hs) < 2:
            continue
        values = [[grid.get((b, h), float("nan")) for h in Hs] for b in Bs]
        fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(Hs), 1.6 + 0.6 * len(Bs)))
        im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=max(2.0, max(max(v) for v in values)))
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{v:.3g}x", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(Hs)), [str(h) for h in Hs])
        ax.set_yticks(range(len(Bs)), [str(b) for b in Bs])
        ax.set_xlabel("hidden size")
        ax.set_ylabel("batch")
        ax.set_title(f"{cell} {dtype} {mode}, T={T}\nspeedup over torch.nn (higher is better)", fontsize=9)
        fig.colorbar(im, ax=ax)
        name = f"speedup_{cell}_{dtype}_{mode.replace('+', '_')}_T{T}.png"
        files.append(_save(fig, out, name))
    return files


def plot_time_vs_seq(rows, out):
    """Per cell and mode, p50 against T for every provider, where a run swept T; file names."""
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not r.get("mode"):
            continue
        c = r["config"]
        series[(c["cell"], c["dtype"], r["mode"], c["B"], c["H"])][r["provider"]].append((c["T"], r["p50"]))
    files = []
    for (cell, dtype, mode, B, H), by_provider in sorted(series.items()):
        if max(len({t for t, _ in pts}) for pts in by_provider.values()) < 3:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for provider, pts in sorted(by_provider.items()):
            pts = sorted(pts)
            ax.plot([t for t, _ in pts], [ms for _, ms in pts], marker="o", label=provider)
        ax.set_xscale("log")
        ts = sorted({t for pts in by_provider.values() for t, _ in pts})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("time (ms, median)")
        ax.set_title(f"{cell} {dtype} {mode}, B={B}, H={H}", fontsize=9)
        ax.legend(fontsize=7)
        name = f"time_vs_T_{cell}_{dtype}_{mode.replace('+', '_')}_B{B}_H{H}.png"
        files.append(_save(fig, out, name))
    return files


def plot_forward_backward(rows, out):
    """Forward and backward times of rnn_triton and torch.nn per cell, at one configuration."""
    times = {(r["config"]["cell"], r["provider"], r["mode"]): r["p50"] for r in rows
             if r.get("mode") in ("forward", "backward") and r["provider"] in ("rnn_triton", "torch.nn")}
    cells = sorted({c for c, _, _ in times})
    if not cells:
        return []
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(cells), 3.4))
    bars = [("rnn_triton", "forward"), ("rnn_triton", "backward"), ("torch.nn", "forward"),
            ("torch.nn", "backward")]
    width = 0.2
    for i, (provider, mode) in enumerate(bars):
        ax.bar([j + i * width for j in range(len(cells))],
               [times.get((c, provider, mode), 0) for c in cells], width, label=f"{provider} {mode}")
    ax.set_xticks([j + 1.5 * width for j in range(len(cells))], cells)
    ax.set_ylabel("time (ms, median, first config of each cell)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return [_save(fig, out, "forward_vs_backward.png")]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def write_report(results_path, out):
    rows = load_latest(results_path)
    env = rows[0]
    on_cpu = env["gpu"] == "cpu-interpreter"
    speed = _speedups(rows)
    figures = plot_heatmaps(rows, out) + plot_time_vs_seq(rows, out) + plot_forward_backward(rows, out)
    lines = [f"# rnn_triton vs torch.nn — {env['gpu']}", ""]
    if on_cpu:
        lines += [CPU_NOTE, ""]
    lines += [f"Preset `{env['preset']}`, {env['timestamp']}; torch {env['torch']}, triton {env['triton']}, "
              f"Python {env['python']}, commit {env['commit']}.", "",
              "Speedup is torch.nn's median time divided by rnn_triton's (above 1: rnn_triton is faster). "
              "Every provider's output was checked against torch.nn before it was timed.", ""]
    if speed:
        values = sorted(speed.values())
        lines += [f"Across {len(values)} comparisons the speedup over torch.nn ranges from "
                  f"{values[0]:.2f}x to {values[-1]:.2f}x (median {values[len(values) // 2]:.2f}x).", ""]
    lines += [f"![{f}]({f})" for f in figures] + [""]
    lines += ["## Every measurement", "",
              "| cell | dtype | B | T | I | H | L | dir | mode | provider | p50 ms | p20-p80 ms | us/step "
              "| TFLOP/s | % peak | vs torch.nn | peak MB |",
              "|" + "---|" * 17]
    for r in rows:
        if not r.get("mode"):
            continue
        c = r["config"]
        s = speed.get((_key(c), r["mode"])) if r["provider"] == "rnn_triton" else None
        lines.append(
            f"| {c['cell']} | {c['dtype']} | {c['B']} | {c['T']} | {c['I']} | {c['H']} | {c['layers']} "
            f"| {'bi' if c['bidirectional'] else 'uni'} | {r['mode']} | {r['provider']} | {r['p50']:.3f} "
            f"| {r['p20']:.3f}-{r['p80']:.3f} | {r['us_per_step']:.2f} | {_fmt(r['tflops'], '.2f')} "
            f"| {_fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '.1f')} | {_fmt(s, '.2f')} "
            f"| {_fmt(r['peak_memory_mb'], '.0f')} |")
    skipped = sorted({(r["provider"], r["skipped"]) for r in rows if r.get("skipped")})
    if skipped:
        lines += ["", "## Not measured", "", "| provider | why |", "|---|---|"]
        lines += [f"| {p} | {why} |" for p, why in skipped]
    table = os.path.join(out, COMPILE_TABLE)
    if on_cpu and os.path.exists(table):
        lines += ["", "## The kernels compiled for sm_90 (H100/H200), from this machine", "",
                  "Registers, spills and shared memory of every configuration the dispatcher can choose "
                  "(`python -m rnn_triton.compile_check`):", "", open(table).read()]
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "REPORT.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--out", help="folder for REPORT.md and the plots (default: the results' folder)")
    args = parser.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    print(write_report(args.results, out))


if __name__ == "__main__":
    main()
