"""One step of a recurrent cell as torch ops: the fused single-step Triton kernels, with autograd.

``cell_step`` is what ``rnn_triton.LSTMCell`` / ``GRUCell`` / ``RNNCell`` run:

    h', c' = cell_fwd(x, W_ih, W_hh, b_ih, b_hh, h, c)   one launch: both GEMMs, the biases and the cell math

and its backward is one launch of the backward kernel (the cell's derivative from ``kernels/cells.py``,
dx = dgates W_ih and dh = dr W_hh in the same kernel), after which the weight and bias gradients are
torch GEMMs and sums on the host: dW_ih = dgates^T x, dW_hh = dr^T h, db_ih = sum dgates, db_hh = sum dr
(dr: dgates, except GRU's n-slot, whose recurrent part r * (W_hn h + b_hn) has the gradient dn * r).
Under ``create_graph=True`` those gradients also take the autograd graph of torch's recomputation of
the step (``reference.step``), so that a gradient of a gradient is exact (see ``_backward``).

``rnn_triton::cell_fwd`` / ``rnn_triton::cell_bwd`` are ``torch.library`` custom ops with fake
implementations, so ``torch.compile`` keeps them whole. Conventions as in ``ops``: fp32 accumulation
(fp64 in the interpreter), dot operand precision from ``ops._precision``, launches counted in
``runtime.launches``.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference, runtime
from .dispatch import CELLS
from .kernels.cell_step import cell_step_bwd_kernel, cell_step_fwd_kernel
from .ops import _acc_torch_dtype, _not_differentiable, _precision, _setup_nothing, triton_cdiv

_CELL_BY_ID = {cell.kernel_id: cell for cell in CELLS.values()}
_LSTM = CELLS["LSTM"].kernel_id
_GRU = CELLS["GRU"].kernel_id


@dataclass(frozen=True)
class StepConfig:
    """Block sizes of the single-step kernels. Forward: a program owns ``block_u`` units (all gates) of
    ``block_b`` batch rows and walks I and H in chunks of ``block_k``. Backward: a program owns
    ``bwd_block_n`` columns of dx or dh and walks the H units in chunks of ``bwd_block_u``. The sizes
    of I and H are runtime values: one build serves every size (see ``STEP_CONFIGS``)."""
    block_b: int
    block_u: int
    block_k: int
    num_warps: int
    bwd_block_n: int
    bwd_block_u: int
    bwd_num_warps: int
    num_stages: int = 1
    variant: str = "fused-step"

    def args(self) -> tuple:
        return (self.block_b, self.block_u, self.block_k, self.num_warps, self.bwd_block_n, self.bwd_block_u,
                self.bwd_num_warps, self.num_stages)


#: Per storage dtype, from the sm_90 compile check (``python -m rnn_triton.cell_compile_check``): every
#: cell, with and without a state, sizes divisible by 16 or not, float32 as IEEE and TF32: no spills.
#: One build serves every I and H (the K loops walk them), so there is no size limit to tabulate.
#: BLOCK_U = 16 units per forward program (the smallest M of a tensor-core dot) gives the most programs
#: for the small batches of decoding; float32's IEEE dot runs on FMA units, whose operands sit in
#: registers, hence its shorter K chunk.
STEP_CONFIGS = {
    torch.float16: StepConfig(16, 16, 64, 8, 64, 32, 8, num_stages=2),
    torch.bfloat16: StepConfig(16, 16, 64, 8, 64, 32, 8, num_stages=2),
    torch.float32: StepConfig(16, 16, 32, 8, 64, 32, 4, num_stages=2),
}
STEP_CONFIGS[torch.float64] = STEP_CONFIGS[torch.float32]  # the interpreter only: float32's tiling


def choose(cell: str, input_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> dispatch.Plan:
    """The single-step kernels' plan for a cell, or the reason they do not serve it. Every size is
    served, 0 too (``cell_fwd`` then launches nothing where there is nothing to compute)."""
    if device.type == "cpu":
        if not runtime.interpreting():
            return dispatch.Plan(None, "CPU tensors run through Triton only under TRITON_INTERPRET=1")
    elif device.type != "cuda":
        return dispatch.Plan(None, f"device type {device.type!r} is not supported by the Triton kernels")
    if dtype == torch.float64 and not runtime.interpreting():
        return dispatch.Plan(None, "float64 runs through the Triton kernels only in the interpreter")
    if dtype not in STEP_CONFIGS:
        return dispatch.Plan(None, f"dtype {dtype} is not supported (float16, bfloat16, float32)")
    if cell not in CELLS:
        return dispatch.Plan(None, f"unknown cell {cell!r}")
    return dispatch.Plan(STEP_CONFIGS[dtype])


def _check_fwd_args(x, w_ih, w_hh, b_ih, b_hh, hx, cx, cell):
    """Shapes the kernels rely on (metadata only)."""
    B, I = x.shape
    H = w_hh.shape[1]
    G = cell.num_gates
    torch._check(tuple(w_ih.shape) == (G * H, I) and tuple(w_hh.shape) == (G * H, H),
                 lambda: f"x {tuple(x.shape)}, w_ih {tuple(w_ih.shape)}, w_hh {tuple(w_hh.shape)} do not fit a "
                         f"{cell.name} cell")
    torch._check((b_ih is None) == (b_hh is None), lambda: "b_ih and b_hh go together")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        torch._check(b is None or tuple(b.shape) == (G * H,), lambda: f"{name} must be [{G * H}]")
    for name, state in (("hx", hx), ("cx", cx)):
        torch._check(state is None or tuple(state.shape) == (B, H), lambda: f"{name} must be [{B}, {H}]")
    torch._check(cell.name == "LSTM" or cx is None, lambda: "only the LSTM takes cx")
    torch._check(cell.name != "LSTM" or (hx is None) == (cx is None), lambda: "LSTM takes hx and cx together")


@torch.library.custom_op("rnn_triton::cell_fwd", mutates_args=())
def cell_fwd(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
             hx: Optional[Tensor], cx: Optional[Tensor], cell_id: int, save: bool, block_b: int, block_u: int,
             block_k: int, num_warps: int, bwd_block_n: int, bwd_block_u: int, bwd_num_warps: int,
             num_stages: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step, fused. x: [B, I]; hx, cx: [B, H] or None (zeros).

    Returns hy [B, H], cy [B, H] (LSTM; else empty) and, when ``save``, what backward needs: the cell's
    saved slots [B, NUM_SAVED*H] and (LSTM) c' [B, H] in the accumulation dtype (else empty).
    """
    cell = _CELL_BY_ID[cell_id]
    _check_fwd_args(x, w_ih, w_hh, b_ih, b_hh, hx, cx, cell)
    B, I = x.shape
    H = w_hh.shape[1]
    acc = _acc_torch_dtype(x.dtype)
    hy = x.new_empty(B, H)
    cy = x.new_empty(B, H) if cell_id == _LSTM else x.new_empty(0)
    saved = x.new_empty(B, cell.num_saved * H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    cs = x.new_empty(B, H, dtype=acc) if save and cell_id == _LSTM else x.new_empty(0, dtype=acc)
    if B == 0 or H == 0:  # nothing to compute (I == 0 is a projection of zeros: the kernel's K loop is empty)
        return hy, cy, saved, cs
    if x.stride(-1) != 1:  # the kernel reads features at unit stride
        x = x.contiguous()
    dot_dtype, acc_dtype, precision = _step_precision(x.dtype, x.device)
    has_bias = b_ih is not None
    has_h = hx is not None
    grid = (triton_cdiv(H, block_u), triton_cdiv(B, block_b))
    cell_step_fwd_kernel[grid](
        x, x.stride(0), w_ih.contiguous(), w_hh.contiguous(),
        b_ih.contiguous() if has_bias else hy, b_hh.contiguous() if has_bias else hy,
        hx.contiguous() if has_h else hy, cx.contiguous() if cx is not None else hy,
        hy, cy if cell_id == _LSTM else hy, saved if save else hy, cs if save and cell_id == _LSTM else hy,
        B, I, H,
        CELL=cell_id, NUM_GATES=cell.num_gates, NUM_SAVED=cell.num_saved, HAS_BIAS=has_bias, HAS_H=has_h,
        SAVE=save, BLOCK_B=block_b, BLOCK_U=block_u, BLOCK_K=block_k, DOT_DTYPE=dot_dtype, ACC=acc_dtype,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    runtime.launches["cell_fwd"] += 1
    return hy, cy, saved, cs


def _step_precision(dtype: torch.dtype, device: torch.device):
    """``ops._precision``, except that float32 follows the flag torch.nn's cells follow: they are
    cuBLAS GEMMs (``torch.backends.cuda.matmul.allow_tf32``), not cuDNN (``cudnn.allow_tf32``)."""
    dot_dtype, acc_dtype, precision = _precision(dtype, device)
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 else "ieee"
    return dot_dtype, acc_dtype, precision


@cell_fwd.register_fake
def _(x, w_ih, w_hh, b_ih, b_hh, hx, cx, cell_id, save, *config):
    cell = _CELL_BY_ID[cell_id]
    B, H = x.shape[0], w_hh.shape[1]
    acc = _acc_torch_dtype(x.dtype)
    cy = x.new_empty(B, H) if cell_id == _LSTM else x.new_empty(0)
    saved = x.new_empty(B, cell.num_saved * H, dtype=acc) if save else x.new_empty(0, dtype=acc)
    cs = x.new_empty(B, H, dtype=acc) if save and cell_id == _LSTM else x.new_empty(0, dtype=acc)
    return x.new_empty(B, H), cy, saved, cs


@torch.library.custom_op("rnn_triton::cell_bwd", mutates_args=())
def cell_bwd(dhy: Tensor, dcy: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, hx: Optional[Tensor],
             cx: Optional[Tensor], saved: Tensor, cs: Tensor, cell_id: int, has_bias: bool, need_dx: bool,
             need_state: bool, need_weights: bool, block_b: int, block_n: int, block_u: int, num_warps: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``cell_fwd``: one launch (the cell's derivative, dx and dh), then the weight and bias
    gradients as torch GEMMs and sums.

    Returns dx [B, I] (when ``need_dx``), dhx, dcx [B, H] (when ``need_state`` and the forward had a
    state; dcx: LSTM), dW_ih, dW_hh, db_ih, db_hh (when ``need_weights``; biases when ``has_bias``);
    empty tensors for what is not asked for.
    """
    cell = _CELL_BY_ID[cell_id]
    G = cell.num_gates
    B, I = x.shape
    H = w_hh.shape[1]
    has_h = hx is not None
    need_state = need_state and has_h
    dx = x.new_empty(B, I) if need_dx else x.new_empty(0)
    dhx = x.new_empty(B, H) if need_state else x.new_empty(0)
    dcx = x.new_empty(B, H) if need_state and cell_id == _LSTM else x.new_empty(0)
    dgates = x.new_empty(B, G * H)
    dq = x.new_empty(B, H) if cell_id == _GRU else x.new_empty(0)
    if B > 0 and H > 0:
        if x.stride(-1) != 1:
            x = x.contiguous()
        dot_dtype, acc_dtype, precision = _step_precision(x.dtype, x.device)
        n_dx_blocks = triton_cdiv(I, block_n) if need_dx else 0
        grid = (n_dx_blocks + triton_cdiv(H, block_n), triton_cdiv(B, block_b))
        cell_step_bwd_kernel[grid](
            dhy.contiguous(), dcy.contiguous() if cell_id == _LSTM else dgates, saved,
            cs if cell_id == _LSTM else saved,
            hx.contiguous() if has_h else dgates, cx.contiguous() if cx is not None else dgates,
            w_ih.contiguous(), w_hh.contiguous(),
            dx if need_dx else dgates, dhx if need_state else dgates,
            dcx if need_state and cell_id == _LSTM else dgates,
            dgates, dq if cell_id == _GRU else dgates,
            B, I, H, n_dx_blocks,
            CELL=cell_id, NUM_GATES=G, NUM_SAVED=cell.num_saved, HAS_H=has_h, NEED_STATE=need_state,
            BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_U=block_u, DOT_DTYPE=dot_dtype, ACC=acc_dtype,
            PRECISION=precision, num_warps=num_warps, num_stages=1,
        )
        runtime.launches["cell_bwd"] += 1
    else:  # no rows or no units: every gradient is zero (or empty)
        for t in (dx, dhx, dcx, dgates, dq):
            t.zero_()
    dw_ih, dw_hh, db_ih, db_hh = (x.new_empty(0) for _ in range(4))  # distinct: outputs may not alias
    if need_weights:
        # dr: the gradient of the recurrent projection h @ W_hh^T + b_hh, gate by gate.
        dr = torch.cat([dgates[:, : 2 * H], dq], dim=1) if cell_id == _GRU else dgates
        dw_ih = dgates.t() @ x
        dw_hh = dr.t() @ hx if has_h else torch.zeros_like(w_hh)
        if has_bias:
            acc = _acc_torch_dtype(x.dtype)
            db_ih = dgates.sum(0, dtype=acc).to(x.dtype)
            db_hh = dr.sum(0, dtype=acc).to(x.dtype)
    return dx, dhx, dcx, dw_ih, dw_hh, db_ih, db_hh


@cell_bwd.register_fake
def _(dhy, dcy, x, w_ih, w_hh, hx, cx, saved, cs, cell_id, has_bias, need_dx, need_state, need_weights,
      *config):
    B, I = x.shape
    H = w_hh.shape[1]
    G = _CELL_BY_ID[cell_id].num_gates
    need_state = need_state and hx is not None
    dx = x.new_empty(B, I) if need_dx else x.new_empty(0)
    dhx = x.new_empty(B, H) if need_state else x.new_empty(0)
    dcx = x.new_empty(B, H) if need_state and cell_id == _LSTM else x.new_empty(0)
    dw_ih, dw_hh = (x.new_empty(G * H, I), x.new_empty(G * H, H)) if need_weights else (x.new_empty(0),) * 2
    db = (x.new_empty(G * H), x.new_empty(G * H)) if need_weights and has_bias else (x.new_empty(0),) * 2
    return dx, dhx, dcx, dw_ih, dw_hh, *db


_NUM_CONFIG_ARGS = 8  # StepConfig.args()


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, b_ih, b_hh, hx, cx, cell_id, save, *config = inputs
    _, _, saved, cs = output
    ctx.unsaved = not save
    if not save:
        return
    ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, hx, cx, saved, cs)  # the biases: for create_graph
    ctx.cell_id = cell_id
    block_b, _, _, _, bwd_block_n, bwd_block_u, bwd_num_warps, _ = config
    ctx.bwd_config = (block_b, bwd_block_n, bwd_block_u, bwd_num_warps)


def _backward(ctx, dhy, dcy, _dsaved, _dcs):
    """The backward kernel (``cell_bwd``). Under ``create_graph=True`` (grad mode on here) the gradients
    keep its values and take the autograd graph of torch's recomputation of the step
    (``reference.step``), so that they can be differentiated again."""
    if ctx.unsaved:
        raise RuntimeError("rnn_triton: backward through a cell step that ran without saving for backward")
    x, w_ih, w_hh, b_ih, b_hh, hx, cx, saved, cs = ctx.saved_tensors
    B, H = x.shape[0], w_hh.shape[1]
    is_lstm = ctx.cell_id == _LSTM
    dhy = x.new_zeros(B, H) if dhy is None else dhy
    dcy = (x.new_zeros(B, H) if dcy is None else dcy) if is_lstm else dhy  # unread otherwise
    needs = ctx.needs_input_grad
    need_weights = any(needs[1:5])
    need_state = needs[5] or needs[6]
    with torch.no_grad():  # the values: the kernel; under create_graph their graph comes from below
        dx, dhx, dcx, dw_ih, dw_hh, db_ih, db_hh = cell_bwd(
            dhy, dcy, x, w_ih, w_hh, hx, cx, saved, cs, ctx.cell_id, b_ih is not None, needs[0], need_state,
            need_weights, *ctx.bwd_config)
    grads = [t if need else None for t, need in zip((dx, dw_ih, dw_hh, db_ih, db_hh, dhx, dcx), needs)]
    if torch.is_grad_enabled():
        inputs = (x, w_ih, w_hh, b_ih, b_hh, hx, cx)
        grads = reference.kernel_values_with_graph(grads, lambda *xs: _recompute(ctx.cell_id, *xs), inputs,
                                                   (dhy, dcy if is_lstm else None))
    return tuple(grads) + (None,) * (2 + _NUM_CONFIG_ARGS)


def _recompute(cell_id, x, w_ih, w_hh, b_ih, b_hh, hx, cx):
    """``cell_fwd``'s (hy, cy) in torch ops (``reference.step``)."""
    h = hx if hx is not None else x.new_zeros(x.shape[0], w_hh.shape[1])
    c = (cx if cx is not None else torch.zeros_like(h)) if cell_id == _LSTM else None
    F = torch.nn.functional
    return reference.step(cell_id, F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h, c)


cell_fwd.register_autograd(_backward, setup_context=_setup_context)


cell_bwd.register_autograd(_not_differentiable, setup_context=_setup_nothing)


def cell_step(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
              hx: Optional[Tensor], cx: Optional[Tensor], config: StepConfig):
    """One step of ``cell`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"). x: [B, I]; hx, cx: [B, H] or None
    (zeros). Returns (hy, cy); cy is None for cells without a cell state."""
    spec = CELLS[cell]
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh, hx, cx))
    hy, cy, _, _ = cell_fwd(x, w_ih, w_hh, b_ih, b_hh, hx, cx, spec.kernel_id, save, *config.args())
    return hy, (cy if spec.kernel_id == _LSTM else None)
