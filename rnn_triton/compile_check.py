"""Compile every kernel configuration the dispatcher can choose for sm_90 (H100/H200), with no GPU.

    python -m rnn_triton.compile_check            # table of the dispatcher's configurations
    python -m rnn_triton.compile_check --probe    # also the next size up, to show where the limit is
    python -m rnn_triton.compile_check --kernels coop_fwd_packed coop_bwd_packed   # only these kernels
    python -m rnn_triton.compile_check --probe --write-builds   # refresh the committed build results

For each configuration: registers, spills (cuobjdump's STACK/LOCAL bytes), dynamic shared memory,
whether tensor-core instructions (mma/wgmma) are in the PTX, the MMA layouts of its TTGIR, and the
SASS analysis of its loops (``sass.analyze``: per-iteration instructions, bytes, round trips; the
static cost model, ``static_cost``, reads it). A configuration passes when it does not spill, its
shared memory fits in an SM (227 KB) and its registers in one block's share of the register file (64 K:
a build past it launches with an error); a cooperative one also when its registers and shared memory are
within what ``dispatch.COOP_CONFIGS`` declares (the capacity model counts resident programs from
those). Exit status 1 if any dispatcher configuration fails.

Each build is compiled once per source: its results are kept under its build key, a hash of the
kernel's source and of every @triton.jit function it calls (Triton's own ``cache_key``), its signature,
constexprs, alignment, options, target and Triton's version. ``BUILDS_FILE`` (committed) holds the
results of the last full run, so a fresh checkout (CI) compiles only kernels whose source changed;
``--verify N`` compiles N of the cached builds again and fails if any result differs. ``LOCAL_DIR``
(not committed) keeps each cubin, so that a change to the SASS analysis re-reads them without compiling.

Must run without TRITON_INTERPRET (under it, @triton.jit yields interpreter functions, not compilable).
"""
import argparse
import hashlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SM90_SHARED_LIMIT = 227 * 1024
#: Registers one block may hold on sm_90 (the SM's whole file): 16 warps get at most 128 per thread.
#: ptxas does not enforce it under ``maxnreg``: a build past it compiles and then fails to launch.
SM90_REGISTERS_PER_BLOCK = 64 * 1024
_ROOT = Path(__file__).resolve().parents[1]
#: Results of the last full run, one JSON object per line, keyed by build key (committed).
BUILDS_FILE = _ROOT / "reports" / "static" / "sm90_builds.jsonl"
#: cubin and TTGIR of each local build, by build key (ignored by git).
LOCAL_DIR = _ROOT / "build" / "sm90"
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@dataclass
class Result:
    kernel: str
    cell: str
    dtype: str
    block_h: int
    block_b: int
    num_warps: int
    aligned: bool
    precision: str
    block_u: int = 0
    w_chunk: int = 0
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    tensor_cores: bool = False
    error: str = ""
    key: str = ""                                       # the build key (see the module docstring)
    mma_layouts: list = field(default_factory=list)     # TTGIR MMA encodings, e.g. "v2 [8, 1]"
    sass: dict = field(default_factory=dict)            # sass.analyze's loops
    cached: bool = False                                # taken from an earlier build of the same key
    analysis: str = ""                                  # sass.VERSION of the analysis in ``sass``

    @property
    def ok(self) -> bool:
        if self.error or self.spill_bytes or self.shared_bytes > SM90_SHARED_LIMIT or \
                self.registers * 32 * self.num_warps > SM90_REGISTERS_PER_BLOCK:
            return False
        if self.kernel.startswith("coop"):  # within what the capacity model assumes
            from .dispatch import coop_config
            declared = coop_config(self.cell, getattr(torch, self.dtype), self.block_h, self.precision)
            return declared is None or (self.registers <= declared.registers_for(self.kernel.endswith("_packed"))
                                        and self.shared_bytes <= declared.shared_bytes)
        return True


