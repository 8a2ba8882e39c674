"""The recurrent part of one layer as torch ops: the Triton time loops, with autograd.

``recurrent_layer`` is the whole layer for one direction:

    xp = x @ W_ih^T + b            one GEMM over all steps (torch; autograd differentiates it)
    y, hn, cn = recurrent(xp, ...)  one persistent Triton launch over all T steps

``rnn_triton::recurrent_fwd`` / ``rnn_triton::recurrent_bwd`` are registered with ``torch.library``
(so ``torch.compile`` sees them as opaque ops, not graph breaks). The backward launches the reverse
loop once, which writes dLoss/dxp for every step; dW_hh is then one GEMM over all steps.
"""
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from . import runtime
from .dispatch import CELLS, KernelConfig
from .kernels.persistent import persistent_bwd_kernel, persistent_fwd_kernel

_CELL_BY_ID = {cell.kernel_id: cell for cell in CELLS.values()}
_LSTM = CELLS["LSTM"].kernel_id
_GRU = CELLS["GRU"].kernel_id


def _precision(dtype: torch.dtype, device: torch.device):
    """(dot operand dtype, accumulation dtype, fp32 dot precision) for a storage dtype."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        # torch.nn's RNNs run on cuDNN, which uses TF32 for float32 exactly when cudnn.allow_tf32 is set.
        tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
        return tl.float32, tl.float32, "tf32" if tf32 else "ieee"
    if dtype == torch.bfloat16 and runtime.interpreting():
        return tl.float32, tl.float32, "ieee"  # the interpreter's bf16 arithmetic is wrong: use fp32
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), tl.float32, "ieee"


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _time_major(t: Tensor, batch_first: bool) -> Tensor:
    return t.transpose(0, 1) if batch_first else t


def _check_fwd_args(xp, w_hh, b_hn, h0, c0, cell, batch_first):
    """Shapes the kernels rely on (metadata only: no synchronisation)."""
    T, B, GH = _time_major(xp, batch_first).shape
    H = w_hh.shape[1]
    torch._check(w_hh.shape[0] == cell.num_gates * H and GH == cell.num_gates * H,
                 lambda: f"xp {tuple(xp.shape)} and w_hh {tuple(w_hh.shape)} do not fit a {cell.name}")
    for name, state in (("h0", h0), ("c0", c0)):
        torch._check(state is None or tuple(state.shape) == (B, H), lambda: f"{name} must be [{B}, {H}]")
    torch._check(cell.name != "LSTM" or (h0 is None) == (c0 is None), lambda: "LSTM takes h0 and c0 together")
    torch._check(b_hn is None or tuple(b_hn.shape) == (H,), lambda: f"b_hn must be [{H}]")


@torch.library.custom_op("rnn_triton::recurrent_fwd", mutates_args=())
def recurrent_fwd(xp: Tensor, w_hh: Tensor, b_hn: Optional[Tensor], h0: Optional[Tensor],
                  c0: Optional[Tensor], cell_id: int, reverse: bool, batch_first: bool, save: bool,
                  block_b: int, block_h: int, num_warps: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Persistent forward loop. xp: [T, B, G*H] (or [B, T, G*H] when batch_first).

    Returns y (layout of xp), hn [B, H], cn [B, H] (LSTM; else empty), and, when ``save``, the
    per-step slots and cell states backward needs (else empty).
    """
    cell = _CELL_BY_ID[cell_id]
    _check_fwd_args(xp, w_hh, b_hn, h0, c0, cell, batch_first)
    if xp.stride(-1) != 1:  # the kernel reads gate units at unit stride
        xp = xp.contiguous()
    xp_tm = _time_major(xp, batch_first)
    T, B, _ = xp_tm.shape
    H = w_hh.shape[1]
    y = xp.new_empty(xp.shape[:-1] + (H,))
    y_tm = _time_major(y, batch_first)
    hn = xp.new_empty(B, H)
    cn = xp.new_empty(B, H) if cell_id == _LSTM else xp.new_empty(0)
    acc = _acc_torch_dtype(xp.dtype)
    saved = xp.new_empty(T, B, cell.num_saved * H, dtype=acc) if save else xp.new_empty(0, dtype=acc)
    cs = xp.new_empty(T, B, H, dtype=acc) if save and cell_id == _LSTM else xp.new_empty(0, dtype=acc)
    if T == 0 or B == 0:  # no steps: the final state is the initial one
        hn.copy_(h0 if h0 is not None else torch.zeros_like(hn))
        if cell_id == _LSTM:
            cn.copy_(c0 if c0 is not None else torch.zeros_like(cn))
        return y, hn, cn, saved, cs
    dot_dtype, acc_dtype, precision = _precision(xp.dtype, xp.device)
    has_h0 = h0 is not None
    grid = (triton_cdiv(B, block_b),)
    persistent_fwd_kernel[grid](
        xp_tm, xp_tm.stride(0), xp_tm.stride(1),
        w_hh.contiguous(), b_hn.contiguous() if b_hn is not None else xp.new_zeros(H),
        h0.contiguous() if has_h0 else hn, c0.contiguous() if c0 is not None else hn,
        y_tm, y_tm.stride(0), y_tm.stride(1),
        hn, cn, saved, cs,
        T, B, H, int(reverse),
        CELL=cell_id, NUM_GATES=cell.num_gates, NUM_SAVED=cell.num_saved,
        HAS_H0=has_h0, SAVE=save,
        BLOCK_B=block_b, BLOCK_H=block_h,
        DOT_DTYPE=dot_dtype, ACC=acc_dtype, PRECISION=precision,
        num_warps=num_warps, num_stages=1,
    )
    runtime.launches["persistent_fwd"] += 1
    return y, hn, cn, saved, cs


