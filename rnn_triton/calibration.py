"""Hold the static model against published H100 times of other people's kernels (issue 21).

    python -m rnn_triton.calibration           # recompute the table from reports/static/peers/*.json
    python -m rnn_triton.calibration --check   # fail if the committed calibration.md/json differ
    python -m rnn_triton.calibration --import-peer NAME CUBIN META.json   # analyse a compiled peer
    python -m rnn_triton.calibration --import-own build/sm90   # our anchor builds, from compile_check's cubins

A *peer* is a kernel whose code is public and whose H100 time is published: FlashRNN's Triton fused
LSTM (NX-AI, pip ``flashrnn``), forward and backward, at the four head sizes its README figure times,
and its CUDA fused LSTM forward and backward at 12x64 and 1x768 (at the parameters FlashRNN's own
solver gives for an H100; their loop nests named in ``CONFIGS``' plans; the backward's kernels read
one at a time, without the code those parameters never run: ``analyze_peer``). Its cubin is compiled
outside this repository (FlashRNN's code is not ours to commit, nor a script that builds it; how each
was compiled is in the peer file's ``build`` and in calibration.md), then ``--import-peer`` runs this project's
``sass.analyze`` on it and stores that
analysis (not the SASS, not the cubin) under ``reports/static/peers/``, together with the per-loop
*serial chain* (below). From then on this module needs neither FlashRNN, nor a compiler: it feeds
each peer's analysis through the SAME step model as our own kernels (``static_cost.step_counts`` and
``static_cost.step_cycles``), multiplies by T and by the grid's waves, and writes
``reports/static/calibration.md`` and ``calibration.json``: estimate against published time, ratio.

The corrections the calibration found (spilled registers, cp.async loads, one warp's serial chain as a
lower bound, every global load of a cooperative step through L2) are part of the model now
(``sass.py``, ``static_cost.step_cycles``), each with its source; calibration.md records them.

Everything here is an estimate from compiled code, except the published times, which are measurements
by FlashRNN's authors, read from their repository's figure.
"""
import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from . import compile_check, sass, static_cost

OUT_DIR = static_cost.OUT_DIR
PEERS_DIR = OUT_DIR / "peers"
LABEL = static_cost.LABEL

#: H100 SXM: 132 SMs ([R3] of static_cost: the H100 whitepaper), 4 sub-partitions each.
H100_SMS = 132
SUBPARTITIONS = 4
#: Shared memory one block may use on sm_90 (as compile_check.SM90_SHARED_LIMIT).
SM90_SHARED_LIMIT = compile_check.SM90_SHARED_LIMIT

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
    # the other Triton fused bars of the same figure (the same kernels at other head sizes): more points
    # for the same model; DH=128's forward+backward is "OOSM" (out of shared memory)
    ("triton_fused", 16, 48): {"fwd_ms": 1.97, "fwd_bwd_ms": 3.47},
    ("triton_fused", 32, 24): {"fwd_ms": 1.44, "fwd_bwd_ms": 4.1},
    ("triton_fused", 128, 6): {"fwd_ms": 3.23, "fwd_bwd_ms": None},
}
PUBLISHED_SOURCE = ("FlashRNN README figure head_dim--lstm.svg (github.com/NX-AI/flashrnn, commit d73fb52; "
                    "bar labels), B=16, T=1024, bf16, H100 (arXiv 2412.07752)")

#: FlashRNN's CUDA fused backward is two kernels of the same .cu (BackwardPass::Run): after the recurrent
#: one (and a cudaDeviceSynchronize), gradientBiasAggregationKernel sums the bias gradient over T x B for
#: each of the 4 x 768 gate units: 6 blocks of 512 threads (on 6 SMs), each thread a chain of T loops
#: (line 637, the step) over B = 16 (line 638, unrolled by 4: 4 trips, each waiting for its 4 loads);
#: loop 2 is atomicAdd's compare-and-swap, once per thread after the loops. The same code at 12x64 and
#: 1x768 (hidden_size 768 in both). cuBLAS's dR GEMM runs beside it on another stream and is shorter
#: (12 x 64 x 256 x 16384 and 768 x 3072 x 16384 MACs: 0.01 and 0.07-0.15 ms on all SMs at the dense
#: peak .. half of it, static_cost's GEMM range), so it adds nothing here.
BIAS_GRADIENT = [{"peer": "flashrnn_cuda_lstm_bw_bias", "programs": 6, "plan": {"time": 0, "trips": {"1": 4}}}]

