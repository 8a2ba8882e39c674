"""What each kernel costs per time step, read from its compiled sm_90 code: an estimate, not a measurement.

    python -m rnn_triton.static_cost                   # print the tables; write reports/static/
    python -m rnn_triton.static_cost --check           # also fail on a regression against the baseline
    python -m rnn_triton.static_cost --write-baseline  # record today's MMA efficiencies as the floor

Two tables, both from the builds the compile check makes (``compile_check``: the same builds, cached
by build key, so nothing compiles twice):

1. **Facts**, per dispatcher configuration (cell, dtype, precision, kernel, block sizes, alignment),
   per time step of one program at the configuration's nominal size (H = its BLOCK_H / BLOCK_K, one
   batch tile of 16 rows), read from the SASS by ``sass.analyze``: tensor-core instructions issued
   and the **MMA efficiency** (the step's useful multiply-adds, units x rows x K, over those issued:
   1.0 means no warp repeats another's product), shared-memory bytes read, global bytes loaded and
   stored, W_hh loads from global memory inside the loop, dependent global round trips, MUFU and
   barrier instructions, and the stores the grid barrier's release waits for.
2. **Estimates**, per (cell, H, B, dtype, mode): the plan ``dispatch.choose`` makes on an H200, and a
   per-step latency range built from those counts and the machine constants below, each with its
   source. The compute phase is bounded below by its busiest pipe (tensor cores, shared memory, SFU,
   FP32, issue) or one warp's serial chain, whichever is longer, and above by the pipes' sum (or the
   chain); the latency terms (dependent round trips, the grid barrier, the L2 gather) add to both.
   Printed beside cuDNN's published H100 anchor. The model is held against published times of
   FlashRNN's kernels by ``python -m rnn_triton.calibration`` (the corrections it led to are listed
   with the constants).

What the model cannot see: real L2 hit rates (a round trip is costed as an L2 hit at the low end and
an HBM access at the high end), the clock under load, contention between programs for L2 and the
barrier's counter, scheduling within an SM beyond the pipe bounds, and anything a GPU run would show
that the code does not say. Every figure it prints is an estimate from compiled code.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from . import compile_check, dispatch, sass

OUT_DIR = compile_check.BUILDS_FILE.parent
BASELINE_FILE = OUT_DIR / "baseline.json"
LABEL = "estimate from compiled code, not a measurement"
#: The least MMA efficiency a build with tensor-core dots may have (``check``): no warp repeats more than
#: a tenth of the step's product. (IEEE float32 builds dot on FFMA; their efficiency, FFMAs against the
#: product, is held to its baseline only.)
MMA_FLOOR = 0.9
#: Tile configurations below the floor by choice, (cell, dtype, precision, BLOCK_H): their warps repeat
#: part of the tensor-core work because on fewer their backward spills (the sLSTM's holds four states;
#: the float32 LSTM's with per-step state gradients, ``flashrnn``'s, spilled 8 bytes on 4 warps).
MMA_FLOOR_EXCEPTIONS = {("SLSTM", dtype, "ieee", block_h) for dtype in ("float16", "bfloat16") for block_h in (32, 64)} \
    | {("LSTM", "float32", "tf32", 64)}

# --- Machine constants (Hopper SM, as on the H100 SXM and H200), each with its source. -----------------
#: [R1] "CUDA Performance Study - NVIDIA H100 SXM5" micro-benchmarks (a public benchmark README), run
#: at 1.98 GHz: pointer-chase latency L2 hit 259.9 cycles, HBM 570.5 cycles; L2 copy bandwidth 3.6 TB/s.
CLOCK_GHZ = 1.98
L2_CYCLES = 260
HBM_CYCLES = 570
L2_BYTES_PER_CYCLE = 3.6e12 / (CLOCK_GHZ * 1e9)
#: [R2] PMC10448217 (Table 3): H100 shared memory 32,348 GB/s over 144 SMs at 1755 MHz = 128 B/clk/SM.
SHARED_BYTES_PER_CYCLE = 128
#: [R3] NVIDIA H100 Tensor Core GPU Architecture whitepaper: per SM and clock, 2x A100's 1024 dense
#: FP16/BF16 FMA, i.e. 2048 (989 TFLOPS dense = 132 SMs x 2048 x 2 x 1.83 GHz); TF32 half that.
TENSOR_MACS_PER_CYCLE = {2: 2048, 4: 1024}  # by operand bytes: fp16/bf16, tf32
#: mma.sync (HMMA) on Hopper is not guaranteed wgmma's rate ([R4] Luo et al., "Benchmarking and
#: Dissecting the Nvidia Hopper GPU Architecture", arXiv 2402.13499: legacy mma below wgmma's
#: throughput): its issue is costed at 1x to 2x the wgmma time (4-8 cycles per HMMA.16816 on an SMSP).
HMMA_SLOWDOWN = (1.0, 2.0)
#: [R5] CUDA C++ Programming Guide, arithmetic instruction throughput (compute capability 9.0): per SM
#: and clock, 128 FP32 add/multiply/FMA, 16 for the special functions (exp2, reciprocal, tanh...).
FP32_PER_CYCLE = 128
SFU_PER_CYCLE = 16
#: [R3] 4 SM sub-partitions, each dispatching one warp instruction per clock.
ISSUE_PER_CYCLE = 4
#: The grid barrier, built from its SASS (no published Hopper grid-barrier latency was found):
#: arrive = MEMBAR.ALL.GPU (waits for the step's stores to be acknowledged: one L2 round trip) then
#: REDG to the counter (half a round trip to reach L2); wait = one thread polling with
#: LDG.STRONG.GPU: the arrival lands within a poll period (one round trip): half of one on average, a
#: whole one at worst, then the poll's answer returns (half a round trip); 2 BAR.SYNC around it.
#: In L2 round trips: 1 + 0.5 + (0.5 .. 1) + 0.5.
BARRIER_ROUND_TRIPS = (2.5, 3.0)
#: cuDNN's published H100 SXM time for torch.nn.LSTM, H=768, B=16, T=1024, bf16 ([R6] FlashRNN, arXiv
#: 2412.07752, its benchmark data): 2.01 ms forward, 5.19 ms forward+backward.
CUDNN_ANCHOR = {"cell": "LSTM", "H": 768, "B": 16, "T": 1024, "dtype": "bfloat16",
                "fwd_ms": 2.01, "fwd_bwd_ms": 5.19}

#: Corrections from holding the model against FlashRNN's published H100 times (python -m
#: rnn_triton.calibration, reports/static/calibration.md; the first cut missed by up to 3.6x):
#: 1. Spilled registers: LDL/STL (sass "local") go through the L1/shared-memory data path, so their
#:    bytes join the shared pipe (L1 and shared memory are one 256 KB array per SM: [R3]); their
#:    reloads' latency is an L1 or an L2 hit in the serial chain (sass.LOCAL_LATENCY).
#: 2. cp.async (LDGSTS) is a global load (sass.classify): its bytes (its round trips are not seen: it
#:    completes through DEPBAR, which the reader does not follow; this project issues none).
#: 3. No warp finishes an iteration sooner than its own serial chain (sass.serial_cycles: stall counts and
#:    scoreboard waits costed by unit, sass.SERIAL_LATENCY): the compute phase is at least that.
#: 4. In a cooperative step every global load may read another program's pre-barrier store, so L2 serves
#:    all of them (not only the .cg loads): at least once per program, at most as issued.
#: Not applied, no source to cite: the peers' remaining gap (~2,200 cycles per step in both CUDA
#: cooperative forwards) points at a grid barrier several times dearer than BARRIER_ROUND_TRIPS.

_FWD = ("fwd", "coop_fwd")


def _loop_roles(analysis):
    """(time loop, {child loop index: role}) of a SASS analysis: the time loop is the outermost loop
    holding the most tensor-core work (or instructions); under it, at any depth, an innermost loop with
    the barrier's poll and no tensor-core work is "poll"; a child of the time loop holding another loop
    or the tile's work is "tile", a loop inside a tile loop with a dot's work (tensor-core, or FFMA in
    IEEE fp32) "chunk"."""
    loops = analysis["loops"]
    if not loops:
        return None, {}

    def subtree(k):
        return [k] + [d for c in loops[k]["children"] for d in subtree(c)]

    def weight(k):
        return (sum(loops[d]["macs"] for d in subtree(k)), sum(loops[d]["count"]["total"] for d in subtree(k)))

    top = max((k for k, lp in enumerate(loops) if lp["parent"] is None), key=weight)

    def poll(k):
        return "barrier" in loops[k]["tags"] and not loops[k]["macs"] and not loops[k]["children"]

    roles = {}
    for c in loops[top]["children"]:
        roles[c] = "poll" if poll(c) else "tile"
        for d in subtree(c)[1:]:
            dot = loops[d]["macs"] or loops[d]["count"].get("ffma", 0)
            roles[d] = "poll" if poll(d) else "chunk" if dot else "inner"
    return top, roles


def loop_nest(analysis) -> list:
    """The roles of the time loop's inner loops, sorted (e.g. ["chunk", "poll", "tile"])."""
    _, roles = _loop_roles(analysis)
    return sorted(roles.values())


