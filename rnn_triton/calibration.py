"""Hold the static model against published H100 times of other people's kernels (issue 21).

    python -m rnn_triton.calibration           # recompute the table from reports/static/peers/*.json
    python -m rnn_triton.calibration --check   # fail if the committed calibration.md/json differ
    python -m rnn_triton.calibration --import-peer NAME CUBIN META.json   # analyse a compiled peer

A *peer* is a kernel whose code is public and whose H100 time is published: FlashRNN's Triton fused
LSTM (NX-AI, pip ``flashrnn``), forward and backward. Its cubin is compiled outside this repository
(FlashRNN's code is not ours to commit; how it was compiled is in each peer file's ``build`` and in
calibration.md), then ``--import-peer`` runs this project's ``sass.analyze`` on it and stores that
analysis (not the SASS, not the cubin) under ``reports/static/peers/``, together with the per-loop
*serial chain* (below). From then on this module needs neither FlashRNN, nor a compiler: it feeds
each peer's analysis through the SAME step model as our own kernels (``static_cost.step_counts`` and
``static_cost.step_cycles``), multiplies by T and by the grid's waves, and writes
``reports/static/calibration.md`` and ``calibration.json``: estimate against published time, ratio.

The serial chain is a diagnostic this module adds (a term the model lacks, proposed in calibration.md):
the cycles one warp needs to issue one loop iteration when it is alone on its SM sub-partition (no other
warp to hide its latencies), read from the control bits of every instruction: the stall count the
compiler wrote (the cycles before the next instruction may issue: fixed-latency dependencies) and the
scoreboard waits (variable-latency producers), each costed with the latency of the producer's unit.

Everything here is an estimate from compiled code, except the published times, which are measurements
by FlashRNN's authors, read from their repository's figure.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from . import sass

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "reports" / "static"
PEERS_DIR = OUT_DIR / "peers"
LABEL = "estimate from compiled code, not a measurement"

#: H100 SXM: 132 SMs ([R3] of static_cost: the H100 whitepaper), 4 sub-partitions each.
H100_SMS = 132
SUBPARTITIONS = 4

#: The published times: FlashRNN's README figure ``head_dim--lstm.svg`` (NX-AI/flashrnn at d73fb52,
#: the figure of the initial commit 4dda86e, 2024-12-11): its bar labels, in ms, for B=16, T=1024,
#: bfloat16 (the benchmark's settings: ``flashrnn/speed_experiments/kernel_speed_benchmark.py``,
#: ``create_head_dimension_configs``: B = 16, T = 1024, dtype default "bfloat16"); H100 per the paper
#: (arXiv 2412.07752). Forward panel, bars in order DH=16,32,64,128,256,768: Triton fused 1.97, 1.44,
#: 1.99, 3.23, OOSM, OOSM; CUDA fused 3.56, 2.9, 3.1, 3.22, 3.62, 4.87. Forward+backward panel: Triton
#: fused 3.47, 4.1, 18.94, OOSM...; CUDA fused 8.22, 8.2, 8.64, 9.02, 11.3, 13.61.
PUBLISHED = {
    ("triton_fused", 64, 12): {"fwd_ms": 1.99, "fwd_bwd_ms": 18.94},
    ("cuda_fused", 64, 12): {"fwd_ms": 3.1, "fwd_bwd_ms": 8.64},
    ("cuda_fused", 768, 1): {"fwd_ms": 4.87, "fwd_bwd_ms": 13.61},
}
PUBLISHED_SOURCE = ("FlashRNN README figure head_dim--lstm.svg (github.com/NX-AI/flashrnn, commit d73fb52; "
                    "bar labels), B=16, T=1024, bf16, H100 (arXiv 2412.07752)")

#: The peer configurations: which analysed builds make a forward and a backward, and their launch.
#: FlashRNN triton_fused: grid (NH, cdiv(B, siz_B)) = (12, 1), 4 warps (lstm_fw.py: autotune configs with
#: ENABLE_AUTOTUNING False: siz_B 16, num_stages 1, num_warps 4; lstm_bw.py: backward_sequence(siz_B=16)
#: launches num_warps=4 with Triton's default num_stages 3).
CONFIGS = [
    {"id": "flashrnn-triton_fused-lstm-12x64", "backend": "triton_fused", "DH": 64, "NH": 12, "B": 16,
     "T": 1024, "fwd": "flashrnn_triton_lstm_fw", "bwd": "flashrnn_triton_lstm_bw", "programs": 12},
]
#: Configurations published but not estimated, and why.
NOT_ESTIMATED = {
    ("cuda_fused", 64, 12): "CUDA fused: launch parameters chosen on the GPU at first use (see calibration.md)",
    ("cuda_fused", 768, 1): "CUDA fused: launch parameters chosen on the GPU at first use (see calibration.md)",
}

# --- The serial chain (a proposed term; see the module docstring) ----------------------------------

#: Latency (lo, hi) in cycles of the result of a variable-latency producer a later instruction waits for
#: on a scoreboard, by unit. Fixed-latency dependencies are in the stall counts the compiler wrote.
#: - shared: LDS/LDSM, [R1] of static_cost (H100 SXM5 micro-benchmarks): shared-memory load latency 28.6.
#: - mio: MUFU, SHFL, conversions and the other short-scoreboard ("MIO") operations (Nsight Compute
#:   Kernel Profiling Guide, warp stall reasons: "short scoreboard": a dependency on an MIO operation such
#:   as special math or shared memory): lo 8, the cycles one warp instruction occupies its sub-partition's
#:   16/4 = 4-lane-per-clock SFU ([R5] of static_cost: 16 per SM and clock); hi the shared-memory latency.
#: - local: LDL (spilled registers): lo an L1 hit, hi an L2 hit ([R1]: 40.2 and 259.9 cycles): whether
#:   the spills stay in L1 depends on the L1 left beside the kernel's shared memory, which the code does
#:   not say.
#: - global loads are the model's round trips (costed there, 0 here); stores, barriers, fences: 0.
SERIAL_LATENCY = {"shared": (29, 29), "mio": (8, 29), "local": (40, 260), "global": (0, 0), "other": (0, 0)}
_MIO = ("MUFU", "SHFL", "F2F", "I2F", "F2I", "F2FP", "POPC", "FLO", "BREV", "MATCH", "REDUX", "S2R", "CS2R")


def _unit(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in ("LDS", "LDSM"):
        return "shared"
    if base == "LDL":
        return "local"
    if base in ("LDG", "LD", "ATOMG", "LDGSTS"):
        return "global"
    if base in _MIO:
        return "mio"
    return "other"


def control_rows(text: str) -> list:
    """(address, opcode, stall, write scoreboard, read scoreboard, wait mask) of every instruction of an
    nvdisasm ``-c -g -hex`` listing (the control bits as ``sass`` reads them, plus the stall count in
    bits 0-3 and the read scoreboard in bits 8-10)."""
    lines = text.splitlines()
    rows = []
    for i, raw in enumerate(lines):
        m = sass._INSTR.match(raw)
        if not m:
            continue
        hi = sass._HI.match(lines[i + 1]) if i + 1 < len(lines) else None
        ctrl = int(hi.group(1), 16) >> 41 if hi else 0
        rows.append((int(m.group(1), 16), m.group(3), ctrl & 0xf, (ctrl >> 5) & 7, (ctrl >> 8) & 7,
                     (ctrl >> 11) & 0x3f))
    return rows


def _simulate(body, latency) -> float:
    """Cycles of one iteration of ``body`` issued by one warp alone (the second of two, so that values
    carried from the previous iteration are waited for where they are)."""
    t, ready, ends = 0.0, {}, []
    for _ in (0, 1):
        for _addr, op, stall, wr, rd, wait in body:
            issue = max([t] + [ready.get(sb, 0.0) for sb in range(6) if wait >> sb & 1])
            if wr != 7:
                ready[wr] = max(ready.get(wr, 0.0), issue + latency[_unit(op)])
            if rd != 7:
                ready[rd] = max(ready.get(rd, 0.0), issue)
            t = issue + max(1, stall)
        ends.append(t)
    return ends[1] - ends[0]


def serial_chain(text: str) -> list:
    """Per loop of a listing (in ``sass.find_loops`` order, outside its inner loops): the sum of stall
    counts, the scoreboard waits by producer unit, and the simulated one-warp issue time (lo, hi)."""
    rows = control_rows(text)
    instrs, labels = sass.parse(text)
    loops = sass.find_loops(instrs, labels)
    out = []
    for lp in loops:
        inner = [loops[c] for c in lp.children]
        body = [r for r in rows if lp.start <= r[0] <= lp.end and not any(c.start <= r[0] <= c.end for c in inner)]
        waits, last = {}, {}
        for rep in (0, 1):
            for _addr, op, _stall, wr, rd, wait in body:
                for sb in range(6):
                    if wait >> sb & 1 and sb in last and rep:
                        waits[last[sb]] = waits.get(last[sb], 0) + 1
                for sb in (wr, rd):
                    if sb != 7:
                        last[sb] = _unit(op)
        lo = {k: v[0] for k, v in SERIAL_LATENCY.items()}
        hi = {k: v[1] for k, v in SERIAL_LATENCY.items()}
        out.append({"start": lp.start, "end": lp.end, "stall_cycles": sum(max(1, r[2]) for r in body),
                    "waits_by_unit": waits, "cycles": (_simulate(body, lo), _simulate(body, hi)),
                    "local_loads": sum(1 for r in body if r[1].startswith("LDL")),
                    "local_stores": sum(1 for r in body if r[1].startswith("STL")),
                    "async_copies": sum(1 for r in body if r[1].startswith("LDGSTS"))})
    return out


def import_peer(name: str, cubin_path: str, meta_path: str) -> Path:
    """Analyse a peer's cubin (compiled elsewhere) with ``sass.analyze`` and ``serial_chain``; write
    ``peers/<name>.json`` with the build description from ``meta_path`` (registers, spills, shared
    memory, layouts, compiler, options, source hash)."""
    cubin = Path(cubin_path).read_bytes()
    meta = {k: v for k, v in json.loads(Path(meta_path).read_text()).items() if k != "sass"}
    text = sass.disassemble(cubin)
    entry = {"name": name, "build": meta, "analysis_version": sass.VERSION, "sass": sass.analyze(cubin, {}),
             "serial": serial_chain(text)}
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    path = PEERS_DIR / f"{name}.json"
    path.write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
    return path


# --- The estimate ----------------------------------------------------------------------------------


def load_peer(name: str) -> dict:
    return json.loads((PEERS_DIR / f"{name}.json").read_text())


def _top_index(analysis) -> int:
    from . import static_cost
    top, _ = static_cost._loop_roles(analysis)
    return top


def kernel_estimate(peer: dict, programs: int, T: int) -> dict:
    """One peer kernel over T steps: the model's per-step cycles (static_cost.step_counts/step_cycles,
    unchanged), times T and the grid's waves; and, apart, the serial chain of the time loop."""
    from . import static_cost
    b = peer["build"]
    r = SimpleNamespace(kernel="peer", num_warps=b["num_warps"])  # not "coop": no grid barrier, no gather
    step = static_cost.step_counts(peer["sass"], 1, 1)
    cost = static_cost.step_cycles(r, step, programs, 2)
    # one program per SM while the grid fits (12 programs of 4 warps on 132 SMs): one wave
    waves = max(1, math.ceil(programs / H100_SMS))
    top = _top_index(peer["sass"])
    serial = peer["serial"][top]
    lo, hi = cost["cycles"]
    ms = lambda c: c * T * waves / (static_cost.CLOCK_GHZ * 1e6)  # noqa: E731
    lat = [sum(v[i] for v in cost["latency"].values()) for i in (0, 1)]
    # proposed: the compute phase is at least one warp's serial chain when a warp is alone on its
    # sub-partition (warps per sub-partition = warps per program / 4, one program per SM)
    alone = b["num_warps"] <= SUBPARTITIONS
    chain = serial["cycles"] if alone else (0.0, 0.0)
    prop = (max(cost["compute"][0], chain[0]) + lat[0], max(cost["compute"][1], chain[1]) + lat[1])
    return {"step_cycles": (lo, hi), "ms": (ms(lo), ms(hi)), "waves": waves, "programs": programs,
            "compute_cycles": cost["compute"], "terms": cost["terms"], "latency": cost["latency"],
            "instructions_per_warp": step["count"].get("total", 0), "mma": step["mma"],
            "round_trips": step["round_trips"], "serial": serial, "warp_alone": alone,
            "proposed_step_cycles": prop, "proposed_ms": (ms(prop[0]), ms(prop[1])),
            "registers": b["registers"], "spill_bytes": b["spill_bytes"], "shared_bytes": b["shared_bytes"]}