@recurrent_fwd.register_fake
def _(xp, w_hh, b_hn, h0, c0, cell_id, reverse, batch_first, save, block_b, block_h, num_warps):
    cell = _CELL_BY_ID[cell_id]
    T, B, _ = _time_major(xp, batch_first).shape
    H = w_hh.shape[1]
    acc = _acc_torch_dtype(xp.dtype)
    y = xp.new_empty(xp.shape[:-1] + (H,))
    cn = xp.new_empty(B, H) if cell_id == _LSTM else xp.new_empty(0)
    saved = xp.new_empty(T, B, cell.num_saved * H, dtype=acc) if save else xp.new_empty(0, dtype=acc)
    cs = xp.new_empty(T, B, H, dtype=acc) if save and cell_id == _LSTM else xp.new_empty(0, dtype=acc)
    return y, xp.new_empty(B, H), cn, saved, cs


@torch.library.custom_op("rnn_triton::recurrent_bwd", mutates_args=())
def recurrent_bwd(dy: Tensor, dhn: Tensor, dcn: Tensor, w_hh: Tensor, saved: Tensor, cs: Tensor,
                  h0: Optional[Tensor], c0: Optional[Tensor], y: Tensor, cell_id: int, reverse: bool,
                  batch_first: bool, block_b: int, block_h: int, num_warps: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Persistent backward loop, then dW_hh as GEMMs over all steps.

    Returns dxp (layout of y), dW_hh, db_hn (GRU; else empty), dh0, dc0 (LSTM; else empty).
    """
    cell = _CELL_BY_ID[cell_id]
    if dy.stride(-1) != 1:  # the kernel reads hidden units at unit stride (dy may be an expanded scalar)
        dy = dy.contiguous()
    y_tm = _time_major(y, batch_first)
    dy_tm = _time_major(dy, batch_first)
    T, B, H = y_tm.shape
    G = cell.num_gates
    dxp = y.new_empty(y.shape[:-1] + (G * H,))
    dxp_tm = _time_major(dxp, batch_first)
    dqn = y.new_empty(T, B, H) if cell_id == _GRU else y.new_empty(0)
    dh0 = y.new_empty(B, H)
    dc0 = y.new_empty(B, H) if cell_id == _LSTM else y.new_empty(0)
    if T > 0 and B > 0:
        dot_dtype, acc_dtype, precision = _precision(y.dtype, y.device)
        has_h0 = h0 is not None
        persistent_bwd_kernel[(triton_cdiv(B, block_b),)](
            dy_tm, dy_tm.stride(0), dy_tm.stride(1),
            dhn.contiguous(), dcn.contiguous() if cell_id == _LSTM else dhn,
            w_hh.contiguous(), saved, cs,
            h0.contiguous() if has_h0 else dh0, c0.contiguous() if c0 is not None else dh0,
            y_tm, y_tm.stride(0), y_tm.stride(1),
            dxp_tm, dxp_tm.stride(0), dxp_tm.stride(1), dqn, dh0, dc0,
            T, B, H, int(reverse),
            CELL=cell_id, NUM_GATES=G, NUM_SAVED=cell.num_saved,
            HAS_H0=has_h0,
            BLOCK_B=block_b, BLOCK_H=block_h,
            DOT_DTYPE=dot_dtype, ACC=acc_dtype, PRECISION=precision,
            num_warps=num_warps, num_stages=1,
        )
        runtime.launches["persistent_bwd"] += 1
    else:  # no steps: the gradients pass straight through
        dh0.copy_(dhn)
        if cell_id == _LSTM:
            dc0.copy_(dcn)
        dxp.zero_()
        dqn.zero_()

    # dW_hh = sum_t dr_t^T h_{t-1}: one GEMM over all (t, b) with t >= 1 in the forward's order, one for
    # the first step, whose h_{t-1} is h0.
    dr = torch.cat([dxp_tm[..., : 2 * H], dqn], dim=-1) if cell_id == _GRU else dxp_tm
    first, rest = (T - 1, slice(0, T - 1)) if reverse else (0, slice(1, T))
    prev = y_tm[1:] if reverse else y_tm[:-1]
    dw_hh = dr[rest].reshape(-1, G * H).t() @ prev.reshape(-1, H)
    if h0 is not None and T > 0:
        dw_hh = dw_hh + dr[first].t() @ h0
    db_hn = dqn.sum(dim=(0, 1), dtype=_acc_torch_dtype(y.dtype)).to(y.dtype) if cell_id == _GRU \
        else y.new_empty(0)
    return dxp, dw_hh, db_hn, dh0, dc0


@recurrent_bwd.register_fake
def _(dy, dhn, dcn, w_hh, saved, cs, h0, c0, y, cell_id, reverse, batch_first, block_b, block_h,
      num_warps):
    G = _CELL_BY_ID[cell_id].num_gates
    B, H = dhn.shape
    dxp = y.new_empty(y.shape[:-1] + (G * H,))
    db_hn = y.new_empty(H) if cell_id == _GRU else y.new_empty(0)
    dc0 = y.new_empty(B, H) if cell_id == _LSTM else y.new_empty(0)
    return dxp, torch.empty_like(w_hh), db_hn, y.new_empty(B, H), dc0


def _setup_context(ctx, inputs, output):
    xp, w_hh, b_hn, h0, c0, cell_id, reverse, batch_first, save, block_b, block_h, num_warps = inputs
    y, _, _, saved, cs = output
    if not save:
        ctx.unsaved = True
        return
    ctx.unsaved = False
    ctx.save_for_backward(w_hh, h0, c0, y, saved, cs)
    ctx.args = (cell_id, reverse, batch_first, block_b, block_h, num_warps)
    ctx.has_b_hn = b_hn is not None


def _backward(ctx, dy, dhn, dcn, _dsaved, _dcs):
    if ctx.unsaved:
        raise RuntimeError("rnn_triton: backward through a forward that ran without saving for backward")
    w_hh, h0, c0, y, saved, cs = ctx.saved_tensors
    cell_id, batch_first = ctx.args[0], ctx.args[2]
    state_shape = (_time_major(y, batch_first).shape[1], w_hh.shape[1])
    dy = torch.zeros_like(y) if dy is None else dy
    dhn = y.new_zeros(state_shape) if dhn is None else dhn
    dcn = dhn if cell_id != _LSTM else (y.new_zeros(state_shape) if dcn is None else dcn)  # unread
    dxp, dw_hh, db_hn, dh0, dc0 = recurrent_bwd(dy, dhn, dcn, w_hh, saved, cs, h0, c0, y, *ctx.args)
    return (dxp, dw_hh, db_hn if ctx.has_b_hn else None, dh0 if h0 is not None else None,
            dc0 if c0 is not None else None) + (None,) * 7


recurrent_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("rnn_triton: double backward (a gradient of a gradient) through the recurrent "
                       "kernels is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


recurrent_bwd.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def recurrent_layer(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                    b_hh: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                    config: KernelConfig, batch_first: bool, reverse: bool = False):
    """One layer, one direction. x: [T, B, I] ([B, T, I] when batch_first); h0, c0: [B, H] or None.

    Returns (y, hn, cn); cn is None for cells without a cell state.
    """
    spec = CELLS[cell]
    H = w_hh.shape[1]
    b_hn = None
    bias = None
    if b_ih is not None:
        if spec.kernel_id == _GRU:
            # b_hn multiplies with r inside the cell, so only b_hr and b_hz fold into the projection.
            bias = b_ih + torch.cat([b_hh[: 2 * H], torch.zeros_like(b_hh[2 * H:])])
            b_hn = b_hh[2 * H:]
        else:
            bias = b_ih + b_hh
    xp = torch.nn.functional.linear(x, w_ih, bias)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0))
    y, hn, cn, _, _ = recurrent_fwd(xp, w_hh, b_hn, h0, c0, spec.kernel_id, reverse, batch_first, save,
                                    config.block_b, config.block_h, config.num_warps)
    return y, hn, (cn if spec.kernel_id == _LSTM else None)