def _signature(fn, dtype, constexprs):
    """Pointer args in the storage dtype, the carry in fp32, ints as i32, constexprs as such."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("sync_ptr", "error_ptr", "lengths_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name == "carry_ptr" else _PTR[dtype]
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel: str, cell_name: str, dtype: torch.dtype, block_h: int, block_b: int,
                num_warps: int, aligned: bool = False, precision: str = "ieee", block_u: int = 0,
                w_chunk: int = 0, cached: bool = True) -> Result:
    """Compile one configuration: ``kernel`` is fwd / bwd (tile-persistent) or coop_fwd / coop_bwd
    (cooperative, built with its barrier), each also as *_packed (with per-row lengths). ``aligned``
    mirrors the launch-time specialisation Triton applies when H (hence every stride) is a multiple
    of 16: pointers and integers divisible by 16. Without it, nothing is assumed, as for H = 100."""
    fn, constexprs = kernel_and_constexprs(kernel, cell_name, dtype, block_h, block_b, num_warps, precision,
                                           block_u, w_chunk)
    res = Result(*_result_fields(kernel, cell_name, dtype, block_h, block_b, num_warps, aligned, precision, block_u,
                                 w_chunk))
    from .dispatch import MAXNREG
    # and what the kernel never specialises (the tile kernels' sizes: kernels/persistent.py)
    never = NEVER_DIVISIBLE + tuple(getattr(fn, "do_not_specialize", ()))
    return measure(res, fn, _signature(fn, dtype, constexprs), constexprs, never, num_warps,
                   cached=cached, maxnreg=MAXNREG)


#: Integer arguments a build never assumes divisible by 16.
NEVER_DIVISIBLE = ("T", "reverse", "s_begin", "s_end", "max_spins")


def kernel_and_constexprs(kernel: str, cell_name: str, dtype: torch.dtype, block_h: int, block_b: int,
                          num_warps: int, precision: str, block_u: int = 0, w_chunk: int = 0):
    """The @triton.jit kernel of a configuration (see ``compile_one``) and its constexprs."""
    import triton.language as tl

    from .dispatch import CELLS, k_tiles
    from .kernels.cooperative import cooperative_bwd_kernel, cooperative_fwd_kernel
    from .kernels.persistent import persistent_bwd_kernel, persistent_fwd_kernel

    cell = CELLS[cell_name]
    base = kernel.removesuffix("_bidir").replace("_states", "")
    fn = {"fwd": persistent_fwd_kernel, "bwd": persistent_bwd_kernel, "fwd_packed": persistent_fwd_kernel,
          "bwd_packed": persistent_bwd_kernel, "coop_fwd": cooperative_fwd_kernel,
          "coop_bwd": cooperative_bwd_kernel, "coop_fwd_packed": cooperative_fwd_kernel,
          "coop_bwd_packed": cooperative_bwd_kernel}[base]
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
    constexprs = dict(CELL=cell.kernel_id, NUM_GATES=cell.num_gates, NUM_SAVED=cell.num_saved,
                      HAS_H0=True, BLOCK_B=block_b, DOT_DTYPE=dot, ACC=tl.float32, PRECISION=precision)
    # "_packed": with per-row lengths (PackedSequence input), a heavier build
    constexprs["HAS_LENGTHS"] = "_packed" in kernel
    if kernel.startswith("coop"):
        constexprs.update(BLOCK_U=block_u, SPLIT=num_warps, COOPERATIVE=True, W_CHUNK=w_chunk,
                          **k_tiles(block_h))
    else:
        constexprs.update(BLOCK_H=block_h, GROUPED=kernel.endswith("_bidir"), NUM_C=max(cell.num_c, 1))
        if "bwd" in kernel:
            constexprs["STATE_GRADS"] = "_states" in kernel
    if "fwd" in kernel:
        constexprs["SAVE"] = True
    return fn, constexprs


def measure(res, fn, sig, constexprs, never_divisible, num_warps, num_stages=1, cached=True, maxnreg=None):
    """Compile ``fn`` for sm_90 and fill ``res``'s registers, spill_bytes, shared_bytes, tensor_cores,
    mma_layouts and sass, or its error. With ``res.aligned``, every pointer and integer argument but
    ``never_divisible`` is assumed divisible by 16, as Triton specialises them at launch. With
    ``cached``, a build key already in ``BUILDS_FILE`` (or ``LOCAL_DIR``) is not compiled again.
    ``maxnreg``: ptxas' register bound, as the launch passes it (the time loops' kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import sass

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if res.aligned and sig[name] != "constexpr" and name not in never_divisible}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    res.key = build_key(src, options)
    known = _builds().get(res.key) if cached else None
    if known is not None and known.get("analysis") == analysis_version():
        _fill(res, known)
        res.cached, res.analysis = True, known["analysis"]
        return res
    local = LOCAL_DIR / res.key
    if cached and local.with_suffix(".cubin").exists():  # compiled before: read the SASS again
        facts = json.loads(local.with_suffix(".json").read_text())
        cubin, ttgir = local.with_suffix(".cubin").read_bytes(), local.with_suffix(".ttgir").read_text()
    else:
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as exc:  # a failed compile is a result to report, not a crash of the check
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            return res
        cubin, ttgir = compiled.asm["cubin"], compiled.asm["ttgir"]
        registers, spills = _resource_usage(cubin)
        facts = {"registers": registers, "spill_bytes": spills, "shared_bytes": compiled.metadata.shared,
                 "tensor_cores": bool(re.search(r"\b(mma|wgmma)\.", compiled.asm["ptx"]))}
        LOCAL_DIR.mkdir(parents=True, exist_ok=True)
        local.with_suffix(".cubin").write_bytes(cubin)
        local.with_suffix(".ttgir").write_text(ttgir)
        local.with_suffix(".json").write_text(json.dumps(facts))
    try:
        analysis = sass.analyze(cubin, source_tags())
    except Exception as exc:  # keep the compile's results; the analysis' failure shows in the table
        analysis = {"error": f"{type(exc).__name__}: {exc}"}
    _fill(res, dict(facts, mma_layouts=mma_layouts(ttgir), sass=analysis))
    res.analysis = analysis_version()  # of the code that analysed it (a worker's, not the parent's)
    return res