#: The peer configurations: which analysed builds make a forward and a backward, and their launch.
#: FlashRNN triton_fused: grid (NH, cdiv(B, siz_B)) = (12, 1), 4 warps (lstm_fw.py: autotune configs with
#: ENABLE_AUTOTUNING False: siz_B 16, num_stages 1, num_warps 4; lstm_bw.py: backward_sequence(siz_B=16)
#: launches num_warps=4 with Triton's default num_stages 3).
CONFIGS = [
    {"id": f"flashrnn-triton_fused-lstm-{nh}x{dh}", "backend": "triton_fused", "DH": dh, "NH": nh, "B": 16,
     "T": 1024, "fwd": f"flashrnn_triton_lstm_fw_dh{dh}", "bwd": f"flashrnn_triton_lstm_bw_dh{dh}", "programs": nh,
     "issue": dh == 64}
    for dh, nh in ((64, 12), (16, 48), (32, 24), (128, 6))
] + [
    # FlashRNN cuda_fused forward at the parameters its solver gives for an H100 (calibration.md): a
    # cooperative grid of 8 gate tiles x 12 heads = 96 blocks of 8 warps, grid.sync() every step. Its
    # loops (sass.analyze order): 0 the batch-iteration loop (once: BatchIterations = 1), 1 the time loop
    # (flashrnn_fused_forward.cu "main time loop"), 2 the accumulation over the 4 hidden warp tiles
    # (local_batch_idx from lane/16 to 16 in steps of 8: 2 trips per step), 3 grid.sync's poll
    # (cooperative_groups sync.h: the barrier term costs it).
    # Its backward (the same solver solution; flashrnn_fused_backward.cu, read by analyze_peer: the one
    # kernel, without the code the parameters never run, peer file's build.not_run): a cooperative grid
    # of 4 hidden tiles x 12 heads = 48 blocks of 8 warps, one grid.sync() per step. Loops: 0 the batch
    # loop (line 278, once), 1 the time loop (line 318), 2 grid.sync's poll (sync.h; the barrier term),
    # 3 the sum of the 8 gate-tile warps' products in shared memory (line 487: local_batch_idx from
    # wtcg_idx x 2 + lane/16 below 16 in steps of 16: 1 trip per step; its inner loop over the 7 other
    # warps is unrolled).
    {"id": "flashrnn-cuda_fused-lstm-12x64", "backend": "cuda_fused", "DH": 64, "NH": 12, "B": 16, "T": 1024,
     "fwd": "flashrnn_cuda_lstm_fw_12x64", "bwd": "flashrnn_cuda_lstm_bw_12x64", "programs": 96, "kernel": "coop",
     "plan": {"time": 1, "trips": {"2": 2, "3": 0}}, "bwd_programs": 48,
     "bwd_plan": {"time": 1, "trips": {"2": 0, "3": 1}}, "bwd_also": BIAS_GRADIENT, "issue": True},
    # ... and at one head of 768: forward 96 gate tiles x 1 head = 96 blocks, backward 48 hidden tiles x 1
    # head = 48 blocks, of 8 warps, the same loop nests
    {"id": "flashrnn-cuda_fused-lstm-1x768", "backend": "cuda_fused", "DH": 768, "NH": 1, "B": 16, "T": 1024,
     "fwd": "flashrnn_cuda_lstm_fw_1x768", "bwd": "flashrnn_cuda_lstm_bw_1x768", "programs": 96, "kernel": "coop",
     "plan": {"time": 1, "trips": {"2": 2, "3": 0}}, "bwd_programs": 48,
     "bwd_plan": {"time": 1, "trips": {"2": 0, "3": 1}}, "bwd_also": BIAS_GRADIENT, "issue": True},
]
#: Configurations published but not estimated, and why.
NOT_ESTIMATED = {}
#: Published passes not estimated for an estimated configuration, and why.
NOT_ESTIMATED_PASSES = {}