def expected_nest(r) -> list:
    """The loop nest a build's source has: a tile-persistent loop has no inner loop; a cooperative one
    the barrier's poll and the loop over the program's batch tiles, with the K chunks inside that
    where it re-reads W_hh (w_chunk)."""
    if not r.kernel.startswith("coop"):
        return []
    return sorted(["poll", "tile"] + (["chunk"] if r.w_chunk else []))


def step_counts(analysis, tiles: int = 1, chunks: int = 1, time_loop=None, trips=None) -> dict:
    """Per-warp counts of one time step: the time loop's own instructions, each tile loop's times
    ``tiles`` (batch tiles per program), each chunk loop's times ``chunks`` (backward K chunks); the
    barrier's poll loop is left to the barrier term. Also the serial chain, the grid barrier's release
    and the W_hh global loads inside the loop. ``time_loop`` and ``trips`` ({loop index: times per
    step}) override the roles ``_loop_roles`` guesses, for a loop nest it does not fit (a peer's)."""
    if time_loop is None:
        time_loop, roles = _loop_roles(analysis)
        if time_loop is None:
            return {}
        trips = {k: {"tile": tiles, "chunk": tiles * chunks, "inner": tiles * chunks}.get(role, 0)
                 for k, role in roles.items()}
    loops = analysis["loops"]
    total = {"count": {}, "mma": {}, "macs": 0.0, "bytes": {}, "ldg_qualifiers": {}, "round_trips": 0,
             "weight_loads": 0, "serial": {}}
    for k, times in [(time_loop, 1)] + [(int(k), v) for k, v in trips.items()]:
        lp = loops[k]
        for field in ("count", "mma", "bytes", "ldg_qualifiers"):
            for key, v in lp[field].items():
                total[field][key] = total[field].get(key, 0) + v * times
        total["macs"] += lp["macs"] * times
        total["round_trips"] += lp["round_trips"] * times
        total["weight_loads"] += lp["tags"].get("weights", {}).get("ldg", 0) * times
        for where, (lo, hi) in lp["serial"].items():
            acc = total["serial"].setdefault(where, [0.0, 0.0])
            acc[0] += lo * times
            acc[1] += hi * times
    total["release"] = loops[time_loop]["release"]
    total["gather_bytes"] = sum(v * 32 * sass.access_bytes(q) for q, v in total["ldg_qualifiers"].items()
                                if "STRONG.GPU" in q and q != "LDG.E.STRONG.GPU")  # h / dr from L2, not the poll
    return total