def build_key(src, options) -> str:
    """The key Triton's own cache gives this compile for sm_90 (its source and every @triton.jit
    function it calls, signature, constexprs, attributes, Triton's own code, the backend and its ptxas,
    the parsed options and the environment variables that change a compile), hashed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler as tc

    backend = tc.make_backend(GPUTarget("cuda", 90, 32))
    key = tc.get_cache_key(src, backend, backend.parse_options(dict(options)),
                           env_vars=tc.get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode()).hexdigest()


def analysis_version() -> str:
    """What a cached analysis depends on beyond its build: the SASS reader's code, the source spans
    it tags and the TTGIR layout reader."""
    from . import sass
    return hashlib.sha256(f"{sass.VERSION}-{source_tags()}-{inspect.getsource(mma_layouts)}".encode()).hexdigest()[:16]


def _resource_usage(cubin: bytes):
    """(registers, spill bytes) from cuobjdump --dump-resource-usage (shipped in the triton wheel)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", out))
    return regs, spills


def _fill(res, entry) -> None:
    for name in ("registers", "spill_bytes", "shared_bytes", "tensor_cores", "mma_layouts", "sass"):
        setattr(res, name, entry[name])


def mma_layouts(ttgir: str) -> list:
    """The MMA encodings of a TTGIR module, e.g. "v2 [8, 1]" (mma.sync, warps along M x N) or
    "v3 [4, 1] 16x16x16" (wgmma and its instruction shape)."""
    out = []
    for m in re.finditer(r"#ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[([\d, ]+)\]"
                         r"(?:.*?instrShape = \[([\d, ]+)\])?", ttgir):
        shape = f" {m.group(3).replace(', ', 'x')}" if m.group(3) else ""
        out.append(f"v{m.group(1)} [{m.group(2)}]{shape}")
    return sorted(set(out))