# --- Spills ------------------------------------------------------------------------------------

#: L1 and shared memory share 256 KB per SM on the H100 (NVIDIA H100 Tensor Core GPU Architecture
#: whitepaper); the shared-memory carve-out is one of 0, 8, 16, 32, 64, 100, 132, 164, 196, 228 KB
#: (CUDA C++ Programming Guide, compute capability 9.0), the driver taking one that holds the kernel's.
L1_SHARED_KB = 256
CARVEOUTS_KB = (0, 8, 16, 32, 64, 100, 132, 164, 196, 228)


def spills_fit_l1(spill_bytes_per_thread: int, threads_per_sm: int, shared_bytes: int) -> bool:
    """Whether the spilled registers of every thread on an SM fit in the L1 left beside its shared memory
    (else the spills' reloads come from L2)."""
    carve = next((c for c in CARVEOUTS_KB if c * 1024 >= shared_bytes), CARVEOUTS_KB[-1])
    return spill_bytes_per_thread * threads_per_sm <= (L1_SHARED_KB - carve) * 1024


def function_text(text: str, function: str) -> str:
    """The part of nvdisasm's output that is the code of the one function whose symbol contains
    ``function`` (nvdisasm heads each function's section with ``//---- .text.<symbol> ----``)."""
    parts = re.split(r"^//-+ \.text\.(\S+) -+$", text, flags=re.M)
    hits = [body for symbol, body in zip(parts[1::2], parts[2::2]) if function in symbol]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} functions match {function!r}")
    return hits[0]


def analyze_peer(cubin: bytes, tags=None, function: str = None, not_run=()) -> dict:
    """``sass.analyze`` of one function of a cubin, leaving out the address ranges ``not_run``.

    Why (FlashRNN's CUDA fused backward): its .cu holds two kernels, and each function's addresses
    start at 0, so ``sass.analyze``, which reads the whole cubin as one address space, would mix the
    other kernel's instructions into loops at the same addresses: ``function`` keeps one. And code
    the compiled parameters never run would be counted as run: a loop with 0 trips and its unrolled
    remainder (a loop has its trip count in the plan, the remainder before it has none), or the
    out-of-line path a ``BRA.DIV`` takes only when a warp reaches ``bar.sync`` diverged, whose jump
    back reads as a backward branch, i.e. a loop overlapping the time loop without nesting in it.
    ``not_run`` ([first, last] addresses, each with its reason in the peer's ``build``) leaves them
    out before the loops are found. The rest is ``sass.analyze`` itself (its parse, loops and
    counts), so the analysis version is the same."""
    return analyze_listing(sass.disassemble(cubin), tags, function, not_run)


def analyze_listing(text: str, tags=None, function: str = None, not_run=()) -> dict:
    """``analyze_peer`` on nvdisasm's ``-c -g -hex`` output."""
    if function:
        text = function_text(text, function)
    instrs, labels = sass.parse(text)
    instrs = [i for i in instrs if not any(first <= i.addr <= last for first, last in not_run)]
    tags = tags or {}
    loops = sass.find_loops(instrs, labels)
    out = []
    for loop in loops:  # as sass.analyze
        inner = [loops[c] for c in loop.children]
        body = [i for i in instrs if loop.start <= i.addr <= loop.end
                and not any(c.start <= i.addr <= c.end for c in inner)]
        entry = {"start": loop.start, "end": loop.end, "parent": loop.parent, "children": loop.children}
        entry.update(sass._counts(body, tags))
        entry["release"] = sass._release(instrs, loop)
        out.append(entry)
    return {"loops": out, "instructions": len(instrs)}