def _ratio(published, est):
    """published / estimate at the estimate's low and high end (>1: the model is too fast)."""
    return (published / est[0] if est[0] else None, published / est[1] if est[1] else None)


def calibrate() -> dict:
    rows = []
    for c in CONFIGS:
        pub = PUBLISHED[(c["backend"], c["DH"], c["NH"])]
        fwd = kernel_estimate(load_peer(c["fwd"]), c["programs"], c["T"])
        bwd = kernel_estimate(load_peer(c["bwd"]), c["programs"], c["T"])
        both = tuple(f + b for f, b in zip(fwd["ms"], bwd["ms"]))
        both_p = tuple(f + b for f, b in zip(fwd["proposed_ms"], bwd["proposed_ms"]))
        bwd_pub = round(pub["fwd_bwd_ms"] - pub["fwd_ms"], 2)
        rows.append({"id": c["id"], "backend": c["backend"], "DH": c["DH"], "NH": c["NH"], "B": c["B"],
                     "T": c["T"], "published": dict(pub, bwd_ms_derived=bwd_pub), "fwd": fwd, "bwd": bwd,
                     "compare": {
                         "fwd": {"published_ms": pub["fwd_ms"], "estimate_ms": fwd["ms"],
                                 "ratio": _ratio(pub["fwd_ms"], fwd["ms"]),
                                 "proposed_ms": fwd["proposed_ms"],
                                 "proposed_ratio": _ratio(pub["fwd_ms"], fwd["proposed_ms"])},
                         "bwd (derived)": {"published_ms": bwd_pub, "estimate_ms": bwd["ms"],
                                           "ratio": _ratio(bwd_pub, bwd["ms"]),
                                           "proposed_ms": bwd["proposed_ms"],
                                           "proposed_ratio": _ratio(bwd_pub, bwd["proposed_ms"])},
                         "fwd+bwd": {"published_ms": pub["fwd_bwd_ms"], "estimate_ms": both,
                                     "ratio": _ratio(pub["fwd_bwd_ms"], both), "proposed_ms": both_p,
                                     "proposed_ratio": _ratio(pub["fwd_bwd_ms"], both_p)}}})
    skipped = [{"backend": k[0], "DH": k[1], "NH": k[2], **PUBLISHED[k], "reason": v} for k, v in NOT_ESTIMATED.items()]
    return {"label": LABEL, "published_source": PUBLISHED_SOURCE, "rows": rows, "not_estimated": skipped,
            "serial_latency": SERIAL_LATENCY}