def source_tags() -> dict:
    """Source spans the SASS analysis tags: "weights" (the W_hh tile loads of every kernel: a global load of
    these inside a time loop re-reads W_hh) and "barrier" (the grid barrier's arrive and wait)."""
    from .kernels import cooperative, tiles

    def span(jit_fn):
        lines, first = inspect.getsourcelines(jit_fn.fn)
        return (os.path.basename(inspect.getsourcefile(jit_fn.fn)), first, first + len(lines) - 1)

    return {"weights": [span(tiles.load_gate_tiles), span(tiles.load_split_gate_tiles),
                        span(tiles.load_split_stacked_tiles)],
            "barrier": [span(cooperative._barrier_wait), span(cooperative._barrier_arrive)]}


_BUILDS = None


def _builds() -> dict:
    """The committed build results of both checks (this one's and cell_compile_check's), by build key
    (read once per process)."""
    global _BUILDS
    if _BUILDS is None:
        _BUILDS = {}
        for path in sorted(BUILDS_FILE.parent.glob("sm90*_builds.jsonl")):
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                _BUILDS[entry["key"]] = entry
    return _BUILDS


def write_builds(results, path=BUILDS_FILE, replace: bool = True) -> None:
    """Save the results of a run as the committed build results (one line per build key): all of
    them (``replace``: a full run), or merged into those already there (a partial run)."""
    entries = {}
    if not replace and path.exists():
        entries = {e["key"]: e for e in map(json.loads, path.read_text().splitlines())}
    for r in results:
        if r.key and not r.error:
            entries[r.key] = {"key": r.key, "analysis": r.analysis, "kernel": r.kernel, "cell": r.cell,
                              "dtype": r.dtype, "block_h": r.block_h, "num_warps": r.num_warps, "aligned": r.aligned,
                              "precision": r.precision, "registers": r.registers, "spill_bytes": r.spill_bytes,
                              "shared_bytes": r.shared_bytes, "tensor_cores": r.tensor_cores,
                              "mma_layouts": r.mma_layouts, "sass": r.sass}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for _, e in sorted(entries.items())))


def verify(configs, count: int, compile_fn, seed=None) -> list:
    """Compile ``count`` of ``configs`` again without the cache; the differences from their cached
    results, as strings (empty: the cache holds what the compiler gives)."""
    picked = random.Random(seed).sample(configs, min(count, len(configs)))
    diffs = []
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = fresh_cache  # a real compile, not Triton's own cached one
        try:
            for config in picked:
                cached, fresh = compile_fn(*config), compile_fn(*config, cached=False)
                for name in ("registers", "spill_bytes", "shared_bytes", "tensor_cores", "mma_layouts", "sass"):
                    if getattr(cached, name) != getattr(fresh, name):
                        diffs.append(f"{config[:4]}: {name} cached {str(getattr(cached, name))[:80]} "
                                     f"!= compiled {str(getattr(fresh, name))[:80]}")
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    return diffs


