"""Turn benchmark results (results.jsonl from bench/run.py) into REPORT.md with matplotlib plots.

    python bench/report.py reports/h200/results.jsonl [--out reports/h200]

Uses the newest run in the file (its timestamp). Sections: the accuracy against torch.nn in float64 (a
matrix per cell, dtype and mode, and its table); on a GPU, the speedup of rnn_triton over torch.nn as
heatmaps over batch x hidden size; time against sequence length; forward against backward; every
measurement, with its columns defined; what was not measured and why; links to the committed sm_90
compile and static cost tables. Every figure made on a CPU says so.
"""
import argparse
import json
import math
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: The committed sm_90 compile table and static per-step cost table (made by other commands),
#: linked from a report as the reports do, from beside it (reports/<gpu>/REPORT.md).
STATIC_README = "reports/static/README.md"
CPU_LABEL = "CPU, Triton interpreter: timings are not GPU performance"
CPU_NOTE = ("**CPU, Triton interpreter: timings are not GPU performance.** The Triton kernels ran through "
            "Triton's interpreter on the CPU and torch.nn ran its CPU implementation: the accuracy below is "
            "real, the times say nothing about a GPU (no speedups are drawn from them).")


def load_latest(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    newest = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == newest]


def _key(c):
    return (c["cell"], c["dtype"], c["B"], c["T"], c["I"], c["H"], c["layers"], c["bidirectional"])


def _size(c):
    return (f"B={c['B']} T={c['T']} I={c['I']} H={c['H']}"
            + (f" L={c['layers']}" if c["layers"] > 1 else "") + (" bi" if c["bidirectional"] else ""))


def _speedups(rows):
    """{(config key, mode): torch.nn p50 / rnn_triton p50}."""
    times = {(_key(r["config"]), r["mode"], r["provider"]): r["p50"] for r in rows if r.get("mode")}
    return {(k, m): t / times[(k, m, "rnn_triton")] for (k, m, p), t in times.items()
            if p == "torch.nn" and (k, m, "rnn_triton") in times}


def _finish(fig, axes, title, on_cpu, timings, out, name):
    """Title the figure (on a CPU: saying so; over timings: a watermark on every panel too), save it;
    its file name."""
    if on_cpu:
        title += "\n" + (CPU_LABEL if timings else "CPU, Triton interpreter")
        for ax in axes if timings else []:
            ax.text(0.5, 0.5, "CPU interpreter\nnot GPU performance", transform=ax.transAxes, ha="center",
                    va="center", fontsize=14, color="gray", alpha=0.25, rotation=20)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110, metadata={"Title": title})  # readable by tests
    plt.close(fig)
    return name


def plot_accuracy(acc, on_cpu, out):
    """The correctness matrix: the largest relative error against torch.nn in float64 per cell and dtype,
    one panel per mode (forward outputs, backward gradients), over all sizes checked; file names."""
    done = [r for r in acc if r.get("forward") is not None]
    if not done:
        return []
    cells = sorted({r["config"]["cell"] for r in done})
    dtypes = sorted({r["config"]["dtype"] for r in done})
    fig, axes = plt.subplots(1, 2, figsize=(3 + 2.2 * len(dtypes), 1.8 + 0.5 * len(cells)), squeeze=False)
    for ax, mode in zip(axes[0], ("forward", "backward")):
        worst = {}
        for r in done:
            key = (r["config"]["cell"], r["config"]["dtype"])
            worst[key] = max(worst.get(key, 0.0), r[mode])
        values = [[math.log10(max(worst[(c, d)], 1e-16)) if (c, d) in worst else float("nan") for d in dtypes]
                  for c in cells]
        im = ax.imshow(values, cmap="viridis", vmin=-8, vmax=-1)
        for i, c in enumerate(cells):
            for j, d in enumerate(dtypes):
                text = f"{worst[(c, d)]:.1e}" if (c, d) in worst else "-"
                dark = values[i][j] < -4  # the colour map's dark end (NaN: not dark)
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_yticks(range(len(cells)), cells)
        ax.set_title(f"{mode} ({'outputs' if mode == 'forward' else 'gradients'})", fontsize=9)
        fig.colorbar(im, ax=ax, label="log10 max rel. error")
    return [_finish(fig, axes[0], "rnn_triton: max relative error against torch.nn in float64", on_cpu, False,
                    out, "accuracy.png")]


