"""Compile the single-step cell kernels (``kernels/cell_step.py``) for sm_90 (H100/H200), with no GPU.

    python -m rnn_triton.cell_compile_check            # the configurations cell_ops.STEP_CONFIGS uses
    python -m rnn_triton.cell_compile_check --sweep    # also other block sizes, warps and stages

I and H are runtime values the K loops walk in chunks, so one build serves every size: what can vary is
Triton's specialisation of sizes and strides divisible by 16 ("16k" builds) or not ("any"), and both are
checked. A build passes when it compiles with no spills (cuobjdump's STACK/LOCAL) and its shared memory
fits in an SM (227 KB). Exit status 1 if a configuration cell_ops uses fails.

Must run without TRITON_INTERPRET (under it, @triton.jit yields interpreter functions, not compilable).
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

from .compile_check import (_PTR, BUILDS_FILE, SM90_REGISTERS_PER_BLOCK, SM90_SHARED_LIMIT, add_cache_arguments, finish_cache, measure,
                            refuse_interpreter, run, write_table)
_UNALIGNABLE = ("n_dx_blocks",)  # a count, never assumed divisible by 16
#: This check's committed build results (see compile_check).
CELL_BUILDS_FILE = BUILDS_FILE.with_name("sm90_cell_builds.jsonl")


@dataclass
class StepResult:
    kernel: str
    cell: str
    dtype: str
    precision: str
    aligned: bool
    block_u: int     # forward: units per program; backward: the unit chunk (the dot's K)
    block_k: int     # forward: the K chunk; backward: output columns per program (BLOCK_N)
    num_warps: int
    num_stages: int
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    tensor_cores: bool = False
    error: str = ""
    key: str = ""                                       # as compile_check.Result's
    mma_layouts: list = field(default_factory=list)
    sass: dict = field(default_factory=dict)
    cached: bool = False
    analysis: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and not self.spill_bytes and self.shared_bytes <= SM90_SHARED_LIMIT and \
            self.registers * 32 * self.num_warps <= SM90_REGISTERS_PER_BLOCK

    @property
    def block_h(self) -> int:  # the field compile_check.write_builds records
        return self.block_u


def compile_step(kernel: str, cell_name: str, dtype: torch.dtype, block_u: int, block_k: int, num_warps: int,
                 num_stages: int = 1, aligned: bool = False, precision: str = "ieee", block_b: int = 16,
                 has_h: bool = True, cached: bool = True) -> StepResult:
    """Compile ``kernel`` ("fwd" or "bwd") for one cell and dtype (see StepResult for the block sizes)."""
    import triton.language as tl

    from .dispatch import CELLS
    from .kernels.cell_step import cell_step_bwd_kernel, cell_step_fwd_kernel

    cell = CELLS[cell_name]
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
    constexprs = dict(CELL=cell.kernel_id, NUM_GATES=cell.num_gates, NUM_SAVED=cell.num_saved, HAS_H=has_h,
                      BLOCK_B=block_b, DOT_DTYPE=dot, ACC=tl.float32, PRECISION=precision)
    if kernel == "fwd":
        fn = cell_step_fwd_kernel
        constexprs.update(HAS_BIAS=True, SAVE=True, BLOCK_U=block_u, BLOCK_K=block_k)
    else:
        fn = cell_step_bwd_kernel
        constexprs.update(NEED_STATE=has_h, BLOCK_N=block_k, BLOCK_U=block_u)
    res = StepResult(kernel, cell_name, str(dtype).replace("torch.", ""), precision, aligned, block_u, block_k,
                     num_warps, num_stages)
    sig = {name: "constexpr" if name in constexprs else
           ("*fp32" if name in ("saved_ptr", "cs_ptr") else _PTR[dtype]) if name.endswith("_ptr") else "i32"
           for name in fn.arg_names}
    return measure(res, fn, sig, constexprs, _UNALIGNABLE, num_warps, num_stages, cached=cached)


def used_configs():
    """Every build cell_ops can launch on a GPU: each cell, dtype (float32 as IEEE and TF32), kernel,
    alignment, with and without a state."""
    from .cell_ops import STEP_CONFIGS
    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        c = STEP_CONFIGS[dtype]
        for cell in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
            for precision in (("ieee", "tf32") if dtype == torch.float32 else ("ieee",)):
                for aligned in (True, False):
                    for has_h in (True, False):
                        out.append(("fwd", cell, dtype, c.block_u, c.block_k, c.num_warps, c.num_stages, aligned,
                                    precision, c.block_b, has_h))
                        out.append(("bwd", cell, dtype, c.bwd_block_u, c.bwd_block_n, c.bwd_num_warps, 1, aligned,
                                    precision, c.block_b, has_h))
    return out


def sweep_configs():
    """Alternatives, to show where the limits are: LSTM (the most gates) unaligned, with a state."""
    out = []
    for dtype in (torch.float16, torch.float32):
        for bu, bk, warps, stages in ((16, 64, 4, 1), (32, 64, 4, 1), (32, 128, 4, 1), (64, 64, 4, 1),
                                      (64, 128, 8, 1), (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 4, 1)):
            out.append(("fwd", "LSTM", dtype, bu, bk, warps, stages, False, "ieee", 16, True))
        for bu, bn, warps in ((32, 32, 4), (64, 32, 4), (64, 64, 4), (128, 64, 8), (128, 32, 4)):
            out.append(("bwd", "LSTM", dtype, bu, bn, warps, 1, False, "ieee", 16, True))
    return out


def format_table(results) -> str:
    lines = ["| kernel | cell | dtype | sizes | state | BLOCK_U | BLOCK_K / BLOCK_N | warps | stages | regs "
             "| spills (B) | shared (KB) | tensor cores | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, c in results:
        fits = "yes" if r.ok else ("compile error: " + r.error if r.error else "NO")
        dtype = r.dtype + (" (tf32)" if r.precision == "tf32" else "")
        lines.append(f"| {r.kernel} | {r.cell} | {dtype} | {'16k' if r.aligned else 'any'} | "
                     f"{'hx' if c[-1] else 'none'} | {r.block_u} | {r.block_k} | {r.num_warps} | {r.num_stages} "
                     f"| {r.registers} | {r.spill_bytes} | {r.shared_bytes / 1024:.1f} "
                     f"| {'yes' if r.tensor_cores else 'no'} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also compile other block sizes")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    add_cache_arguments(parser)
    args = parser.parse_args(argv)
    refuse_interpreter(parser)
    configs = used_configs()
    if args.sweep:
        configs += sweep_configs()
    results = run(configs, args.jobs, compile_step)
    print(format_table(list(zip(results, configs))))
    used = results[: len(used_configs())]
    failed = [r for r in used if not r.ok]
    summary = f"{len(used) - len(failed)} of {len(used)} builds cell_ops uses fit on sm_90."
    print("\n" + summary)
    if args.write_builds:
        write_table(CELL_BUILDS_FILE.with_name("CELL_COMPILE.md"), "python -m rnn_triton.cell_compile_check "
                    "--write-builds", format_table(list(zip(results, configs))), summary)
    return finish_cache(args, configs, results, compile_step, CELL_BUILDS_FILE) or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
