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

from . import dispatch, runtime
from .dispatch import CELLS, KernelConfig
from .kernels.cooperative import cooperative_bwd_kernel, cooperative_fwd_kernel
from .kernels.persistent import persistent_bwd_kernel, persistent_fwd_kernel

_CELL_BY_ID = {cell.kernel_id: cell for cell in CELLS.values()}
_LSTM = CELLS["LSTM"].kernel_id
_GRU = CELLS["GRU"].kernel_id

#: Polls of the grid barrier before a cooperative program gives up and flags an error: seconds of
#: waiting, where a step normally takes microseconds. Only a grid that is not all resident (which the
#: dispatcher rules out, but another kernel on the GPU can cause) gets there.
BARRIER_MAX_SPINS = 1 << 24


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
                  c0: Optional[Tensor], lengths: Optional[Tensor], cell_id: int, reverse: bool,
                  batch_first: bool, save: bool,
                  variant: str, block_b: int, block_h: int, block_u: int, groups: int, w_chunk: int,
                  num_warps: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward time loop (``variant``: see ``dispatch.KernelConfig``). xp: [T, B, G*H] (or [B, T, G*H]
    when batch_first).

    ``lengths`` (int32 [B], on xp's device, each in 1..T): per-row sequence lengths, as a packed
    sequence has; a row stops at its length (y is zero past it, hn is its last state), and in reverse
    it starts from its own last element.

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
    y = (xp.new_empty if lengths is None else xp.new_zeros)(xp.shape[:-1] + (H,))  # zero past each length
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
    constexprs = dict(CELL=cell_id, NUM_GATES=cell.num_gates, NUM_SAVED=cell.num_saved, HAS_H0=has_h0,
                      SAVE=save, BLOCK_B=block_b, DOT_DTYPE=dot_dtype, ACC=acc_dtype, PRECISION=precision)
    if variant != "tile-persistent":
        # The carry: c (LSTM) or the fp32 h (GRU) of each unit, from its initial value.
        init = c0 if cell_id == _LSTM else (h0 if cell_id == _GRU else None)
        carry = init.to(acc, copy=True).contiguous() if init is not None else xp.new_zeros(B, H, dtype=acc)
        _run_cooperative(
            cooperative_fwd_kernel, variant, (triton_cdiv(H, block_u), groups), T, "fwd",
            (xp_tm, xp_tm.stride(0), xp_tm.stride(1),
             w_hh.contiguous(), b_hn.contiguous() if b_hn is not None else xp.new_zeros(H),
             h0.contiguous() if has_h0 else hn,
             y_tm, y_tm.stride(0), y_tm.stride(1), carry, saved, cs, lengths if lengths is not None else hn),
            (T, B, H, int(reverse)),
            dict(constexprs, BLOCK_U=block_u, BLOCK_K=block_h, HAS_LENGTHS=lengths is not None), num_warps)
        if reverse or lengths is None:
            hn.copy_(y_tm[0 if reverse else T - 1])
        else:  # each row's last h, at its own last step (the carry past it is untouched: cn is right)
            hn.copy_(y_tm[lengths.long() - 1, torch.arange(B, device=y.device)])
        if cell_id == _LSTM:
            cn.copy_(carry)
        return y, hn, cn, saved, cs
    grid = (triton_cdiv(B, block_b),)
    persistent_fwd_kernel[grid](
        xp_tm, xp_tm.stride(0), xp_tm.stride(1),
        w_hh.contiguous(), b_hn.contiguous() if b_hn is not None else xp.new_zeros(H),
        h0.contiguous() if has_h0 else hn, c0.contiguous() if c0 is not None else hn,
        y_tm, y_tm.stride(0), y_tm.stride(1),
        hn, cn, saved, cs, lengths if lengths is not None else hn,
        T, B, H, int(reverse),
        BLOCK_H=block_h, HAS_LENGTHS=lengths is not None, **constexprs,
        num_warps=num_warps, num_stages=1,
    )
    runtime.launches["persistent_fwd"] += 1
    return y, hn, cn, saved, cs


def _run_cooperative(kernel, variant, grid, T, direction, args, sizes, constexprs, num_warps):
    """Run a cooperative kernel over all its steps (T forward, T + 1 backward): one launch whose
    programs meet at a grid barrier each step, or (``stepwise``) one launch per step.

    The barrier counts arrivals per batch group; a program that waits past BARRIER_MAX_SPINS sets the
    error flag and leaves, and this raises, rather than hang the GPU.
    """
    device = args[0].device
    steps = T if direction == "fwd" else T + 1
    sync = torch.zeros(grid[1], dtype=torch.int32, device=device)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    cooperative = variant == "cooperative" and steps * grid[0] < 2 ** 31  # the barrier's int32 count
    if cooperative and device.type == "cuda":
        full_args = (*args, sync, error, *sizes, 0, steps, BARRIER_MAX_SPINS)
        cooperative = _all_resident(kernel, grid, full_args, constexprs, num_warps, device)
    variant = "cooperative" if cooperative else "stepwise"
    launches = [(0, steps)] if cooperative else [(s, s + 1) for s in range(steps)]
    for begin, end in launches:
        kernel[grid](*args, sync, error, *sizes, begin, end, BARRIER_MAX_SPINS,
                     COOPERATIVE=cooperative, **constexprs, num_warps=num_warps, num_stages=1)
    runtime.launches[f"{variant}_{direction}"] += len(launches)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cooperative and not capturing and error.item():
        raise RuntimeError(f"rnn_triton: the cooperative {direction} kernel's grid barrier timed out: its "
                           f"{grid[0] * grid[1]} programs were not all resident on the GPU at once (another "
                           f"kernel running concurrently?). Its outputs are invalid.")


_resident_cache: dict = {}


def _all_resident(kernel, grid, args, constexprs, num_warps, device) -> bool:
    """Whether the GPU holds all of ``grid`` at once, from the compiled kernel's own registers and
    shared memory (the dispatcher planned with the compile check's sm_90 numbers; another Triton
    version or GPU may differ). Compiling does not launch anything."""
    key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())), num_warps,
           grid, device.index)
    if key not in _resident_cache:
        compiled = kernel.warmup(*args, grid=grid, COOPERATIVE=True, **constexprs, num_warps=num_warps,
                                 num_stages=1)
        compiled._init_handles()
        props = dispatch.device_props(device)
        per_sm = dispatch.resident_blocks(props, num_warps, compiled.n_regs, compiled.metadata.shared)
        _resident_cache[key] = grid[0] * grid[1] <= props.sm_count * per_sm
    return _resident_cache[key]