def dispatcher_configs(probe: bool = False):
    """Every (kernel, cell, dtype, block_h, block_b, num_warps, aligned, precision) the dispatcher can
    choose, float32 both as IEEE fp32 and as TF32 (cuDNN's default, which the kernels follow); all
    aligned (the kernels see H padded to a multiple of 16: ``ops.padded_units``). With the tile
    builds with lengths that ``dispatch.PACKED_COOPERATIVE`` excludes, to show that they spill.

    With ``probe``, also what lies just past each limit (expected to fail)."""
    from .dispatch import BLOCK_B, BLOCK_U, COOP_CONFIGS, TILE_CONFIGS, fp32_precisions, tile_warps
    configs = []
    for (cell, dtype), table in TILE_CONFIGS.items():
        sizes = list(table) + ([2 * max(table)] if probe else [])
        precisions = fp32_precisions("sm_90", cell) if dtype == torch.float32 else ("ieee",)
        for block_h in sizes:
            for kernel in tile_kernels(cell):
                for precision in precisions:
                    w = tile_warps(cell, dtype, min(block_h, max(table)), precision)
                    configs.append((kernel, cell, dtype, block_h, BLOCK_B, w, True, precision))
    for (cell, dtype), table in COOP_CONFIGS.items():
        top = max(table)
        entries = list(table.items()) + ([(2 * top, table[top])] if probe else [])
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for block_k, entry in entries:
            for kernel in ("coop_fwd", "coop_bwd", "coop_fwd_packed", "coop_bwd_packed"):
                for precision in precisions:
                    c = entry.ieee if precision == "ieee" and entry.ieee else entry
                    configs.append((kernel, cell, dtype, block_k, BLOCK_B, c.num_warps, True, precision,
                                    BLOCK_U, c.w_chunk if "bwd" in kernel else c.fwd_chunk))
    return configs


def tile_kernels(cell: str) -> tuple:
    """The tile-persistent builds of ``cell``: forward and backward, each also "_packed" (per-row
    lengths) and "_bidir" (a grid axis of blocks: directions, heads); cells with states beside h also
    "bwd_states" (the backward that takes the gradient of the per-step states: FlashRNN's outputs)."""
    from .dispatch import CELLS
    return ("fwd", "bwd", "fwd_packed", "bwd_packed", "fwd_bidir", "bwd_bidir", "fwd_packed_bidir",
            "bwd_packed_bidir") + (("bwd_states", "bwd_states_bidir") if CELLS[cell].num_c else ())


def is_dispatcher_config(r) -> bool:
    """Whether the dispatcher can choose build ``r`` (a ``Result``)."""
    from .dispatch import PACKED_COOPERATIVE, TILE_CONFIGS, coop_config, tile_warps
    dtype = getattr(torch, r.dtype)
    if not r.aligned:
        return False
    if r.kernel.startswith("coop"):
        c = coop_config(r.cell, dtype, r.block_h, r.precision)
        return c is not None and c.num_warps == r.num_warps and r.w_chunk == (
            c.w_chunk if "bwd" in r.kernel else c.fwd_chunk)
    return r.block_h in TILE_CONFIGS[(r.cell, dtype)] and tile_warps(
        r.cell, dtype, r.block_h, r.precision) == r.num_warps and not (
        "_packed" in r.kernel and (r.cell, dtype, r.block_h) in PACKED_COOPERATIVE)


def run(configs, jobs: int = 1, compile_fn=None):
    """``compile_fn(*config)`` (default ``compile_one``) for every config, on ``jobs`` processes. A
    compile that kills its process (an LLVM assertion aborts it) is retried alone in a process of its
    own; if that dies too, its result is that error (``compile_one``'s configs), not a crash of the check."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    calls = [(compile_fn or compile_one, c) for c in configs]
    results = [None] * len(calls)
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(_call, c) for c in calls]
        for i, f in enumerate(futures):
            try:
                results[i] = f.result()
            except BrokenProcessPool:
                pass  # this one, or one beside it, died: retried alone below
    for i in [i for i, r in enumerate(results) if r is None]:
        try:
            with ProcessPoolExecutor(1) as alone:
                results[i] = alone.submit(_call, calls[i]).result()
        except BrokenProcessPool:
            if calls[i][0] is not compile_one:
                raise
            results[i] = Result(*_result_fields(*calls[i][1]), error="the compiler aborted (its process died)")
    return results


def _result_fields(kernel, cell, dtype, block_h, block_b, num_warps, aligned=False, precision="ieee", block_u=0,
                   w_chunk=0, cached=True):
    """``Result``'s identifying fields for ``compile_one``'s arguments."""
    return (kernel, cell, str(dtype).replace("torch.", ""), block_h, block_b, num_warps, aligned, precision, block_u,
            w_chunk if kernel.startswith("coop") else 0)


def _call(fn_and_args):
    fn, args = fn_and_args
    return fn(*args)


def refuse_interpreter(parser) -> None:
    """Compiling for a GPU needs real @triton.jit functions, which TRITON_INTERPRET=1 replaces."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")