def plot_heatmaps(rows, out):
    """One heatmap per (cell, dtype, mode) over batch x hidden, at the most common T; file names. GPU
    timings only: the caller draws none from the interpreter's."""
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
        fig.colorbar(im, ax=ax)
        name = f"speedup_{cell}_{dtype}_{mode.replace('+', '_')}_T{T}.png"
        files.append(_finish(fig, [ax], f"{cell} {dtype} {mode}, T={T}, I={I}: speedup over torch.nn "
                                        f"(higher is better)", False, True, out, name))
    return files


def plot_time_vs_seq(rows, on_cpu, out):
    """Per cell, dtype, B and H where a run swept T: p50 against T for every provider, a panel per mode;
    file names."""
    series = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r.get("mode"):
            c = r["config"]
            series[(c["cell"], c["dtype"], c["B"], c["H"])][r["mode"]][r["provider"]].append((c["T"], r["p50"]))
    files = []
    for (cell, dtype, B, H), by_mode in sorted(series.items()):
        by_mode = {m: p for m, p in by_mode.items() if max(len({t for t, _ in pts}) for pts in p.values()) >= 3}
        if not by_mode:
            continue
        fig, axes = plt.subplots(1, len(by_mode), figsize=(0.5 + 4 * len(by_mode), 3.6), squeeze=False)
        for ax, (mode, by_provider) in zip(axes[0], by_mode.items()):
            for provider, pts in sorted(by_provider.items()):
                pts = sorted(pts)
                ax.plot([t for t, _ in pts], [ms for _, ms in pts], marker="o", label=provider)
            ax.set_xscale("log")
            ts = sorted({t for pts in by_provider.values() for t, _ in pts})
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set(xlabel="sequence length T", ylabel="time (ms, median)", title=mode)
            ax.legend(fontsize=7)
        name = f"time_vs_T_{cell}_{dtype}_B{B}_H{H}.png"
        files.append(_finish(fig, axes[0], f"{cell} {dtype}, B={B}, H={H}: time against T", on_cpu, True, out,
                             name))
    return files