def import_peer(name: str, cubin_path: str, meta_path: str = None, tags=None) -> Path:
    """Analyse a peer's cubin (compiled elsewhere) with ``sass.analyze``; write ``peers/<name>.json``
    with the build description from ``meta_path`` (registers, spills, shared memory, layouts, compiler,
    options, source hash), or, without one, the description already in that file (re-analysing a
    peer after ``sass.py`` changed). A description naming a ``function`` or ``not_run`` address
    ranges ({"range": [first, last], "why": ...}) is read by ``analyze_peer`` instead."""
    cubin = Path(cubin_path).read_bytes()
    source = Path(meta_path) if meta_path else PEERS_DIR / f"{name}.json"
    meta = json.loads(source.read_text())
    meta = meta["build"] if not meta_path else {k: v for k, v in meta.items() if k != "sass"}
    tags = tags or meta.get("tags") or {}
    if meta.get("function") or meta.get("not_run"):
        analysis = analyze_peer(cubin, tags, meta.get("function"), [r["range"] for r in meta.get("not_run", [])])
    else:
        analysis = sass.analyze(cubin, tags)
    entry = {"name": name, "build": meta, "analysis_version": sass.VERSION, "sass": analysis}
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    path = PEERS_DIR / f"{name}.json"
    path.write_text(json.dumps(entry, indent=1, sort_keys=True) + "\n")
    return path


#: This project's own builds held to the same terms: the cooperative LSTM, bf16, K 768 (512 + 256),
#: forward and backward, the builds of the cuDNN anchor (static_cost.CUDNN_ANCHOR).
OWN = {"own_lstm_coop_fwd_768": ("coop_fwd", "LSTM", "bfloat16", 768),
       "own_lstm_coop_bwd_768": ("coop_bwd", "LSTM", "bfloat16", 768)}


def import_own(cubin_dir: str) -> list:
    """Analyse this project's anchor builds from a directory of cubins by build key (compile_check's
    LOCAL_DIR layout, e.g. a checkout's build/sm90) into ``peers/own_*.json``. A build not found there
    is compiled (into compile_check.LOCAL_DIR)."""
    import torch

    paths = []
    for name, (kernel, cell, dtype, block) in OWN.items():
        config = next(c for c in compile_check.dispatcher_configs() if c[0] == kernel and c[1] == cell
                      and c[2] == getattr(torch, dtype) and c[3] == block and c[6])
        r = compile_check.compile_one(*config)
        cubin = Path(cubin_dir) / f"{r.key}.cubin"
        if not cubin.exists():  # taken from the committed results: compile it for its cubin
            r = compile_check.compile_one(*config, cached=False)
            cubin = compile_check.LOCAL_DIR / f"{r.key}.cubin"
        meta = {"kernel": kernel, "cell": cell, "dtype": dtype, "block_k": block, "num_warps": r.num_warps,
                "block_u": r.block_u, "w_chunk": r.w_chunk, "registers": r.registers, "spill_bytes": r.spill_bytes,
                "shared_bytes": r.shared_bytes, "mma_layouts": r.mma_layouts, "key": r.key,
                "source": "this project's kernels (compile_check build key above)"}
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # nothing written into cubin_dir
            json.dump(meta, f)
            f.flush()
            paths.append(import_peer(name, str(cubin), f.name, compile_check.source_tags()))
    return paths