def format_table(results) -> str:
    lines = ["| kernel | cell | dtype | BLOCK_H | H | BLOCK_B | BLOCK_U | warps | regs | spills (B) "
             "| shared (KB) | tensor cores | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fits = "yes" if r.ok else ("compile error: " + r.error if r.error else "NO")
        dtype = r.dtype + (" (tf32)" if r.precision == "tf32" else "")
        lines.append(f"| {r.kernel} | {r.cell} | {dtype} | {r.block_h} | {'16k' if r.aligned else 'any'} "
                     f"| {r.block_b} | {r.block_u or '-'} | {r.num_warps} "
                     f"| {r.registers} | {r.spill_bytes} | {r.shared_bytes / 1024:.1f} "
                     f"| {'yes' if r.tensor_cores else 'no'} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="also compile the next size up")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernels", nargs="+", metavar="KERNEL",
                        help="only these kernels (fwd, bwd, coop_fwd, coop_bwd, each also *_packed; fwd, bwd, "
                             "fwd_packed, bwd_packed also *_bidir)")
    add_cache_arguments(parser)
    args = parser.parse_args(argv)
    refuse_interpreter(parser)
    configs = [c for c in dispatcher_configs(args.probe) if not args.kernels or c[0] in args.kernels]
    results = run(configs, args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok} for r in results], f, indent=1)
    chosen = [r for r in results if is_dispatcher_config(r)]
    failed = [r for r in chosen if not r.ok]
    summary = f"{len(chosen) - len(failed)} of {len(chosen)} dispatcher configurations fit on sm_90."
    print("\n" + summary)
    if args.write_builds:
        write_table(BUILDS_FILE.with_name("COMPILE.md"), "python -m rnn_triton.compile_check --probe --write-builds",
                    format_table(results), summary)
    return finish_cache(args, configs, results, compile_one, BUILDS_FILE) or (1 if failed else 0)


def write_table(path, command, table, summary) -> None:
    """The committed compile table, with the command that made it and what its columns mean."""
    path.write_text(f"# sm_90 compile table\n\nMade by `{command}` (no GPU: compiled for sm_90 with the "
                    f"triton wheel's ptxas, read with its cuobjdump). {summary}\n\n"
                    "Columns: regs = registers per thread; spills = STACK + LOCAL bytes (0 required); shared = "
                    "dynamic shared memory per program (227 KB at most); tensor cores = mma/wgmma in the PTX; "
                    "H = 16k (Triton specialised every size and stride as divisible by 16, as the kernels see every H: "
                    "`ops.padded_units`); fits = no "
                    "spill, within shared memory and, for a cooperative build, within the registers and "
                    "shared memory `dispatch.COOP_CONFIGS` declares. Rows past the dispatcher's limits "
                    "(--probe) are expected not to fit.\n\n" + table + "\n")


def add_cache_arguments(parser) -> None:
    parser.add_argument("--write-builds", action="store_true",
                        help="save this run's results as the committed build results")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="compile N cached builds again and fail if any result differs")


def finish_cache(args, configs, results, compile_fn, path) -> int:
    """--write-builds and --verify for a check's run; 1 if the verification found a difference."""
    print(f"{sum(r.cached for r in results)} of {len(results)} builds from the committed results ({path.name}), "
          f"{sum(not r.cached for r in results)} compiled (or re-read from {LOCAL_DIR.relative_to(_ROOT)}).")
    if args.write_builds:
        write_builds(results, path, replace=not getattr(args, "kernels", None))
    if args.verify:
        diffs = verify([c for c, r in zip(configs, results) if r.cached], args.verify, compile_fn)
        print(f"verified {args.verify} cached builds by compiling them again: "
              + ("identical" if not diffs else "DIFFERENT\n" + "\n".join(diffs)))
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