def plot_forward_backward(rows, on_cpu, out):
    """Forward and backward times of rnn_triton and torch.nn per cell, at the configuration (all but the
    cell) that most cells were timed at in both modes; file names."""
    times = {(_key(r["config"]), r["provider"], r["mode"]): r["p50"] for r in rows
             if r.get("mode") in ("forward", "backward") and r["provider"] in ("rnn_triton", "torch.nn")}
    full = defaultdict(list)  # the config less its cell -> the cells with all four times
    for key, provider, mode in times:
        if all((key, p, m) in times for p in ("rnn_triton", "torch.nn") for m in ("forward", "backward")):
            if key[0] not in full[key[1:]]:
                full[key[1:]].append(key[0])
    if not full:
        return []
    config = max(full, key=lambda k: len(full[k]))  # first of the largest: dicts keep the run's order
    cells = sorted(full[config])
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 1.6 * len(cells)), 3.6))
    bars = [("rnn_triton", "forward"), ("rnn_triton", "backward"), ("torch.nn", "forward"),
            ("torch.nn", "backward")]
    width = 0.2
    for i, (provider, mode) in enumerate(bars):
        ax.bar([j + i * width for j in range(len(cells))],
               [times[((c,) + config, provider, mode)] for c in cells], width, label=f"{provider} {mode}")
    ax.set_xticks([j + 1.5 * width for j in range(len(cells))], cells)
    ax.set_ylabel("time (ms, median)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    dtype, B, T, I, H, layers, bidir = config
    size = _size(dict(B=B, T=T, I=I, H=H, layers=layers, bidirectional=bidir))
    return [_finish(fig, [ax], f"forward vs backward, {dtype} {size}", on_cpu, True, out,
                    "forward_vs_backward.png")]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


#: The table of every measurement: (header, definition, value of a row given its speedup, GPU only).
COLUMNS = [
    ("cell", "LSTM, GRU, RNN_TANH or RNN_RELU", lambda r, s: r["config"]["cell"], False),
    ("dtype", "the parameters' and input's dtype", lambda r, s: r["config"]["dtype"], False),
    ("size", "batch B, sequence length T, input size I, hidden size H (layers L, bidirectional: bi)",
     lambda r, s: _size(r["config"]), False),
    ("mode", "forward (no autograd graph), backward (of a kept graph) or forward+backward",
     lambda r, s: r["mode"], False),
    ("provider", "rnn_triton, torch.nn (cuDNN on a GPU), torch-loop (a Python loop over nn.*Cell), ...",
     lambda r, s: r["provider"], False),
    ("p50 ms", "median time of one call", lambda r, s: f"{r['p50']:.3f}", False),
    ("p20-p80 ms", "20th to 80th percentile of the samples", lambda r, s: f"{r['p20']:.3f}-{r['p80']:.3f}",
     False),
    ("us/step", "p50 divided by T, in microseconds", lambda r, s: f"{r['us_per_step']:.2f}", False),
    ("rel err", "||output - torch.nn's|| / ||torch.nn's||, same dtype, checked before timing",
     lambda r, s: _fmt(r.get("rel_err_vs_torch"), ".1e"), False),
    ("TFLOP/s", "matrix FLOPs (2·T·B·gates·H·(I+H) per layer and direction forward, x2 backward) per second",
     lambda r, s: _fmt(r["tflops"], ".2f"), True),
    ("% peak", "TFLOP/s as a share of the GPU's dense peak in this dtype",
     lambda r, s: _fmt(r["peak_fraction"] and 100 * r["peak_fraction"], ".1f"), True),
    ("vs torch.nn", "speedup: torch.nn's p50 / rnn_triton's (above 1: rnn_triton is faster)",
     lambda r, s: _fmt(s, ".2f"), True),
    ("peak MB", "peak GPU memory allocated during the measurement", lambda r, s: _fmt(r["peak_memory_mb"], ".0f"),
     True),
]


def _measurement_table(measured, speed, on_cpu):
    """Markdown lines: the column definitions, then the table, without columns empty in every row."""
    cells = [[fn(r, speed.get((_key(r["config"]), r["mode"])) if r["provider"] == "rnn_triton" else None)
              for _, _, fn, _ in COLUMNS] for r in measured]
    keep = [j for j, (_, _, _, gpu_only) in enumerate(COLUMNS)
            if not (on_cpu and gpu_only) and any(row[j] != "-" for row in cells)]
    lines = ["Columns:", ""] + [f"- **{COLUMNS[j][0]}**: {COLUMNS[j][1]}" for j in keep] + [""]
    lines += ["| " + " | ".join(COLUMNS[j][0] for j in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(row[j] for j in keep) + " |" for row in cells]
    return lines


def _accuracy_section(acc, figures):
    lines = ["## Accuracy against torch.nn in float64", "",
             "Each cell and dtype on small random inputs (with initial states) and random output gradients: "
             "rnn_triton in that dtype against torch.nn in float64 (the same weights and inputs), and torch.nn "
             "in that dtype against the same reference, for scale.", ""]
    for f in figures:
        lines += [f"![{f}]({f})", "",
                  "*The largest relative error ||ours - torch.nn float64|| / ||torch.nn float64|| of any "
                  "forward output (y, h_n, c_n; left) and of any gradient (input, initial states, every "
                  "parameter; right), over the sizes in the table below.*", ""]
    lines += ["Columns: **forward** / **backward**: rnn_triton's largest relative error over the outputs / "
              "over the gradients; **torch.nn forward** / **torch.nn backward**: the same for torch.nn in "
              "that dtype (\"-\": torch.nn has no implementation of it here); **bound**: the largest error "
              "accepted, forward / backward (the tests' tolerances: the dtype's, and 0.25 for ReLU gradients "
              "in half precision, where a pre-activation within rounding of 0 flips its derivative); "
              "**within**: the error is within the bound or within twice torch.nn's own (the tests' rule); "
              "**kernel**: the kernel that ran.", "",
              "| cell | dtype | size | kernel | forward | backward | torch.nn forward | torch.nn backward "
              "| bound | within |", "|" + "---|" * 10]
    for r in acc:
        c = r["config"]
        if r.get("skipped"):
            lines.append(f"| {c['cell']} | {c['dtype']} | {_size(c)} | not run: {r['skipped']} "
                         + "| - " * 6 + "|")
            continue
        lines.append(f"| {c['cell']} | {c['dtype']} | {_size(c)} | {r['variant']} | {r['forward']:.1e} "
                     f"| {r['backward']:.1e} | {_fmt(r['torch_forward'], '.1e')} | "
                     f"{_fmt(r['torch_backward'], '.1e')} | {' / '.join(f'{b:.2g}' for b in r['bound'])} | "
                     f"{'yes' if r['within_bound'] else '**no**'} |")
    return lines + [""]


def _figures(files, caption):
    lines = []
    for f in files:
        lines += [f"![{f}]({f})", "", f"*{caption(f)}*", ""]
    return lines


def write_report(results_path, out):
    rows = load_latest(results_path)
    env = rows[0]
    on_cpu = env["gpu"] == "cpu-interpreter"
    acc = [r for r in rows if r.get("kind") == "accuracy"]
    measured = [r for r in rows if r.get("mode") and r.get("kind") != "accuracy"]
    speed = {} if on_cpu else _speedups(measured)
    lines = [f"# rnn_triton vs torch.nn — {env['gpu']}", ""]
    if on_cpu:
        lines += [CPU_NOTE, ""]
    lines += [f"Preset `{env['preset']}`, {env['timestamp']}; torch {env['torch']}, triton {env['triton']}, "
              f"Python {env['python']}, commit {env['commit']}.", ""]
    if acc:
        lines += _accuracy_section(acc, plot_accuracy(acc, on_cpu, out))
    if speed:
        values = sorted(speed.values())
        lines += ["## Speedup over torch.nn", "",
                  f"Across {len(values)} comparisons the speedup over torch.nn ranges from {values[0]:.2f}x to "
                  f"{values[-1]:.2f}x (median {values[len(values) // 2]:.2f}x).", ""]
        lines += _figures(plot_heatmaps(measured, out),
                          lambda f: "torch.nn's median time divided by rnn_triton's, per batch size (rows) and "
                                    "hidden size (columns); above 1 (green): rnn_triton is faster; -: not "
                                    "measured (a size the kernels do not take).")
    elif on_cpu:
        lines += ["No speedup over torch.nn is shown: the interpreter's timings are not GPU performance.", ""]
    series = plot_time_vs_seq(measured, on_cpu, out)
    if series:
        lines += ["## Time against sequence length", ""]
        lines += _figures(series, lambda f: "Median time of one call per provider against T (log-log); "
                                            "the same weights and inputs for every provider."
                                            + (" CPU interpreter: not GPU performance." if on_cpu else ""))
    fwd_bwd = plot_forward_backward(measured, on_cpu, out)
    if fwd_bwd:
        lines += ["## Forward against backward", ""]
        lines += _figures(fwd_bwd, lambda f: "Median forward and backward (of a kept graph) times of "
                                             "rnn_triton and torch.nn per cell, at the configuration in "
                                             "the title." + (" CPU interpreter: not GPU performance."
                                                             if on_cpu else ""))
    if measured:
        lines += ["## Every measurement", "",
                  "Every provider's output was checked against torch.nn (same dtype) before it was timed.", ""]
        lines += _measurement_table(measured, speed, on_cpu)
    skipped = sorted({(r["provider"], r["skipped"]) for r in rows if r.get("skipped")})
    if skipped:
        lines += ["", "## Not measured", "", "| provider | why |", "|---|---|"]
        lines += [f"| {p} | {why} |" for p, why in skipped]
    lines += [""] + _static_section(out, [r for r in measured if r["provider"] == "rnn_triton"])
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines))
    return os.path.join(out, "REPORT.md")


def _static_section(out, measured):
    """The committed compile and static cost tables: linked, summarised, the static plot shown, and on a
    GPU the static estimate beside each measured layer."""
    from rnn_triton import static_cost
    compile_md = static_cost.OUT_DIR / "COMPILE.md"
    fit = re.search(r"\d+ of \d+ dispatcher configurations fit on sm_90", compile_md.read_text()) \
        if compile_md.exists() else None
    lines = ["## The kernels compiled for sm_90", "",
             f"Not made by this job: [{STATIC_README}](../static/README.md) indexes the committed sm_90 (H100/H200) "
             "compile table (registers, spills and shared memory of every configuration the dispatcher can choose, "
             "and of the sizes just past each limit)" + (f": {fit.group(0)}" if fit else "") + ", and the static "
             "per-step cost table below. With the committed build results each command takes under a minute "
             "(`python -m rnn_triton.compile_check --probe`, `python -m rnn_triton.static_cost`); compiling every "
             "build from nothing takes about an hour on 2 cores.", ""]
    return lines + static_cost.report_section(out, measured)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results")
    parser.add_argument("--out", help="folder for REPORT.md and the plots (default: the results' folder)")
    args = parser.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    print(write_report(args.results, out))


if __name__ == "__main__":
    main()
