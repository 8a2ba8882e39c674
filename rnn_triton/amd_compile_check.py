"""Compile every configuration the dispatcher can choose on AMD Instinct GPUs, with no GPU and no ROCm.

    python -m rnn_triton.amd_compile_check                  # gfx942 (MI300) and gfx90a (MI200) tables
    python -m rnn_triton.amd_compile_check --probe          # also the next size up, to show the limit
    python -m rnn_triton.amd_compile_check --probe --write-builds   # refresh the committed results
    python -m rnn_triton.amd_compile_check --barrier        # the grid barrier's lowering, as JSON

The triton wheel compiles for AMD targets on a CPU (``GPUTarget("hip", arch, 64)``: LLVM's AMDGPU
backend, no ROCm install). For each build the AMDGPU kernel metadata of its assembly gives VGPRs,
AGPRs, SGPRs, VGPR and SGPR spills and scratch bytes; Triton's metadata its LDS bytes. From them:
waves per SIMD (the occupancy its VGPRs allow) and the MFMA efficiency of its time loop (useful MACs
per step over those its MFMA instructions issue on all its waves: 1.0 means no wave repeats another's
product). A configuration passes without VGPR spills or scratch, within one CU's LDS (64 KB), with
every wave of its workgroup resident at once, and, for a cooperative build, within the VGPRs and LDS
``dispatch.AMD_COOP_CONFIGS`` declares (the capacity model counts resident programs from those).

The grid barrier on AMD (cooperative kernels): ``tl.atomic_add(sem="acquire"/"release",
scope="gpu")`` lowers to the agent-scope sequences of LLVM's AMDGPU memory model
(https://llvm.org/docs/AMDGPUUsage.html, "Memory Model GFX942" and "GFX90A"); ``barrier_lowering``
reads them from the assembly and the tests assert them:

- arrive (release): gfx942 ``buffer_wbl2 sc1`` (write dirty L2 lines back: MI300's XCDs each have
  their own L2, so h_t must reach memory the other XCDs read), then ``s_waitcnt vmcnt(0)`` (every
  earlier store done; on gfx9 vmcnt counts stores too), then the ``global_atomic_add`` on the counter.
  gfx90a has one L2 per die (a ROCm device), coherent at agent scope: ``s_waitcnt vmcnt(0)`` alone;
- wait (acquire): the polling atomic returns the value (gfx942 ``sc0``, gfx90a ``glc``), then
  ``s_waitcnt vmcnt(0)`` and ``buffer_inv sc1`` (gfx942) / ``buffer_wbinvl1_vol`` (gfx90a): the CU's
  non-coherent vector L1 (and on gfx942 the L2's lines of other XCDs) are invalidated before any
  later load, so the loads of other programs' slices of h_t read what they stored.
- those loads (``cache_modifier=".cg"``, on sm_90 the L1 bypass) become ``nt`` (gfx942) / ``glc``
  (gfx90a) loads: their freshness comes from the acquire's invalidation, which precedes them in the
  same thread, as the memory model requires; the modifier only adds a streaming hint.

Results are kept by build key (Triton's cache key for that target) in ``BUILDS_FILE`` (committed), so
CI compiles only kernels whose source changed. Not measured on AMD hardware: no AMD GPU was available.
"""
import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import torch

from . import compile_check
from .compile_check import _ROOT, NEVER_DIVISIBLE, _signature, kernel_and_constexprs

BUILDS_FILE = _ROOT / "reports" / "static" / "amd_builds.jsonl"
ARCHS = ("gfx942", "gfx90a")
#: LDS one workgroup may use on CDNA2/CDNA3 (AMD CDNA3 ISA reference, 2.2: 64 KB per CU).
LDS_LIMIT = 64 * 1024
#: Per SIMD lane: 512 VGPRs (unified VGPR + AGPR file), allocated in granules of 8; at most 8 waves
#: per SIMD; 4 SIMDs per CU (LLVM AMDGPU: getVGPRAllocGranule, getMaxWavesPerEU for gfx90a/gfx942).
VGPRS_PER_LANE, VGPR_GRANULE, MAX_WAVES_PER_SIMD, SIMDS_PER_CU = 512, 8, 8, 4