def _rng(v, fmt="{:.2f}"):
    return f"{fmt.format(v[0])}-{fmt.format(v[1])}"


def _within(ratio) -> str:
    """Whether the published time lies within 1.5x of the estimate's range."""
    lo_r, hi_r = ratio  # published / lo (largest), published / hi (smallest)
    if hi_r > 1.5:
        return f"no: published {hi_r:.1f}x above the high end"
    if lo_r < 1 / 1.5:
        return f"no: published {1 / lo_r:.1f}x below the low end"
    return "yes"


def table(result) -> str:
    lines = ["| configuration | pass | published ms | estimate ms (model as is) | published / estimate | within 1.5x "
             "| with the serial chain (proposed) ms | published / that |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        name = f"{row['backend']} LSTM {row['NH']}x{row['DH']}, B={row['B']}, T={row['T']}"
        for mode, c in row["compare"].items():
            lines.append(f"| {name} | {mode} | {c['published_ms']:.2f} | {_rng(c['estimate_ms'])} "
                         f"| {_rng(c['ratio'], '{:.1f}')}x | {_within(c['ratio'])} | {_rng(c['proposed_ms'])} "
                         f"| {_rng(c['proposed_ratio'], '{:.1f}')}x |")
    for s in result["not_estimated"]:
        lines.append(f"| {s['backend']} LSTM {s['NH']}x{s['DH']}, B=16, T=1024 | fwd / fwd+bwd "
                     f"| {s['fwd_ms']} / {s['fwd_bwd_ms']} | not estimated | | | {s['reason']} | |")
    return "\n".join(lines)


def breakdown(row) -> str:
    out = []
    for mode in ("fwd", "bwd"):
        k = row[mode]
        terms = ", ".join(f"{n} {lo:.0f}" + (f"-{hi:.0f}" if hi != lo else "") for n, (lo, hi) in k["terms"].items())
        lat = ", ".join(f"{n} {lo:.0f}-{hi:.0f}" for n, (lo, hi) in k["latency"].items())
        s = k["serial"]
        waits = ", ".join(f"{u} {n}" for u, n in sorted(s["waits_by_unit"].items()))
        mma = ", ".join(f"{n:g} {op}" for op, n in k["mma"].items())
        out.append(
            f"- **{mode}** ({k['programs']} programs, {k['waves']} wave; "
            f"{k['registers']} registers, {k['spill_bytes']} B spilled, {k['shared_bytes'] / 1024:.1f} KiB shared): "
            f"per warp and step {k['instructions_per_warp']:g} instructions ({mma}); model: compute "
            f"{_rng(k['compute_cycles'], '{:.0f}')} cycles (pipes: {terms}), latency {lat} ({k['round_trips']:g} round "
            f"trips) = {_rng(k['step_cycles'], '{:.0f}')} cycles/step. Serial chain of one warp: stall counts "
            f"{s['stall_cycles']} cycles, scoreboard waits by unit: {waits}; simulated {_rng(s['cycles'], '{:.0f}')} "
            f"cycles; {s['local_loads']} LDL + {s['local_stores']} STL (spills), {s['async_copies']} LDGSTS per "
            f"warp and step.")
    return "\n".join(out)


def markdown(result) -> str:
    rows = result["rows"]
    parts = ["# Calibration of the static model against published H100 times: " + LABEL, "",
             "Made by `python -m rnn_triton.calibration` from the committed peer analyses in `reports/static/peers/` "
             "(the output of this project's `sass.analyze` and `calibration.serial_chain` on the peers' cubins; "
             "the cubins and SASS are not committed, so CI needs neither FlashRNN nor a compiler). Published: "
             + result["published_source"] + ". The estimate is the unchanged `static_cost` step model "
             "(`step_counts`, `step_cycles`) x T x waves; its range is low..high. Ratio = published / estimate "
             "(above 1: the model is too fast), given at the estimate's low and high end. \"bwd (derived)\" is "
             "published fwd+bwd minus published fwd.", "",
             "## Table", "", table(result), "",
             "## Breakdown (cycles at 1.98 GHz)", ""]
    for row in rows:
        parts += [f"### {row['id']}", "", breakdown(row), ""]
    parts.append(NOTES)
    return "\n".join(parts)


#: The hand-written findings appended to calibration.md (committed beside it).
NOTES_FILE = OUT_DIR / "calibration_notes.md"
NOTES = NOTES_FILE.read_text() if NOTES_FILE.exists() else ""


def write(result, out=OUT_DIR):
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=list) + "\n")
    (out / "calibration.md").write_text(markdown(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed table differs")
    parser.add_argument("--import-peer", nargs=3, metavar=("NAME", "CUBIN", "META"))
    args = parser.parse_args(argv)
    if args.import_peer:
        print(import_peer(*args.import_peer))
        return 0
    result = calibrate()
    print(table(result))
    if args.check:
        want = json.loads(json.dumps(result, sort_keys=True, default=list))
        have = json.loads((OUT_DIR / "calibration.json").read_text())
        md_same = (OUT_DIR / "calibration.md").read_text() == markdown(result)
        if want != have or not md_same:
            print("calibration.json / calibration.md differ from what the peers' analyses give: "
                  "run python -m rnn_triton.calibration")
            return 1
        return 0
    write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