def useful_macs(kernel: str, num_gates: int, block_h: int, block_u: int, rows: int = dispatch.BLOCK_B) -> int:
    """The multiply-adds one program's step needs: units x rows x K for the gates it computes."""
    if kernel.startswith("coop"):
        return num_gates * block_u * rows * block_h  # forward: G*U x rows x H; backward: U x rows x G*H
    return num_gates * block_h * rows * block_h


def facts(r) -> dict:
    """The facts row of one compile result (see the module docstring), at its nominal size."""
    chunks = -(-r.block_h // r.w_chunk) if r.w_chunk else 1
    step = step_counts(r.sass, 1, chunks)
    if not step:
        return {"error": r.sass.get("error", "no loop found")}
    nest = loop_nest(r.sass)
    if nest != expected_nest(r):
        return {"error": f"loop nest {nest}, expected {expected_nest(r)}: the trip counts would go to the "
                         "wrong loops (static_cost._loop_roles)"}
    cell = dispatch.CELLS[r.cell]
    # a dot runs on tensor cores, or (IEEE float32) on FFMA: then those are its issued multiply-adds
    issued = (step["macs"] or step["count"].get("ffma", 0) * 32) * r.num_warps
    useful = useful_macs(r.kernel, cell.num_gates, r.block_h, r.block_u)
    release = step["release"] or {}
    return {
        "mma": {op: n * r.num_warps for op, n in step["mma"].items()},
        "mma_issued_macs": issued, "mma_useful_macs": useful,
        "mma_efficiency": round(useful / issued, 4) if issued else None,
        "mma_layouts": r.mma_layouts,
        "shared_read_bytes": step["bytes"].get("shared_read", 0) * r.num_warps,
        "global_loaded_bytes": step["bytes"].get("global_loaded", 0) * r.num_warps,
        "global_stored_bytes": step["bytes"].get("global_stored", 0) * r.num_warps,
        "gather_bytes": step["gather_bytes"] * r.num_warps,
        "ldg_qualifiers": step["ldg_qualifiers"],
        "weight_loads_in_loop": step["weight_loads"],
        "round_trips": step["round_trips"],
        "mufu": step["count"].get("mufu", 0) * r.num_warps,
        "bar_sync": step["count"].get("bar", 0),
        "membar": step["count"].get("membar", 0),
        "stores_before_release": release.get("stores_before", 0),
        "bytes_before_release": release.get("bytes_before", 0) * r.num_warps,
        "instructions_per_warp": step["count"].get("total", 0),
        "w_chunk": r.w_chunk,
    }


def config_id(r) -> str:
    return (f"{r.kernel}/{r.cell}/{r.dtype}/{r.precision}/{r.block_h}/{'16k' if r.aligned else 'any'}"
            f"/w{r.num_warps}")


# --- The estimate ----------------------------------------------------------------------------------


def step_cycles(r, step, programs: int, op_bytes: int, spills_in: str = "l1") -> dict:
    """Cycles of one program's step (lo, hi) and their breakdown, from ``step`` (step_counts).
    ``spills_in``: where spilled registers' reloads hit, "l1" or "l2" (calibration.spills_fit_l1)."""
    warps = r.num_warps
    count = step["count"]
    hgmma = sum(n for op, n in step["mma"].items() if op.startswith("HGMMA")) * warps
    macs_total = step["macs"] * warps
    rate = TENSOR_MACS_PER_CYCLE[op_bytes]
    hmma_share = 1.0 - (hgmma / max(1, sum(step["mma"].values()) * warps))
    tensor = macs_total / rate
    tensor_hi = tensor * (1 - hmma_share + hmma_share * HMMA_SLOWDOWN[1])
    # spilled registers (LDL/STL) move through the same L1/shared-memory data path as LDS (correction 1)
    shared = (step["bytes"].get("shared_read", 0) + step["bytes"].get("local", 0)) * warps / SHARED_BYTES_PER_CYCLE
    terms = {
        "tensor": (tensor, tensor_hi),
        "shared": (shared, shared),
        "sfu": (count.get("mufu", 0) * warps * 32 / SFU_PER_CYCLE,) * 2,
        "fp32": (count.get("fp", 0) * warps * 32 / FP32_PER_CYCLE,) * 2,
        "issue": (count.get("total", 0) * warps / ISSUE_PER_CYCLE,) * 2,
    }
    # no warp finishes its iteration sooner than its own serial chain (correction 3)
    chain = step["serial"].get(f"local_{spills_in}", (0.0, 0.0))
    compute = (max([lo for lo, _ in terms.values()] + [chain[0]]),
               max(sum(hi for _, hi in terms.values()), chain[1]))
    latency = {"round_trips": (step["round_trips"] * L2_CYCLES, step["round_trips"] * HBM_CYCLES)}
    if r.kernel.startswith("coop"):
        latency["barrier"] = tuple(n * L2_CYCLES for n in BARRIER_ROUND_TRIPS)
        # every global load of a cooperative step may read what other programs wrote before the barrier,
        # so L2 serves it (correction 4): at most as issued by every warp; at least once per program
        # (its warps reading the same state), and then only the transfer time beyond the one L2
        # round trip already costed for the load is extra (the transfer overlaps the first access)
        issued = step["bytes"].get("global_loaded", 0) * warps * programs / L2_BYTES_PER_CYCLE
        latency["l2_gather"] = (max(0.0, issued / warps - L2_CYCLES), issued)
    lo = compute[0] + sum(v[0] for v in latency.values())
    hi = compute[1] + sum(v[1] for v in latency.values())
    return {"cycles": (lo, hi), "compute": compute, "chain": tuple(chain), "terms": terms, "latency": latency}


def _result_for(results, kernel, cell, dtype, precision, block_h, num_warps, w_chunk):
    """The build of that configuration (aligned: the kernels see H padded to a multiple of 16)."""
    for r in results:
        if r.aligned and (r.kernel, r.cell, r.dtype, r.precision, r.block_h, r.num_warps, r.w_chunk) == (
                kernel, cell, dtype, precision, block_h, num_warps, w_chunk):
            return r
    return None


def estimate(results, cell: str, H: int, B: int, dtype: torch.dtype, props=dispatch.H200, I: int = None,
             heads: int = 1) -> dict:
    """The per-step estimate (µs, lo..hi) of one layer, forward and forward+backward, on ``props``
    (the dispatcher's plan for it), with its breakdown; or the reason no kernel serves it. ``heads``: a
    layer of that many heads of H units each (the tile kernel's build with a block axis, one program
    per head and batch tile)."""
    cuda = torch.device("cuda")
    plan = dispatch.choose(cell, H, dtype, cuda, B, props, heads=heads)
    out = {"cell": cell, "H": H, "B": B, "dtype": str(dtype).replace("torch.", ""), "label": LABEL}
    if heads > 1:
        out["heads"] = heads
    if not plan.uses_triton:
        return dict(out, plan=None, reason=plan.reason)
    c = plan.config
    out["plan"] = {"variant": c.variant, "block_h": c.block_h, "num_warps": c.num_warps, "groups": c.groups}
    if c.variant == "stepwise":
        return dict(out, reason="stepwise: one launch per step, launch-bound (not modelled)")
    name = out["dtype"]
    # cuDNN's default allow_tf32 (float32 in TF32 where the cell has those builds)
    precision = "tf32" if dtype == torch.float32 and "tf32" in dispatch.fp32_precisions("sm_90", cell) else "ieee"
    op_bytes = 4 if dtype == torch.float32 else 2
    tiles = -(-B // dispatch.BLOCK_B)
    coop = c.variant == "cooperative"
    spec = dispatch.CELLS[cell]
    I = I or H * heads
    GH = spec.num_gates * H * heads  # all heads' gate units
    gemm_macs = {"fwd": B * GH * I, "bwd": 2 * B * GH * I + B * GH * H}
    total = [0.0, 0.0]
    for mode in ("fwd", "bwd"):
        kernel = ("coop_" if coop else "") + mode + ("_bidir" if heads > 1 else "")
        w_chunk = (c.w_chunk if mode == "bwd" else c.fwd_chunk) if coop else 0
        r = _result_for(results, kernel, cell, name, precision, c.block_h, c.num_warps, w_chunk)
        if r is None or not r.sass.get("loops"):
            return dict(out, reason=f"no analysed build for {kernel} {cell} {name} {c.block_h}")
        chunks = -(-H // w_chunk) if w_chunk else 1
        per_program_tiles = -(-tiles // c.groups) if coop else 1
        programs = -(-H // c.block_u) * c.groups if coop else tiles * heads
        step = step_counts(r.sass, per_program_tiles, chunks)
        cost = step_cycles(r, step, programs, op_bytes)
        resident = dispatch.resident_blocks(props, r.num_warps, r.registers, r.shared_bytes) * props.sm_count
        waves = 1 if coop else max(1, -(-programs // max(1, resident)))
        # the GEMMs outside the loop, amortised per step: all SMs at dense peak .. half of it
        gemm = gemm_macs[mode] / (props.sm_count * TENSOR_MACS_PER_CYCLE[op_bytes])
        lo, hi = cost["cycles"][0] * waves + gemm, cost["cycles"][1] * waves + 2 * gemm
        # useful: the real H (padding to BLOCK_H is waste), batch rows in whole tiles of 16
        useful = spec.num_gates * H * H * tiles * dispatch.BLOCK_B * heads
        issued = (step["macs"] or step["count"].get("ffma", 0) * 32) * r.num_warps * programs
        out[mode] = {"us": (lo / (CLOCK_GHZ * 1e3), hi / (CLOCK_GHZ * 1e3)), "build": config_id(r),
                     "waves": waves, "programs": programs, "gemm_cycles": gemm,
                     "mma_efficiency_at_H": round(useful / issued, 3) if issued else None,
                     "compute_cycles": cost["compute"], "terms": cost["terms"], "latency": cost["latency"]}
        total[0] += lo
        total[1] += hi
    out["fwd_bwd"] = {"us": (total[0] / (CLOCK_GHZ * 1e3), total[1] / (CLOCK_GHZ * 1e3))}
    return out


ESTIMATE_GRID = {
    "LSTM": [32, 64, 128, 256, 512, 768, 1024],
    "GRU": [32, 64, 128, 256, 512, 768, 1024],
    "RNN_TANH": [64, 128, 256, 512, 1024, 2048],
}


#: Multi-head layers (cell, heads, head size): H = 768 as FlashRNN's users split it.
ESTIMATE_HEADS = [("LSTM", 12, 64), ("LSTM", 6, 128), ("GRU", 12, 64), ("GRU", 6, 128), ("SLSTM", 12, 64),
                  ("SLSTM", 6, 128)]


def estimates(results, batches=(1, 16, 64), dtypes=(torch.bfloat16, torch.float32)):
    dense = [estimate(results, cell, H, B, dtype) for dtype in dtypes for cell, hs in ESTIMATE_GRID.items()
             for H in hs for B in batches]
    return dense + [estimate(results, cell, H, B, dtype, heads=heads) for dtype in dtypes
                    for cell, heads, H in ESTIMATE_HEADS for B in (16, 64)]


# --- Output ----------------------------------------------------------------------------------------


def _range(us) -> str:
    return f"{us[0]:.2f}-{us[1]:.2f}"


def format_facts(rows) -> str:
    lines = ["| build | MMA issued / step / program | MMA eff. | layout | smem read KiB | global ld/st KiB "
             "| L2 gather KiB | W_hh ldg in loop | round trips | MUFU | stores before release |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid, f in rows:
        if "error" in f:
            lines.append(f"| {cid} | analysis failed: {f['error']} |||||||||| ")
            continue
        mma = ", ".join(f"{n:g} {op}" for op, n in f["mma"].items()) or "none (FMA)"
        eff = "-" if f["mma_efficiency"] is None else f"{f['mma_efficiency']:.3f}"
        lines.append(f"| {cid} | {mma} | {eff} | {'; '.join(f['mma_layouts']) or '-'} "
                     f"| {f['shared_read_bytes'] / 1024:.1f} | {f['global_loaded_bytes'] / 1024:.1f} / "
                     f"{f['global_stored_bytes'] / 1024:.1f} | {f['gather_bytes'] / 1024:.1f} "
                     f"| {f['weight_loads_in_loop']:g} | {f['round_trips']:g} | {f['mufu']:g} "
                     f"| {f['stores_before_release']} |")
    return "\n".join(lines)


def format_estimates(rows) -> str:
    lines = [f"Per-step time of one layer on an H200 ({LABEL}), µs; forward+backward includes the GEMMs "
             "outside the loop.", "",
             "| cell | dtype | H | B | plan | forward µs/step | fwd+bwd µs/step | MMA eff. at H (fwd) |",
             "|---|---|---|---|---|---|---|---|"]
    for e in rows:
        plan = "torch fallback" if e["plan"] is None else \
            f"{e['plan']['variant']} {e['plan']['block_h']}"
        H = f"{e['heads']} x {e['H']}" if "heads" in e else e["H"]  # heads x head size
        if "fwd" not in e:
            lines.append(f"| {e['cell']} | {e['dtype']} | {H} | {e['B']} | {plan} | {e.get('reason', '')} | | |")
            continue
        eff = e["fwd"]["mma_efficiency_at_H"]
        lines.append(f"| {e['cell']} | {e['dtype']} | {H} | {e['B']} | {plan} | {_range(e['fwd']['us'])} "
                     f"| {_range(e['fwd_bwd']['us'])} | {'-' if eff is None else f'{eff:.3f}'} |")
    return "\n".join(lines)


def format_cycles(terms) -> str:
    """{name: (lo, hi)} as "name lo-hi, ..." (one number where lo == hi)."""
    return ", ".join(f"{k} {lo:.0f}" + (f"-{hi:.0f}" if hi != lo else "") for k, (lo, hi) in terms.items())


def breakdown(e) -> str:
    """The terms of one estimate, in cycles, for the anchor's note."""
    lines = []
    for mode in ("fwd", "bwd"):
        m = e[mode]
        terms, lat = format_cycles(m["terms"]), format_cycles(m["latency"])
        lines.append(f"- {mode} ({m['build']}, {m['programs']} programs): compute {m['compute_cycles'][0]:.0f}-"
                     f"{m['compute_cycles'][1]:.0f} cycles (pipes: {terms}); latency: {lat}; GEMMs outside "
                     f"the loop {m['gemm_cycles']:.0f}-{2 * m['gemm_cycles']:.0f}; = {_range(m['us'])} µs/step")
    return "\n".join(lines)


def anchor_line(results) -> tuple:
    a = CUDNN_ANCHOR
    e = estimate(results, a["cell"], a["H"], a["B"], getattr(torch, a["dtype"]))
    cud_fwd, cud_all = a["fwd_ms"] * 1e3 / a["T"], a["fwd_bwd_ms"] * 1e3 / a["T"]
    if "fwd" not in e:
        return e, f"LSTM H=768 B=16 bf16: {e.get('reason')}"
    f, fb = e["fwd"]["us"], e["fwd_bwd"]["us"]
    text = (f"LSTM H=768 B=16 bf16 ({LABEL}): forward {_range(f)} µs/step against cuDNN's {cud_fwd:.2f} "
            f"(ratio {f[0] / cud_fwd:.1f}-{f[1] / cud_fwd:.1f}x); forward+backward {_range(fb)} against "
            f"{cud_all:.2f} (ratio {fb[0] / cud_all:.1f}-{fb[1] / cud_all:.1f}x). cuDNN: published H100 SXM "
            f"times, T=1024 ({a['fwd_ms']} / {a['fwd_bwd_ms']} ms).")
    return e, text


def plot(rows, path) -> None:
    """Estimated µs/step against H per cell (bf16, B=16), forward and forward+backward, cuDNN's
    anchor marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwd_bwd", "forward+backward")):
        for cell, color in zip(ESTIMATE_GRID, ("C0", "C1", "C2")):
            pts = [(e["H"], e[mode]["us"]) for e in rows if e["cell"] == cell and e["B"] == 16
                   and e["dtype"] == "bfloat16" and mode in e and "heads" not in e]
            if not pts:
                continue
            hs = [p[0] for p in pts]
            ax.fill_between(hs, [p[1][0] for p in pts], [p[1][1] for p in pts], color=color, alpha=0.25)
            ax.plot(hs, [(p[1][0] + p[1][1]) / 2 for p in pts], "o-", color=color, label=cell)
        a = CUDNN_ANCHOR
        ax.plot([a["H"]], [(a["fwd_ms"] if mode == "fwd" else a["fwd_bwd_ms"]) * 1e3 / a["T"]], "k*",
                markersize=14, label="cuDNN LSTM, H100 (published)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden size H")
        ax.set_title(f"{title}, bf16, B=16")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("µs per step (range: low..high)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"rnn_triton per-step time on an H200: {LABEL}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Title": f"rnn_triton per-step time on an H200: {LABEL}"})
    plt.close(fig)


def committed_estimates(path=OUT_DIR / "static_cost.json") -> dict:
    """The committed estimates by (cell, H, B, dtype name), for a report to put beside measurements
    (reading the committed table needs no compiler, and no build of this Triton version)."""
    if not Path(path).exists():
        return {}
    rows = json.loads(Path(path).read_text())["estimates"]
    return {(e["cell"], e["H"], e["B"], e["dtype"]): e for e in rows if "fwd" in e and "heads" not in e}


def report_section(out_dir, measured=(), path=OUT_DIR / "static_cost.json") -> list:
    """Markdown lines for a benchmark report in ``out_dir``: the committed static table's anchor and plot
    (linked where it is committed: it is not this run's figure), and, for measured rnn_triton rows
    (bench/run.py results on a GPU), the estimate of the same layer beside the measured µs/step, so the
    model gets checked."""
    if not Path(path).exists():
        return []
    data = json.loads(Path(path).read_text())
    plot_file = Path(path).with_name("static_cost.png")
    lines = ["## Static cost model (sm_90): " + LABEL, "",
             "Per-step time read from the compiled code of each kernel (`python -m rnn_triton.static_cost`; "
             "the whole table: `reports/static/STATIC.md`). " + anchor_summary(data.get("anchor", {})), ""]
    if plot_file.exists():
        link = os.path.relpath(plot_file, os.path.abspath(out_dir))
        lines += [f"![{plot_file.name}]({link})", "",
                  f"*Estimated µs per step against H, bf16, B=16 ({LABEL}); the star is cuDNN's published "
                  "H100 LSTM time at H=768.*", ""]
    table = committed_estimates(path)
    pairs = []
    for r in measured:
        c = r["config"]
        e = table.get((c["cell"], c["H"], c["B"], c["dtype"]))
        mode = {"forward": "fwd", "forward+backward": "fwd_bwd"}.get(r.get("mode"))
        if e is None or mode is None or c.get("layers", 1) != 1 or c.get("bidirectional"):
            continue
        lo, hi = e[mode]["us"]
        pairs.append(f"| {c['cell']} | {c['dtype']} | {c['H']} | {c['B']} | {r['mode']} | {lo:.2f}-{hi:.2f} "
                     f"| {r['us_per_step']:.2f} | {'inside' if lo <= r['us_per_step'] <= hi else 'OUTSIDE'} |")
    if pairs:
        lines += ["Estimate against measurement (one layer, one direction; the measurement includes the GEMMs "
                  "outside the loop, as the estimate does):", "",
                  "| cell | dtype | H | B | mode | estimated µs/step | measured µs/step | |", "|---|---|---|---|---|---|---|---|"]
        lines += pairs + [""]
    return lines


def anchor_summary(anchor) -> str:
    if "fwd" not in anchor:
        return ""
    a = CUDNN_ANCHOR
    cud = (a["fwd_ms"] * 1e3 / a["T"], a["fwd_bwd_ms"] * 1e3 / a["T"])
    f, fb = anchor["fwd"]["us"], anchor["fwd_bwd"]["us"]
    return (f"LSTM H=768 B=16 bf16, estimated: forward {_range(f)} µs/step (cuDNN on an H100, published: "
            f"{cud[0]:.2f}), forward+backward {_range(fb)} ({cud[1]:.2f}).")


def analyse(jobs: int = 1):
    """The compile check's dispatcher builds (cached) and their facts, by configuration id."""
    results = compile_check.run(compile_check.dispatcher_configs(), jobs)
    chosen = [r for r in results if compile_check.is_dispatcher_config(r)]
    return chosen, [(config_id(r), facts(r)) for r in chosen]


def check(fact_rows, baseline) -> list:
    """Failures: a configuration without a MMA efficiency, below its baseline, missing from it, with
    tensor-core dots below ``MMA_FLOOR`` (but ``MMA_FLOOR_EXCEPTIONS``), or
    reading W_hh from global memory inside its loop where the design keeps W_hh on chip (everywhere
    but the cooperative backward that re-reads it in chunks)."""
    bad = []
    for cid, f in fact_rows:
        if "error" in f:
            bad.append(f"{cid}: {f['error']}")
            continue
        eff = f["mma_efficiency"]
        if eff is None:
            bad.append(f"{cid}: no MMA efficiency")
        elif cid not in baseline:
            bad.append(f"{cid}: not in {BASELINE_FILE.name} (python -m rnn_triton.static_cost --write-baseline)")
        elif eff < baseline[cid] - 1e-6:
            bad.append(f"{cid}: MMA efficiency {eff:.4f} below its baseline {baseline[cid]:.4f}")
        elif f["mma"] and eff < MMA_FLOOR and tuple(cid.split("/")[1:4]) + (int(cid.split("/")[4]),) \
                not in MMA_FLOOR_EXCEPTIONS:
            bad.append(f"{cid}: MMA efficiency {eff:.4f} below the floor {MMA_FLOOR}")
        if f["weight_loads_in_loop"] and not f["w_chunk"]:
            bad.append(f"{cid}: {f['weight_loads_in_loop']:g} W_hh global loads inside the time loop")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT_DIR), help="where STATIC.md, static_cost.json and the plot go")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--check", action="store_true", help="fail on a regression against the baseline")
    parser.add_argument("--write-baseline", action="store_true", help="record the MMA efficiencies as the floor")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    compile_check.refuse_interpreter(parser)
    results, fact_rows = analyse(args.jobs)
    rows = estimates(results)
    anchor, anchor_text = anchor_line(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(format_facts(fact_rows))
    print()
    print(format_estimates(rows))
    print()
    print(anchor_text)
    if "fwd" in anchor:
        print(breakdown(anchor))
    (out / "static_cost.json").write_text(json.dumps(
        {"label": LABEL, "facts": dict(fact_rows), "estimates": rows, "anchor": anchor,
         "constants": {"clock_ghz": CLOCK_GHZ, "l2_cycles": L2_CYCLES, "hbm_cycles": HBM_CYCLES,
                       "l2_bytes_per_cycle": L2_BYTES_PER_CYCLE, "shared_bytes_per_cycle": SHARED_BYTES_PER_CYCLE,
                       "tensor_macs_per_cycle": TENSOR_MACS_PER_CYCLE, "hmma_slowdown": HMMA_SLOWDOWN,
                       "fp32_per_cycle": FP32_PER_CYCLE, "sfu_per_cycle": SFU_PER_CYCLE,
                       "barrier_round_trips": BARRIER_ROUND_TRIPS}}, indent=1, sort_keys=True, default=list))
    if not args.no_plot:
        plot(rows, out / "static_cost.png")
    (out / "STATIC.md").write_text(markdown(fact_rows, rows, anchor, anchor_text))
    if args.write_baseline:
        BASELINE_FILE.write_text(json.dumps({cid: f["mma_efficiency"] for cid, f in fact_rows
                                             if "error" not in f}, indent=1, sort_keys=True) + "\n")
    if args.check:
        baseline = json.loads(BASELINE_FILE.read_text()) if BASELINE_FILE.exists() else {}
        bad = check(fact_rows, baseline)
        print("\n".join(bad) if bad else f"static check: {len(fact_rows)} configurations, none below its baseline, "
                                           "no W_hh reloads outside the chunked backward")
        return 1 if bad else 0
    return 0


def markdown(fact_rows, rows, anchor, anchor_text) -> str:
    effs = [f["mma_efficiency"] for _, f in fact_rows if f.get("mma_efficiency") is not None]
    low = sorted(((f["mma_efficiency"], cid) for cid, f in fact_rows if f.get("mma_efficiency") is not None))[:5]
    parts = [
        "# Static per-step cost (sm_90): " + LABEL, "",
        "Made by `python -m rnn_triton.static_cost` from the builds of `python -m rnn_triton.compile_check` "
        "(committed: `sm90_builds.jsonl`). What the terms mean and where each constant comes from: the "
        "docstring and constants of `rnn_triton/static_cost.py`; how the SASS is read: `rnn_triton/sass.py`.", "",
        "## The anchor", "", anchor_text, "",
        breakdown(anchor) if "fwd" in anchor else "", "",
        "## Estimates", "", format_estimates(rows), "",
        "![estimated µs/step against H](static_cost.png)", "",
        f"*Estimated per-step time against H (bf16, B=16), forward and forward+backward; the band is the "
        f"low..high range, the star cuDNN's published H100 time for the LSTM at H=768. {LABEL}.*", "",
        "## Facts per build (per time step of one program, nominal size, one batch tile)", "",
        f"{len(fact_rows)} dispatcher builds; MMA efficiency from {min(effs):.3f} to {max(effs):.3f}; lowest: "
        + ", ".join(f"{cid} {e:.3f}" for e, cid in low) + ".", "",
        "Columns: MMA issued = tensor-core instructions all warps of the program issue (HMMA per warp, "
        "HGMMA per warp of a warpgroup); MMA eff. = useful multiply-adds (gates x units x rows x K) over "
        "issued (FFMA counted as issued multiply-adds where the dot runs on FMA); smem read = LDS/LDSM and "
        "wgmma operand bytes; L2 gather = `.cg` (LDG.STRONG.GPU) bytes of other programs' state; round "
        "trips = global-memory waits on the step's path; stores before release = global stores the grid "
        "barrier's MEMBAR waits for.", "",
        format_facts(fact_rows), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