@dataclass
class AmdResult:
    arch: str
    kernel: str
    cell: str
    dtype: str
    block_h: int
    block_b: int
    num_warps: int      # wavefronts of 64
    precision: str
    block_u: int = 0
    w_chunk: int = 0
    vgprs: int = 0      # architected VGPRs + AGPRs (the unified file's share of one lane)
    agprs: int = 0
    sgprs: int = 0
    vgpr_spills: int = 0
    sgpr_spills: int = 0
    scratch_bytes: int = 0
    lds_bytes: int = 0
    mfma: dict = field(default_factory=dict)  # MFMA instructions in the time loop, by name
    mfma_efficiency: float = 0.0
    error: str = ""
    key: str = ""
    cached: bool = False

    @property
    def waves_per_simd(self) -> int:
        """How many waves of this kernel one SIMD holds by its VGPRs."""
        allocated = max(VGPR_GRANULE, -(-self.vgprs // VGPR_GRANULE) * VGPR_GRANULE)
        return min(MAX_WAVES_PER_SIMD, VGPRS_PER_LANE // allocated)

    @property
    def ok(self) -> bool:
        if self.error or self.vgpr_spills or self.scratch_bytes or self.lds_bytes > LDS_LIMIT:
            return False
        if self.waves_per_simd * SIMDS_PER_CU < self.num_warps:  # a workgroup's waves all resident
            return False
        if self.kernel.startswith("coop"):
            from .dispatch import coop_config
            declared = coop_config(self.cell, getattr(torch, self.dtype), self.block_h, self.precision, self.arch)
            return declared is None or (self.vgprs <= declared.registers and self.lds_bytes <= declared.shared_bytes)
        return True


def compile_one(arch: str, kernel: str, cell_name: str, dtype: torch.dtype, block_h: int, block_b: int,
                num_warps: int, precision: str = "ieee", block_u: int = 0, w_chunk: int = 0,
                cached: bool = True) -> AmdResult:
    """Compile one configuration (``compile_check.compile_one``'s kernels, aligned) for ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compiler as tc

    res = AmdResult(arch, kernel, cell_name, str(dtype).replace("torch.", ""), block_h, block_b, num_warps,
                    precision, block_u, w_chunk)
    fn, constexprs = kernel_and_constexprs(kernel, cell_name, dtype, block_h, block_b, num_warps, precision,
                                           block_u, w_chunk)
    sig = _signature(fn, dtype, constexprs)
    never = NEVER_DIVISIBLE + tuple(getattr(fn, "do_not_specialize", ()))  # as compile_check.compile_one
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and name not in never}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 1}
    target = GPUTarget("hip", arch, 64)
    backend = tc.make_backend(target)
    res.key = hashlib.sha256(tc.get_cache_key(src, backend, backend.parse_options(dict(options)),
                                              env_vars=tc.get_cache_invalidating_env_vars()).encode()).hexdigest()
    known = _builds().get(res.key) if cached else None
    if known is not None:
        for name in ("vgprs", "agprs", "sgprs", "vgpr_spills", "sgpr_spills", "scratch_bytes", "lds_bytes", "mfma",
                     "mfma_efficiency"):
            setattr(res, name, known[name])
        res.cached = True
        return res
    try:
        compiled = triton.compile(src, target=target, options=options)
    except Exception as exc:  # a failed compile is a result to report, not a crash of the check
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return res
    asm = compiled.asm["amdgcn"]
    meta = {k: int(v) for k, v in re.findall(r"^\s*-?\s*\.(\w+):\s+(\d+)\s*$", asm, re.M)}
    res.agprs = meta.get("agpr_count", 0)
    accum = re.search(r"\.amdhsa_accum_offset (\d+)", asm)
    res.vgprs = (int(accum.group(1)) if accum and res.agprs else meta.get("vgpr_count", 0)) + res.agprs
    res.sgprs, res.vgpr_spills = meta.get("sgpr_count", 0), meta.get("vgpr_spill_count", 0)
    res.sgpr_spills, res.scratch_bytes = meta.get("sgpr_spill_count", 0), meta.get("private_segment_fixed_size", 0)
    res.lds_bytes = compiled.metadata.shared
    res.mfma = time_loop_mfma(asm)
    res.mfma_efficiency = _mfma_efficiency(res)
    return res


def time_loop_mfma(asm: str) -> dict:
    """MFMA instructions (by name) in the kernel's outermost loop: the body between the label that
    its widest backward branch jumps to and that branch (the time loop; the barrier's spin and a
    chunked re-read are loops inside it, counted once)."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.LBB\w+):", line))}
    branches = [(i, m.group(1)) for i, line in enumerate(lines)
                if (m := re.search(r"\bs_(?:cbranch_\w+|branch)\s+(\.LBB\w+)", line))]
    spans = [(labels[target], i) for i, target in branches if labels.get(target, i) < i]
    if not spans:
        return {}
    start, end = max(spans, key=lambda s: s[1] - s[0])
    counts = {}
    for line in lines[start:end]:
        if m := re.match(r"\s*(v_mfma_\w+)", line):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def _mfma_efficiency(r: AmdResult) -> float:
    """Useful MACs of one step (a program's gates x units x K x BLOCK_B) over the MACs its time loop's
    MFMA instructions issue on all its waves; 0 where the loop has none (FMA dots)."""
    from .dispatch import CELLS, k_tiles
    issued = 0
    for name, count in r.mfma.items():
        shape = re.search(r"_(\d+)x(\d+)x(\d+)", name)
        if shape:
            m, n, k = map(int, shape.groups())
            blocks = 1 if m >= 16 else 16  # the 4x4 forms run 16 blocks at once
            issued += count * m * n * k * blocks
    if not issued:
        return 0.0
    units = r.block_u if r.kernel.startswith("coop") else r.block_h
    k = sum(k_tiles(r.block_h).values()) if r.kernel.startswith("coop") else r.block_h
    # a chunk loop's body (the whole chunked product) appears once in the time loop and runs per chunk
    chunks = -(-k // r.w_chunk) if r.w_chunk and r.kernel.startswith("coop") else 1
    useful = CELLS[r.cell].num_gates * units * k * r.block_b  # (a two-direction build: one per program)
    return round(useful / (issued * chunks * r.num_warps), 4)


_BUILDS = None


def _builds() -> dict:
    global _BUILDS
    if _BUILDS is None:
        _BUILDS = {}
        if BUILDS_FILE.exists():
            for line in BUILDS_FILE.read_text().splitlines():
                entry = json.loads(line)
                _BUILDS[entry["key"]] = entry
    return _BUILDS


def write_builds(results, replace: bool = True) -> None:
    entries = {} if replace else dict(_builds())
    for r in results:
        if r.key and not r.error:
            entries[r.key] = {k: v for k, v in asdict(r).items() if k not in ("error", "cached")}
    BUILDS_FILE.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for _, e in sorted(entries.items())))