def own_anchor() -> list:
    """The anchor's per-step loop cost (LSTM H=768, B=16, bf16: 48 programs of 16 units, backward in 6
    chunks of 128) by the model (the GEMMs outside the loop left out), beside cuDNN's published
    per-step time. Empty when the own analyses are not committed."""
    a = static_cost.CUDNN_ANCHOR
    rows = []
    for name, (kernel, _cell, _dtype, block) in OWN.items():
        path = PEERS_DIR / f"{name}.json"
        if not path.exists():
            return []
        e = json.loads(path.read_text())
        b = e["build"]
        r = SimpleNamespace(kernel=kernel, num_warps=b["num_warps"])
        chunks = -(-a["H"] // b["w_chunk"]) if kernel.startswith("coop") and b["w_chunk"] else 1
        programs = -(-a["H"] // b["block_u"])
        cost = static_cost.step_cycles(r, static_cost.step_counts(e["sass"], 1, chunks), programs, 2)
        us = lambda c: c / (static_cost.CLOCK_GHZ * 1e3)  # noqa: E731
        rows.append({"build": name, "programs": programs, "chunks": chunks, "compute_cycles": cost["compute"],
                     "latency_cycles": tuple(sum(v[i] for v in cost["latency"].values()) for i in (0, 1)),
                     "serial_cycles": cost["chain"], "model_us": (us(cost["cycles"][0]), us(cost["cycles"][1])),
                     "cudnn_us": (a["fwd_ms"] if kernel == "coop_fwd" else a["fwd_bwd_ms"] - a["fwd_ms"])
                     * 1e3 / a["T"]})
    return rows


# --- The estimate ----------------------------------------------------------------------------------


def load_peer(name: str) -> dict:
    return json.loads((PEERS_DIR / f"{name}.json").read_text())


def kernel_estimate(peer: dict, programs: int, T: int, kernel: str = "peer", plan: dict = None) -> dict:
    """One peer kernel over T steps: the model's per-step cycles (``static_cost.step_counts`` with the
    time loop and trip counts ``plan`` names where its role guess does not fit, then ``step_cycles``),
    times T and the grid's waves. ``kernel`` starting with "coop": a cooperative launch with a grid
    barrier every step (the model's barrier and L2-gather terms)."""
    b = peer["build"]
    r = SimpleNamespace(kernel=kernel, num_warps=b["num_warps"])
    if plan:
        step = static_cost.step_counts(peer["sass"], time_loop=plan["time"], trips=plan["trips"])
    else:
        step = static_cost.step_counts(peer["sass"], 1, 1)
    # one program per SM while the grid fits (12 programs of 4 warps on 132 SMs): one wave
    waves = max(1, math.ceil(programs / H100_SMS))
    fits = spills_fit_l1(b["spill_bytes"], 32 * b["num_warps"], b["shared_bytes"])
    cost = static_cost.step_cycles(r, step, programs, 2, "l1" if fits else "l2")
    lo, hi = cost["cycles"]
    ms = lambda c: c * T * waves / (static_cost.CLOCK_GHZ * 1e6)  # noqa: E731
    return {"step_cycles": (lo, hi), "ms": (ms(lo), ms(hi)), "waves": waves, "programs": programs,
            "compute_cycles": cost["compute"], "serial_cycles": cost["chain"], "terms": cost["terms"],
            "latency": cost["latency"], "instructions_per_warp": step["count"].get("total", 0), "mma": step["mma"],
            "round_trips": step["round_trips"], "spills_in": "L1" if fits else "L2",
            "local_bytes_per_warp": step["bytes"].get("local", 0), "async_copies": step["count"].get("ldg", 0),
            "warps_per_subpartition": b["num_warps"] / SUBPARTITIONS,
            "registers": b["registers"], "spill_bytes": b["spill_bytes"], "shared_bytes": b["shared_bytes"]}


def _ratio(published, est):
    """published / estimate at the estimate's low and high end (>1: the model is too fast)."""
    return (published / est[0] if est[0] else None, published / est[1] if est[1] else None)


def _compare(published, est) -> dict:
    return {"published_ms": published, "estimate_ms": est, "ratio": _ratio(published, est)}


def calibrate() -> dict:
    rows = []
    for c in CONFIGS:
        pub = PUBLISHED[(c["backend"], c["DH"], c["NH"])]
        kernel, plan = c.get("kernel", "peer"), c.get("plan")
        fwd = kernel_estimate(load_peer(c["fwd"]), c["programs"], c["T"], kernel, plan)
        # a backward with its own grid and loop nest (FlashRNN's CUDA fused kernels) says so
        bwd = kernel_estimate(load_peer(c["bwd"]), c.get("bwd_programs", c["programs"]), c["T"], kernel,
                              c.get("bwd_plan", plan)) if c["bwd"] else None
        # kernels the backward runs after its recurrent one, each costed by the same step model
        also = [dict(kernel_estimate(load_peer(k["peer"]), k["programs"], c["T"], k.get("kernel", "peer"),
                                     k.get("plan")), peer=k["peer"]) for k in c.get("bwd_also", [])]
        # a build asking for more shared memory than an SM has does not launch ("OOSM" in the figure)
        bwd_launches = bwd is None or bwd["shared_bytes"] <= SM90_SHARED_LIMIT
        compare = {"fwd": _compare(pub["fwd_ms"], fwd["ms"])}
        row = {"id": c["id"], "backend": c["backend"], "DH": c["DH"], "NH": c["NH"], "B": c["B"], "T": c["T"],
               "issue_configuration": c["issue"], "published": dict(pub), "fwd": fwd, "bwd": bwd,
               "bwd_launches": bwd_launches, "compare": compare}
        if also:
            row["bwd_also"] = also
        if bwd is None:
            row["not_estimated"] = NOT_ESTIMATED_PASSES.get((c["backend"], c["DH"], c["NH"]), "")
        elif pub["fwd_bwd_ms"] is not None and bwd_launches:
            bwd_pub = round(pub["fwd_bwd_ms"] - pub["fwd_ms"], 2)
            row["published"]["bwd_ms_derived"] = bwd_pub
            bwd_ms = tuple(b + sum(k["ms"][i] for k in also) for i, b in enumerate(bwd["ms"]))
            both = tuple(f + b for f, b in zip(fwd["ms"], bwd_ms))
            compare["bwd (derived)"] = _compare(bwd_pub, bwd_ms)
            compare["fwd+bwd"] = _compare(pub["fwd_bwd_ms"], both)
        rows.append(row)
    skipped = [{"backend": k[0], "DH": k[1], "NH": k[2], **PUBLISHED[k], "reason": v} for k, v in NOT_ESTIMATED.items()]
    return {"label": LABEL, "published_source": PUBLISHED_SOURCE, "rows": rows, "not_estimated": skipped,
            "own_anchor": own_anchor(), "serial_latency": sass.SERIAL_LATENCY, "local_latency": sass.LOCAL_LATENCY}


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
    lines = ["| configuration | pass | published ms | estimate ms | published / estimate | within 1.5x |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        name = f"{row['backend']} LSTM {row['NH']}x{row['DH']}, B={row['B']}, T={row['T']}"
        name = f"**{name}** (issue)" if row["issue_configuration"] else name
        if row.get("not_estimated"):
            lines.append(f"| {name} | fwd+bwd | {row['published']['fwd_bwd_ms']} | {row['not_estimated']} | | |")
        if not row["bwd_launches"]:
            lines.append(f"| {name} | fwd+bwd | OOSM | does not launch: the backward asks for "
                         f"{row['bwd']['shared_bytes'] / 1024:.0f} KiB of shared memory (> 227) | | |")
        for mode, c in row["compare"].items():
            lines.append(f"| {name} | {mode} | {c['published_ms']:.2f} | {_rng(c['estimate_ms'])} "
                         f"| {_rng(c['ratio'], '{:.1f}')}x | {_within(c['ratio'])} |")
    for s in result["not_estimated"]:
        lines.append(f"| {s['backend']} LSTM {s['NH']}x{s['DH']}, B=16, T=1024 | fwd / fwd+bwd "
                     f"| {s['fwd_ms']} / {s['fwd_bwd_ms']} | not estimated: {s['reason']} | | |")
    return "\n".join(lines)


def breakdown(row) -> str:
    out = []
    for mode, k in [("fwd", row["fwd"]), ("bwd", row["bwd"])] + [(f"bwd, then {k['peer']}", k)
                                                               for k in row.get("bwd_also", [])]:
        if k is None:
            continue
        terms, lat = static_cost.format_cycles(k["terms"]), static_cost.format_cycles(k["latency"])
        mma = ", ".join(f"{n:g} {op}" for op, n in k["mma"].items())
        out.append(
            f"- **{mode}** ({k['programs']} programs, {k['waves']} wave; "
            f"{k['registers']} registers, {k['spill_bytes']} B spilled, {k['shared_bytes'] / 1024:.1f} KiB shared): "
            f"per warp and step {k['instructions_per_warp']:g} instructions ({mma}); compute "
            f"{_rng(k['compute_cycles'], '{:.0f}')} cycles (pipes: {terms}; one warp's serial chain "
            f"{_rng(k['serial_cycles'], '{:.0f}')}, "
            f"{'no spills' if not k['spill_bytes'] else 'spills reloaded from ' + k['spills_in']}), latency {lat} "
            f"({k['round_trips']:g} round trips) = {_rng(k['step_cycles'], '{:.0f}')} cycles/step.")
    return "\n".join(out)


def markdown(result) -> str:
    rows = result["rows"]
    parts = ["# Calibration of the static model against published H100 times: " + LABEL, "",
             "Made by `python -m rnn_triton.calibration` from the committed peer analyses in `reports/static/peers/` "
             "(the output of this project's `sass.analyze` on the peers' cubins; "
             "the cubins and SASS are not committed, so CI needs neither FlashRNN nor a compiler). Published: "
             + result["published_source"] + ". The estimate is `static_cost`'s step model (`step_counts`, "
             "`step_cycles`, with corrections 1-4 below applied) x T x waves; its range is low..high. Ratio = "
             "published / estimate (above 1: the model is too fast), given at the estimate's low and high end; "
             "\"within 1.5x\": the published time lies within [low / 1.5, high x 1.5]. \"bwd (derived)\" is "
             "published fwd+bwd minus published fwd.", "",
             "## Table", "", table(result), "",
             f"## Breakdown (cycles at 1.98 GHz; {LABEL})", ""]
    for row in rows:
        parts += [f"### {row['id']}", "", breakdown(row), ""]
    own = result.get("own_anchor") or []
    if own:
        parts += ["## The same terms on this project's anchor builds (per step, the loop only)", "",
                  "LSTM H=768, B=16, bf16, cooperative K 768 (the builds of static_cost's cuDNN anchor), "
                  "time loop only (the GEMMs outside it left out); " + LABEL + ". cuDNN: published H100 time per "
                  "step (forward; backward = fwd+bwd - fwd), a measurement.", "",
                  "| build | programs | compute cycles | latency cycles | serial chain cycles | estimated µs/step "
                  "| cuDNN µs/step (published) |",
                  "|---|---|---|---|---|---|---|"]
        for o in own:
            parts.append(f"| {o['build']} | {o['programs']} (x{o['chunks']} chunks) "
                         f"| {_rng(o['compute_cycles'], '{:.0f}')} "
                         f"| {_rng(o['latency_cycles'], '{:.0f}')} | {_rng(o['serial_cycles'], '{:.0f}')} "
                         f"| {_rng(o['model_us'])} | {o['cudnn_us']:.2f} |")
        parts.append("")
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
    parser.add_argument("--import-peer", nargs="+", metavar="NAME CUBIN [META]",
                        help="analyse a peer's cubin (without META: keep the build description it has)")
    parser.add_argument("--import-own", metavar="CUBIN_DIR", help="analyse this project's anchor builds from there")
    args = parser.parse_args(argv)
    if args.import_peer:
        print(import_peer(*args.import_peer))
        return 0
    if args.import_own:
        print("\n".join(str(p) for p in import_own(args.import_own)))
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