@recurrent_fwd.register_fake
def _(xp, w_hh, b_hn, h0, c0, lengths, cell_id, reverse, batch_first, save, variant, block_b, block_h,
      block_u, groups, w_chunk, num_warps):
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
                  h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor], y: Tensor,
                  cell_id: int, reverse: bool,
                  batch_first: bool, variant: str, block_b: int, block_h: int, block_u: int, groups: int,
                  w_chunk: int, num_warps: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward time loop (the forward's variant), then dW_hh as GEMMs over all steps.

    Returns dxp (layout of y), dW_hh, db_hn (GRU; else empty), dh0, dc0 (LSTM; else empty).
    """
    cell = _CELL_BY_ID[cell_id]
    if dy.stride(-1) != 1:  # the kernel reads hidden units at unit stride (dy may be an expanded scalar)
        dy = dy.contiguous()
    y_tm = _time_major(y, batch_first)
    dy_tm = _time_major(dy, batch_first)
    T, B, H = y_tm.shape
    G = cell.num_gates
    new = y.new_empty if lengths is None else y.new_zeros  # zero past each length
    dxp = new(y.shape[:-1] + (G * H,))
    dxp_tm = _time_major(dxp, batch_first)
    dqn = new(T, B, H) if cell_id == _GRU else y.new_empty(0)
    dh0 = y.new_empty(B, H)
    dc0 = y.new_empty(B, H) if cell_id == _LSTM else y.new_empty(0)
    if T > 0 and B > 0:
        dot_dtype, acc_dtype, precision = _precision(y.dtype, y.device)
        has_h0 = h0 is not None
        constexprs = dict(CELL=cell_id, NUM_GATES=G, NUM_SAVED=cell.num_saved, HAS_H0=has_h0,
                          BLOCK_B=block_b, DOT_DTYPE=dot_dtype, ACC=acc_dtype, PRECISION=precision)
        h0_arg = h0.contiguous() if has_h0 else dh0
        c0_arg = c0.contiguous() if c0 is not None else dh0
        if variant == "tile-persistent":
            persistent_bwd_kernel[(triton_cdiv(B, block_b),)](
                dy_tm, dy_tm.stride(0), dy_tm.stride(1),
                dhn.contiguous(), dcn.contiguous() if cell_id == _LSTM else dhn,
                w_hh.contiguous(), saved, cs, h0_arg, c0_arg,
                y_tm, y_tm.stride(0), y_tm.stride(1),
                dxp_tm, dxp_tm.stride(0), dxp_tm.stride(1), dqn, dh0, dc0,
                lengths if lengths is not None else dh0,
                T, B, H, int(reverse),
                BLOCK_H=block_h, HAS_LENGTHS=lengths is not None, **constexprs,
                num_warps=num_warps, num_stages=1,
            )
            runtime.launches["persistent_bwd"] += 1
        else:
            # The carry: dc (LSTM, from dLoss/dcn) or the direct part z*dh of dLoss/dh (GRU, from 0).
            acc = _acc_torch_dtype(y.dtype)
            carry = dcn.to(acc, copy=True).contiguous() if cell_id == _LSTM else y.new_zeros(B, H, dtype=acc)
            _run_cooperative(
                cooperative_bwd_kernel, variant, (triton_cdiv(H, block_u), groups), T, "bwd",
                (dy_tm, dy_tm.stride(0), dy_tm.stride(1), dhn.contiguous(),
                 w_hh.view(G, H, H).transpose(1, 2).contiguous(), saved, cs,
                 h0_arg, c0_arg, y_tm, y_tm.stride(0), y_tm.stride(1),
                 dxp_tm, dxp_tm.stride(0), dxp_tm.stride(1), dqn, dh0, carry,
                 lengths if lengths is not None else dh0),
                (T, B, H, int(reverse)),
                dict(constexprs, BLOCK_U=block_u, BLOCK_K=block_h, W_CHUNK=w_chunk,
                     HAS_LENGTHS=lengths is not None), num_warps)
            if cell_id == _LSTM:
                dc0.copy_(carry)
    else:  # no steps: the gradients pass straight through
        dh0.copy_(dhn)
        if cell_id == _LSTM:
            dc0.copy_(dcn)
        dxp.zero_()
        dqn.zero_()

    # dW_hh = sum_t dr_t^T h_{t-1}: one GEMM over all (t, b), h_{t-1} being the state before step t in
    # the forward's order: h0 at each row's first step (t = 0; in reverse its own last element).
    dr = torch.cat([dxp_tm[..., : 2 * H], dqn], dim=-1) if cell_id == _GRU else dxp_tm
    start = h0 if h0 is not None else y.new_zeros(B, H)
    if reverse:
        prev = torch.cat([y_tm[1:], y.new_zeros(min(T, 1), B, H)])
        first = lengths.long() - 1 if lengths is not None else torch.full((B,), T - 1, device=y.device)
        if T > 0:
            prev[first, torch.arange(B, device=y.device)] = start
    else:
        prev = torch.cat([start[None], y_tm[:-1]])[:T]
    dw_hh = dr.reshape(-1, G * H).t() @ prev.reshape(-1, H)
    db_hn = dqn.sum(dim=(0, 1), dtype=_acc_torch_dtype(y.dtype)).to(y.dtype) if cell_id == _GRU \
        else y.new_empty(0)
    return dxp, dw_hh, db_hn, dh0, dc0


@recurrent_bwd.register_fake
def _(dy, dhn, dcn, w_hh, saved, cs, h0, c0, lengths, y, cell_id, reverse, batch_first, variant, block_b,
      block_h, block_u, groups, w_chunk, num_warps):
    G = _CELL_BY_ID[cell_id].num_gates
    B, H = dhn.shape
    dxp = y.new_empty(y.shape[:-1] + (G * H,))
    db_hn = y.new_empty(H) if cell_id == _GRU else y.new_empty(0)
    dc0 = y.new_empty(B, H) if cell_id == _LSTM else y.new_empty(0)
    return dxp, torch.empty_like(w_hh), db_hn, y.new_empty(B, H), dc0


def _setup_context(ctx, inputs, output):
    xp, w_hh, b_hn, h0, c0, lengths, cell_id, reverse, batch_first, save, *config = inputs
    y, _, _, saved, cs = output
    if not save:
        ctx.unsaved = True
        return
    ctx.unsaved = False
    ctx.save_for_backward(w_hh, h0, c0, lengths, y, saved, cs)
    ctx.args = (cell_id, reverse, batch_first, *config)
    ctx.has_b_hn = b_hn is not None


def _backward(ctx, dy, dhn, dcn, _dsaved, _dcs):
    if ctx.unsaved:
        raise RuntimeError("rnn_triton: backward through a forward that ran without saving for backward")
    w_hh, h0, c0, lengths, y, saved, cs = ctx.saved_tensors
    cell_id, batch_first = ctx.args[0], ctx.args[2]
    state_shape = (_time_major(y, batch_first).shape[1], w_hh.shape[1])
    dy = torch.zeros_like(y) if dy is None else dy
    dhn = y.new_zeros(state_shape) if dhn is None else dhn
    dcn = dhn if cell_id != _LSTM else (y.new_zeros(state_shape) if dcn is None else dcn)  # unread
    dxp, dw_hh, db_hn, dh0, dc0 = recurrent_bwd(dy, dhn, dcn, w_hh, saved, cs, h0, c0, lengths, y,
                                                *ctx.args)
    return (dxp, dw_hh, db_hn if ctx.has_b_hn else None, dh0 if h0 is not None else None,
            dc0 if c0 is not None else None) + (None,) * 12


recurrent_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("rnn_triton: double backward (a gradient of a gradient) through the Triton kernels "
                       "is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


recurrent_bwd.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def recurrent_layer(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                    b_hh: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                    config: KernelConfig, batch_first: bool, reverse: bool = False,
                    lengths: Optional[Tensor] = None):
    """One layer, one direction. x: [T, B, I] ([B, T, I] when batch_first); h0, c0: [B, H] or None;
    lengths: int32 [B] per-row sequence lengths (see recurrent_fwd) or None.

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
    y, hn, cn, _, _ = recurrent_fwd(xp, w_hh, b_hn, h0, c0, lengths, spec.kernel_id, reverse, batch_first,
                                    save, config.variant, config.block_b, config.block_h, config.block_u,
                                    config.groups, config.w_chunk, config.num_warps)
    return y, hn, (cn if spec.kernel_id == _LSTM else None)