def dispatcher_configs(arch: str, probe: bool = False):
    """Every (kernel, cell, dtype, block_h, block_b, num_warps, precision, block_u, w_chunk) the
    dispatcher can choose on ``arch`` (float32 in each precision the target has), with the packed tile
    builds that ``dispatch.PACKED_COOPERATIVE`` excludes; with ``probe``, the next size up too."""
    from .compile_check import tile_kernels
    from .dispatch import AMD_COOP_CONFIGS, AMD_TILE_CONFIGS, BLOCK_B, BLOCK_U, fp32_precisions
    configs = []
    for (cell, dtype), table in AMD_TILE_CONFIGS[arch].items():
        sizes = list(table) + ([2 * max(table)] if probe else [])
        for block_h in sizes:
            for kernel in tile_kernels(cell):
                for precision in fp32_precisions(arch, cell) if dtype == torch.float32 else ("ieee",):
                    configs.append((kernel, cell, dtype, block_h, BLOCK_B, table[min(block_h, max(table))],
                                    precision, 0, 0))
    for (cell, dtype), table in AMD_COOP_CONFIGS[arch].items():
        top = max(table)
        for block_k, entry in list(table.items()) + ([(2 * top, table[top])] if probe else []):
            for kernel in ("coop_fwd", "coop_bwd", "coop_fwd_packed", "coop_bwd_packed"):
                for precision in fp32_precisions(arch) if dtype == torch.float32 else ("ieee",):
                    c = entry.ieee if precision == "ieee" and entry.ieee else entry
                    configs.append((kernel, cell, dtype, block_k, BLOCK_B, c.num_warps, precision, BLOCK_U,
                                    c.w_chunk if "bwd" in kernel else c.fwd_chunk))
    return configs


def is_dispatcher_config(r: AmdResult) -> bool:
    from .dispatch import AMD_TILE_CONFIGS, PACKED_COOPERATIVE, coop_config
    dtype = getattr(torch, r.dtype)
    if r.kernel.startswith("coop"):
        c = coop_config(r.cell, dtype, r.block_h, r.precision, r.arch)
        return c is not None and c.num_warps == r.num_warps and r.w_chunk == (
            c.w_chunk if "bwd" in r.kernel else c.fwd_chunk)
    table = AMD_TILE_CONFIGS[r.arch][(r.cell, dtype)]
    return table.get(r.block_h) == r.num_warps and not (
        "_packed" in r.kernel and (r.cell, dtype, r.block_h) in PACKED_COOPERATIVE)


def barrier_lowering(arch: str) -> dict:
    """The cooperative forward's grid barrier and exchange loads as compiled for ``arch`` (LSTM, bf16,
    K 256): the release sequence before the arriving atomic, the acquire sequence after the polling
    one, and the modifiers of the 128-bit loads (the exchange of h_t among them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, constexprs = kernel_and_constexprs("coop_fwd", "LSTM", torch.bfloat16, 256, 16, 8, "ieee", 16, 0)
    sig = _signature(fn, torch.bfloat16, constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and name not in NEVER_DIVISIBLE}
    asm = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("hip", arch, 64),
                         options={"num_warps": 8, "num_stages": 1}).asm["amdgcn"]
    lines = [line.split(";")[0].strip() for line in asm.splitlines()]
    lines = [line for line in lines if line and not line.endswith(":")]  # instructions only
    atomics = [i for i, line in enumerate(lines) if line.startswith("global_atomic")]
    returning = [i for i in atomics if re.search(r"\b(glc|sc0)\b", lines[i])]  # the polls read the counter
    arrives = [i for i in atomics if i not in returning]
    return {"release": [lines[i - 2:i + 1] for i in arrives],
            "acquire": [lines[i:i + 3] for i in returning],
            "loads": sorted({line.split(" off")[-1].strip() or "(none)" for line in lines
                             if line.startswith("global_load_dwordx4")})}


def format_table(results) -> str:
    lines = ["| arch | kernel | cell | dtype | BLOCK_H | BLOCK_U | waves | VGPRs | AGPRs | SGPRs | VGPR spills "
             "| scratch (B) | LDS (KB) | waves/SIMD | MFMA eff. | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fits = "yes" if r.ok else ("compile error: " + r.error if r.error else "NO")
        dtype = r.dtype + (" (tf32)" if r.precision == "tf32" else "")
        lines.append(f"| {r.arch} | {r.kernel} | {r.cell} | {dtype} | {r.block_h} | {r.block_u or '-'} "
                     f"| {r.num_warps} | {r.vgprs} | {r.agprs} | {r.sgprs} | {r.vgpr_spills} | {r.scratch_bytes} "
                     f"| {r.lds_bytes / 1024:.1f} | {r.waves_per_simd} | {r.mfma_efficiency or '-'} | {fits} |")
    return "\n".join(lines)


def _call(args):
    return compile_one(*args)


def run(configs, jobs: int = 1):
    from concurrent.futures import ProcessPoolExecutor
    if jobs <= 1:
        return [compile_one(*c) for c in configs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_call, configs, chunksize=4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--probe", action="store_true", help="also compile the next size up")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--write-builds", action="store_true", help="save the results as the committed ones")
    parser.add_argument("--barrier", action="store_true",
                        help="print the grid barrier's lowering per architecture (JSON) and stop")
    args = parser.parse_args(argv)
    compile_check.refuse_interpreter(parser)
    if args.barrier:
        print(json.dumps({arch: barrier_lowering(arch) for arch in args.arch}))
        return 0
    configs = [(arch, *c) for arch in args.arch for c in dispatcher_configs(arch, args.probe)]
    results = run(configs, args.jobs)
    table = format_table(results)
    print(table)
    chosen = [r for r in results if is_dispatcher_config(r)]
    failed = [r for r in chosen if not r.ok]
    summary = f"{len(chosen) - len(failed)} of {len(chosen)} dispatcher configurations fit on {', '.join(args.arch)}."
    print("\n" + summary)
    print(f"{sum(r.cached for r in results)} of {len(results)} builds from the committed results "
          f"({BUILDS_FILE.name}), {sum(not r.cached for r in results)} compiled.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok, "waves_per_simd": r.waves_per_simd} for r in results], f, indent=1)
    if args.write_builds:
        write_builds(results, replace=args.arch == list(ARCHS))
        BUILDS_FILE.with_name("AMD_COMPILE.md").write_text(
            "# AMD compile table (gfx942: MI300, gfx90a: MI200)\n\nMade by `python -m rnn_triton.amd_compile_check "
            f"--probe --write-builds` (no GPU: compiled with the triton wheel's AMDGPU backend). {summary} "
            "Compiled and checked, never run on AMD hardware.\n\nColumns: waves = wavefronts of 64 per workgroup; "
            "VGPRs = architected + accumulation registers per lane; VGPR spills and scratch must be 0; LDS per "
            "workgroup (64 KB at most); waves/SIMD = the occupancy its VGPRs allow (512 per lane, granule 8, "
            "at most 8); MFMA eff. = useful MACs of a step over those its time loop's MFMA instructions issue "
            "on all waves (- : FMA dots); fits = no spill, within LDS, every wave of a workgroup resident "
            "and, cooperative, within what `dispatch.AMD_COOP_CONFIGS` declares. Rows past the limits "
            "(--probe) are expected not to fit.\n\n" + table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
