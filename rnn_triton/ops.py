"""The recurrent part of one layer as torch ops: the Triton time loops, with autograd.

``recurrent_directions`` is a whole layer, all its directions (``recurrent_layer``: one direction):

    xp = x @ W_ih^T + b                 one GEMM over all steps and directions (torch; autograd)
    y, hn, cn = recurrent_fwd(xp, ...)  the persistent Triton time loop over all T steps: one launch
                                        for both directions in the tile kernel, else one per
                                        direction (one per step stepwise)

``rnn_triton::recurrent_fwd`` / ``rnn_triton::recurrent_bwd`` are registered with ``torch.library``
(so ``torch.compile`` sees them as opaque ops, not graph breaks). The backward launches the reverse
loop once, which writes dLoss/dxp for every step; dW_hh is then one GEMM over all steps. Under
``create_graph=True`` those gradients also take the autograd graph of torch's recomputation of the
layer (``reference.recurrence``), so that a gradient of a gradient is exact (see ``_backward``).
"""
from contextlib import nullcontext
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from . import dispatch, reference, runtime
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
#: The time loops' compile options beyond num_warps (CUDA's ptxas only; the compile check builds them
#: with the same: ``dispatch.MAXNREG``).
_OPTIONS = {} if torch.version.hip else {"maxnreg": dispatch.MAXNREG}


def _precision(dtype: torch.dtype, device: torch.device, cell: str = ""):
    """(dot operand dtype, accumulation dtype, fp32 dot precision) for a storage dtype (and cell:
    ``dispatch.dot_precision``)."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        # torch.nn's RNNs run on cuDNN, which uses TF32 for float32 exactly when cudnn.allow_tf32 is set
        # (and the GPU has TF32: gfx90a has not).
        arch = dispatch.device_arch(device)
        tf32 = device.type == "cuda" and dispatch.dot_precision(dtype, device, arch, cell) == "tf32"
        return tl.float32, tl.float32, "tf32" if tf32 else "ieee"
    if dtype == torch.bfloat16 and runtime.interpreting():
        return tl.float32, tl.float32, "ieee"  # the interpreter's bf16 arithmetic is wrong: use fp32
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), tl.float32, "ieee"


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _time_major(t: Tensor, batch_first: bool) -> Tensor:
    return t.transpose(0, 1) if batch_first else t


def _check_fwd_args(xp, w_hh, b_hn, h0, c0, cell, batch_first, heads, variant) -> int:
    """Shapes the kernels rely on (metadata only: no synchronisation). Returns the blocks of W_hh
    (directions x heads)."""
    T, B, DGH = _time_major(xp, batch_first).shape
    H = w_hh.shape[1]
    blocks = w_hh.shape[0] // max(cell.num_gates * H, 1)
    torch._check(heads >= 1 and blocks in (heads, 2 * heads) and w_hh.shape[0] == blocks * cell.num_gates * H
                 and DGH == w_hh.shape[0],
                 lambda: f"xp {tuple(xp.shape)} and w_hh {tuple(w_hh.shape)} do not fit a {cell.name} of {heads} heads")
    torch._check(heads == 1 or variant == "tile-persistent", lambda: "heads run in the tile-persistent kernel only")
    torch._check(h0 is None or tuple(h0.shape) == (blocks, B, H), lambda: f"h0 must be [{blocks}, {B}, {H}]")
    torch._check(c0 is None or tuple(c0.shape) == (blocks, B, cell.num_c * H),
                 lambda: f"c0 must be [{blocks}, {B}, {cell.num_c * H}]")
    torch._check(not cell.num_c or (h0 is None) == (c0 is None), lambda: f"{cell.name} takes h0 and c0 together")
    # the compiled builds are those for sizes divisible by 16 (recurrent_directions pads to them)
    torch._check_value(xp.device.type != "cuda" or H % 16 == 0,
                       lambda: f"recurrent_fwd takes H = {H} on a GPU only padded to a multiple of 16 (padded_units)")
    torch._check(b_hn is None or tuple(b_hn.shape) == (blocks * H,), lambda: f"b_hn must be [{blocks * H}]")
    return blocks


def _num_blocks(w_hh: Tensor, cell_id: int) -> int:
    """The diagonal blocks of a stacked W_hh [blocks*G*H, H]: directions x heads."""
    return w_hh.shape[0] // (_CELL_BY_ID[cell_id].num_gates * w_hh.shape[1])


def _reversed(reverse: bool, d: int) -> bool:
    """Whether direction d runs its steps last to first (the kernels' rule)."""
    return (int(reverse) + d) % 2 == 1


@torch.library.custom_op("rnn_triton::recurrent_fwd", mutates_args=())
def recurrent_fwd(xp: Tensor, w_hh: Tensor, b_hn: Optional[Tensor], h0: Optional[Tensor],
                  c0: Optional[Tensor], lengths: Optional[Tensor], cell_id: int, reverse: bool,
                  batch_first: bool, save: bool,
                  variant: str, block_b: int, block_h: int, block_u: int, groups: int, w_chunk: int,
                  num_warps: int, fwd_chunk: int, heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward time loop of D = 1 or 2 directions of ``heads`` heads each at once (``variant``,
    ``fwd_chunk`` and the rest: see ``dispatch.KernelConfig``; ``w_chunk`` is the backward's, passed on
    to it). Each (direction, head) is a block k = d*heads + head of a block-diagonal recurrence, an
    independent recurrence of H units (H: a head's units).

    w_hh: [K*G*H, H] (on a GPU, H a multiple of 16), the blocks' W_hh stacked; xp: [T, B, K*G*H]
    (or [B, T, K*G*H] when batch_first), block k's projection in columns k*G*H..; b_hn: [K*H];
    h0: [K, B, H]; c0: [K, B, C*H] (the cell's C states beside h: the LSTM's c; the sLSTM's c, n, m).
    Direction d runs its steps last to first when reverse + d is odd (a bidirectional layer: D = 2,
    reverse False). Heads (more than 1) run in the tile-persistent kernel only.

    ``lengths`` (int32 [B], on xp's device, each in 1..T): per-row sequence lengths, as a packed
    sequence has; a row stops at its length (y is zero past it, hn is its last state), and in reverse
    it starts from its own last element.

    Returns y [T, B, K*H] (layout of xp; the blocks concatenated, as torch.nn's output), hn
    [K, B, H], cn [K, B, C*H] (empty without C), and, when ``save``, the per-step slots saved
    [K, T, B, NUM_SAVED*H] and states cs [K, T, B, C*H] that backward needs (else empty). cs is
    differentiable: its gradient enters the backward loop as dy does h's.
    """
    cell = _CELL_BY_ID[cell_id]
    K = _check_fwd_args(xp, w_hh, b_hn, h0, c0, cell, batch_first, heads, variant)  # the blocks
    if xp.stride(-1) != 1:  # the kernel reads gate units at unit stride
        xp = xp.contiguous()
    xp_tm = _time_major(xp, batch_first)
    T, B, _ = xp_tm.shape
    H = w_hh.shape[1]
    y = (xp.new_empty if lengths is None else xp.new_zeros)(xp.shape[:-1] + (K * H,))  # 0 past each length
    y_tm = _time_major(y, batch_first)
    hn = xp.new_empty(K, B, H)
    C = cell.num_c
    cn = xp.new_empty(K, B, C * H) if C else xp.new_empty(0)
    acc = _acc_torch_dtype(xp.dtype)
    # what backward needs, in the storage dtype: the pre-activations (kernels/cells.py) and c
    saved = xp.new_empty(K, T, B, cell.num_saved * H) if save else xp.new_empty(0)
    cs = xp.new_empty(K, T, B, C * H) if save and C else xp.new_empty(0)
    if T == 0 or B == 0:  # no steps: the final state is the initial one
        hn.copy_(h0 if h0 is not None else torch.zeros_like(hn))
        if C:
            cn.copy_(c0 if c0 is not None else torch.zeros_like(cn))
        return y, hn, cn, saved, cs
    dot_dtype, acc_dtype, precision = _precision(xp.dtype, xp.device, cell.name)
    has_h0 = h0 is not None
    constexprs = dict(CELL=cell_id, NUM_GATES=cell.num_gates, NUM_SAVED=cell.num_saved, HAS_H0=has_h0,
                      SAVE=save, BLOCK_B=block_b, DOT_DTYPE=dot_dtype, ACC=acc_dtype, PRECISION=precision)
    w_hh = w_hh.contiguous()
    b_hn = b_hn.contiguous() if b_hn is not None else xp.new_zeros(K * H)
    h0 = h0.contiguous() if has_h0 else None
    c0 = c0.contiguous() if c0 is not None else None
    GH = cell.num_gates * H
    if variant == "tile-persistent":  # every block (direction, head) in one launch
        persistent_fwd_kernel[(triton_cdiv(B, block_b), K)](
            xp_tm, xp_tm.stride(0), xp_tm.stride(1), w_hh, b_hn, hn if h0 is None else h0, hn if c0 is None else c0,
            y_tm, y_tm.stride(0), y_tm.stride(1), hn, cn, saved, cs, lengths if lengths is not None else hn,
            T, B, H, int(reverse), heads,
            BLOCK_H=block_h, HAS_LENGTHS=lengths is not None, GROUPED=K > 1, NUM_C=max(C, 1),
            **constexprs, num_warps=num_warps, num_stages=1, **_OPTIONS,
        )
        runtime.launches["persistent_fwd"] += 1
        return y, hn, cn, saved, cs
    # The cooperative kernel: a launch per direction (no heads: K = D). The carry: c (LSTM) or the fp32
    # h (GRU) of each unit, from its initial value.
    D = K
    init = c0 if cell_id == _LSTM else (h0 if cell_id == _GRU else None)
    carry = init.to(acc, copy=True) if init is not None else xp.new_zeros(D, B, H, dtype=acc)
    runs = []  # the cooperative kernel's arguments, per direction
    for d in range(D):
        # direction d's slices
        xp_d, y_d = _columns(xp_tm, d, GH), _columns(y_tm, d, H)
        w_d, b_d = _at(w_hh.view(D, GH, H), d), _at(b_hn.view(D, H), d)
        h0_d, c0_d, hn_d, cn_d, saved_d, cs_d = (_at(t, d) for t in (h0, c0, hn, cn, saved, cs))
        rev = int(_reversed(reverse, d))
        runs.append(((xp_d, xp_d.stride(0), xp_d.stride(1), w_d, b_d, hn_d if h0_d is None else h0_d,
                      y_d, y_d.stride(0), y_d.stride(1), _at(carry, d), saved_d, cs_d,
                      lengths if lengths is not None else hn_d), (T, B, H, rev)))
    _run_cooperative(cooperative_fwd_kernel, variant, (triton_cdiv(H, block_u), groups), T, "fwd", runs,
                     dict(constexprs, BLOCK_U=block_u, **dispatch.k_tiles(block_h), W_CHUNK=fwd_chunk,
                          HAS_LENGTHS=lengths is not None), num_warps)
    for d in range(D):  # each row's last h: at its own last step (past it the carry holds: cn is right)
        y_d, rev = _columns(y_tm, d, H), _reversed(reverse, d)
        if rev or lengths is None:
            hn[d].copy_(y_d[0 if rev else T - 1])
        else:
            hn[d].copy_(y_d[lengths.long() - 1, torch.arange(B, device=y.device)])
    if cell_id == _LSTM:
        cn.copy_(carry)
    return y, hn, cn, saved, cs


def _columns(t: Tensor, d: int, width: int) -> Tensor:
    """Direction d's columns of ``t`` (a view)."""
    return t[..., d * width:(d + 1) * width]


def _at(t: Optional[Tensor], d: int) -> Optional[Tensor]:
    """Direction d's slice of a [D, ...] tensor (a view); None and empty placeholders as they are."""
    return t if t is None or t.numel() == 0 else t[d]


def _run_cooperative(kernel, variant, grid, T, direction, runs, constexprs, num_warps):
    """Run a cooperative kernel over all its steps (T forward, T + 1 backward) for each of ``runs``
    (one (args, sizes) per direction): one launch whose programs meet at a grid barrier each step, or
    (``stepwise``) one launch per step. Two directions run concurrently, each on its own CUDA stream,
    where both grids are resident at once; else one after the other.

    The barrier counts arrivals per batch group; a program that waits past BARRIER_MAX_SPINS sets the
    error flag and leaves, and this raises, rather than hang the GPU.
    """
    device = runs[0][0][0].device
    constexprs = dict(constexprs, SPLIT=num_warps)  # the dot's K split over the program's warps
    steps = T if direction == "fwd" else T + 1
    cooperative = variant == "cooperative" and steps * grid[0] < 2 ** 31  # the barrier's int32 count
    concurrent = False
    if cooperative and device.type == "cuda":
        args, sizes = runs[0]
        flag = torch.zeros(1, dtype=torch.int32, device=device)  # stands in for sync and error
        full_args = (*args, flag, flag, *sizes, 0, steps, BARRIER_MAX_SPINS)
        cooperative = _all_resident(kernel, grid, full_args, constexprs, num_warps, device)
        concurrent = cooperative and len(runs) > 1 and _all_resident(
            kernel, (grid[0], grid[1] * len(runs)), full_args, constexprs, num_warps, device)
    streams = _fork(len(runs), device) if concurrent else [None] * len(runs)
    launches = [(0, steps)] if cooperative else [(s, s + 1) for s in range(steps)]
    errors = []
    for (args, sizes), stream in zip(runs, streams):
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            sync = torch.zeros(grid[1], dtype=torch.int32, device=device)
            error = torch.zeros(1, dtype=torch.int32, device=device)
            for begin, end in launches:
                kernel[grid](*args, sync, error, *sizes, begin, end, BARRIER_MAX_SPINS,
                             COOPERATIVE=cooperative, **constexprs, num_warps=num_warps, num_stages=1,
                             **_OPTIONS)
            errors.append(error)
    if concurrent:
        _join(streams)
        runtime.launches[f"{direction}_directions_concurrent"] += 1  # not a launch
    runtime.launches[f"{'cooperative' if cooperative else 'stepwise'}_{direction}"] += len(launches) * len(runs)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cooperative and not capturing and any(error.item() for error in errors):
        raise RuntimeError(f"rnn_triton: the cooperative {direction} kernel's grid barrier timed out: its "
                           f"{grid[0] * grid[1]} programs were not all resident on the GPU at once (another "
                           f"kernel running concurrently?). Its outputs are invalid.")


def _fork(n: int, device: torch.device) -> list:
    """The current stream and n - 1 side streams that start after everything queued on it so far.
    (torch hands out streams from a shared pool: other code may queue on the same one, which costs
    overlap, never correctness.)"""
    main = torch.cuda.current_stream(device)
    sides = _side_streams.setdefault(device.index, [])
    while len(sides) < n - 1:
        sides.append(torch.cuda.Stream(device))
    for side in sides[:n - 1]:
        side.wait_stream(main)
    return [main] + sides[:n - 1]


def _join(streams: list) -> None:
    """The first stream waits for the others: what follows on it sees all their work. (The kernels'
    tensors were allocated on the first stream and stay alive past this point; each side run's
    barrier counters and error flag were allocated on its own stream, used only there and read
    after this.)"""
    for side in streams[1:]:
        streams[0].wait_stream(side)


_side_streams: dict = {}
_resident_cache: dict = {}


def _all_resident(kernel, grid, args, constexprs, num_warps, device) -> bool:
    """Whether the GPU holds all of ``grid`` at once, from the compiled kernel's own registers and
    shared memory (the dispatcher planned with the compile check's sm_90 numbers; another Triton
    version or GPU may differ). Compiling does not launch anything."""
    key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())), num_warps,
           grid, device.index)
    if key not in _resident_cache:
        compiled = kernel.warmup(*args, grid=grid, COOPERATIVE=True, **constexprs, num_warps=num_warps,
                                 num_stages=1, **_OPTIONS)
        compiled._init_handles()
        props = dispatch.device_props(device)
        per_sm = dispatch.resident_blocks(props, num_warps, compiled.n_regs, compiled.metadata.shared)
        _resident_cache[key] = grid[0] * grid[1] <= props.sm_count * per_sm
    return _resident_cache[key]


@recurrent_fwd.register_fake
def _(xp, w_hh, b_hn, h0, c0, lengths, cell_id, reverse, batch_first, save, variant, block_b, block_h,
      block_u, groups, w_chunk, num_warps, fwd_chunk, heads):
    cell = _CELL_BY_ID[cell_id]
    T, B, _ = _time_major(xp, batch_first).shape
    H = w_hh.shape[1]
    K, C = _num_blocks(w_hh, cell_id), cell.num_c
    y = xp.new_empty(xp.shape[:-1] + (K * H,))
    cn = xp.new_empty(K, B, C * H) if C else xp.new_empty(0)
    saved = xp.new_empty(K, T, B, cell.num_saved * H) if save else xp.new_empty(0)
    cs = xp.new_empty(K, T, B, C * H) if save and C else xp.new_empty(0)
    return y, xp.new_empty(K, B, H), cn, saved, cs


@torch.library.custom_op("rnn_triton::recurrent_bwd", mutates_args=())
def recurrent_bwd(dy: Tensor, dhn: Tensor, dcn: Tensor, w_hh: Tensor, saved: Tensor, cs: Tensor,
                  h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor], y: Tensor,
                  cell_id: int, reverse: bool,
                  batch_first: bool, variant: str, block_b: int, block_h: int, block_u: int, groups: int,
                  w_chunk: int, num_warps: int, heads: int,
                  dcs: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward time loop of the forward's blocks (directions x heads) and variant, then dW_hh as GEMMs
    over all steps. ``dcs``: dLoss/d(cs) (the forward's per-step states beside h), or None.

    Returns dxp (layout of y, K*G*H wide), dW_hh [K*G*H, H], db_hn [K*H] (GRU; else empty), dh0
    [K, B, H], dc0 [K, B, C*H] (empty without C).
    """
    cell = _CELL_BY_ID[cell_id]
    if dcs is not None and (dcs.numel() == 0 or not cell.num_c):  # no states beside h: nothing to add
        dcs = None
    torch._check(dcs is None or dcs.shape == cs.shape,
                 lambda: f"dcs must have cs's shape {tuple(cs.shape)}: save the forward for its backward")
    if dy.stride(-1) != 1:  # the kernel reads hidden units at unit stride (dy may be an expanded scalar)
        dy = dy.contiguous()
    y_tm = _time_major(y, batch_first)
    dy_tm = _time_major(dy, batch_first)
    H = w_hh.shape[1]
    K = _num_blocks(w_hh, cell_id)  # the blocks: directions x heads
    T, B, _ = y_tm.shape
    G = cell.num_gates
    new = y.new_empty if lengths is None else y.new_zeros  # zero past each length
    dxp = new(y.shape[:-1] + (K * G * H,))
    dxp_tm = _time_major(dxp, batch_first)
    dqn = new(K, T, B, H) if cell_id == _GRU else y.new_empty(0)
    dh0 = y.new_empty(K, B, H)
    dc0 = y.new_empty(K, B, cell.num_c * H) if cell.num_c else y.new_empty(0)
    if T > 0 and B > 0:
        dot_dtype, acc_dtype, precision = _precision(y.dtype, y.device, cell.name)
        has_h0 = h0 is not None
        constexprs = dict(CELL=cell_id, NUM_GATES=G, NUM_SAVED=cell.num_saved, HAS_H0=has_h0,
                          BLOCK_B=block_b, DOT_DTYPE=dot_dtype, ACC=acc_dtype, PRECISION=precision)
        GH = G * H
        dhn, w_hh = dhn.contiguous(), w_hh.contiguous()
        dcn = dcn.contiguous() if cell.num_c else None
        h0 = h0.contiguous() if has_h0 else None
        c0 = c0.contiguous() if c0 is not None else None
        tile = variant == "tile-persistent"
        if tile:  # every block (direction, head) in one launch
            dcs = dcs.contiguous() if dcs is not None else None
            persistent_bwd_kernel[(triton_cdiv(B, block_b), K)](
                dy_tm, dy_tm.stride(0), dy_tm.stride(1), dhn, dhn if dcn is None else dcn, w_hh, saved, cs,
                dh0 if h0 is None else h0, dh0 if c0 is None else c0, y_tm, y_tm.stride(0), y_tm.stride(1),
                dxp_tm, dxp_tm.stride(0), dxp_tm.stride(1), dqn, dh0, dc0, dh0 if dcs is None else dcs,
                lengths if lengths is not None else dh0, T, B, H, int(reverse), heads,
                BLOCK_H=block_h, HAS_LENGTHS=lengths is not None, GROUPED=K > 1, STATE_GRADS=dcs is not None,
                NUM_C=max(cell.num_c, 1),
                **constexprs, num_warps=num_warps, num_stages=1, **_OPTIONS,
            )
            runtime.launches["persistent_bwd"] += 1
        else:
            torch._check(dcs is None, lambda: "the cooperative kernels take no gradient of the per-step states")
            D = K  # directions (no heads in the cooperative kernels)
            # The carry: dc (LSTM, from dLoss/dcn) or the direct part z*dh of dLoss/dh (GRU, from 0).
            acc = _acc_torch_dtype(y.dtype)
            carry = dcn.to(acc, copy=True) if cell_id == _LSTM else y.new_zeros(D, B, H, dtype=acc)
            w_t = w_hh.view(D * G, H, H).transpose(1, 2).contiguous().view(D, GH, H)  # W_k^T per gate
        runs = []  # the cooperative kernel's arguments, per direction
        for d in range(D) if not tile else []:
            dy_d, y_d, dxp_d = _columns(dy_tm, d, H), _columns(y_tm, d, H), _columns(dxp_tm, d, GH)
            dhn_d, h0_d, c0_d, saved_d, cs_d, dqn_d, dh0_d = (
                _at(t, d) for t in (dhn, h0, c0, saved, cs, dqn, dh0))
            h0_arg = dh0_d if h0_d is None else h0_d
            c0_arg = dh0_d if c0_d is None else c0_d
            rev = int(_reversed(reverse, d))
            runs.append(((dy_d, dy_d.stride(0), dy_d.stride(1), dhn_d, _at(w_t, d), saved_d, cs_d,
                          h0_arg, c0_arg, y_d, y_d.stride(0), y_d.stride(1),
                          dxp_d, dxp_d.stride(0), dxp_d.stride(1), dqn_d, dh0_d, _at(carry, d),
                          lengths if lengths is not None else dh0_d), (T, B, H, rev)))
        if not tile:
            _run_cooperative(cooperative_bwd_kernel, variant, (triton_cdiv(H, block_u), groups), T, "bwd", runs,
                             dict(constexprs, BLOCK_U=block_u, **dispatch.k_tiles(block_h), W_CHUNK=w_chunk,
                                  HAS_LENGTHS=lengths is not None), num_warps)
            if cell_id == _LSTM:
                dc0.copy_(carry)
    else:  # no steps: the gradients pass straight through
        dh0.copy_(dhn)
        if cell.num_c:
            dc0.copy_(dcn)
        dxp.zero_()
        dqn.zero_()

    # block k (direction k // heads) of the block-diagonal W_hh
    dw_hh = torch.cat([
        _dw_hh(torch.cat([dxp_tm[..., k * G * H:(k * G + 2) * H], dqn[k]], dim=-1) if cell_id == _GRU
               else dxp_tm[..., k * G * H:(k + 1) * G * H],
               y_tm[..., k * H:(k + 1) * H], None if h0 is None else h0[k], lengths, _reversed(reverse, k // heads))
        for k in range(K)])
    db_hn = dqn.sum(dim=(1, 2), dtype=_acc_torch_dtype(y.dtype)).to(y.dtype).reshape(K * H) \
        if cell_id == _GRU else y.new_empty(0)
    return dxp, dw_hh, db_hn, dh0, dc0


def _dw_hh(dr: Tensor, y: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """dW_hh = sum_t dr_t^T h_{t-1} over all (t, b), for one direction: dr [T, B, G*H] the gradients of
    the gates' recurrent parts, y [T, B, H] its outputs, h_{t-1} the state before step t in the
    direction's order (h0, or zeros, at each row's first step: t = 0, or in reverse its last element)."""
    T, B, H = y.shape
    GH = dr.shape[-1]
    if lengths is None:  # GEMMs over views of y: no copy of the previous states
        if T == 0:
            return y.new_zeros(GH, H)
        inner, first = (dr[:-1], dr[T - 1]) if reverse else (dr[1:], dr[0])
        prev = y[1:] if reverse else y[:-1]
        dw = inner.reshape(-1, GH).t() @ prev.reshape(-1, H)
        return dw if h0 is None else dw + first.t() @ h0
    # Per-row lengths: a row's first step in reverse is its own last element, so build the states.
    start = h0 if h0 is not None else y.new_zeros(B, H)
    if reverse:
        prev = torch.cat([y[1:], y.new_zeros(min(T, 1), B, H)])
        if T > 0:
            prev[lengths.long() - 1, torch.arange(B, device=y.device)] = start
    else:
        prev = torch.cat([start[None], y[:-1]])[:T]
    return dr.reshape(-1, GH).t() @ prev.reshape(-1, H)


@recurrent_bwd.register_fake
def _(dy, dhn, dcn, w_hh, saved, cs, h0, c0, lengths, y, cell_id, reverse, batch_first, variant, block_b,
      block_h, block_u, groups, w_chunk, num_warps, heads, dcs):
    D, B, H = dhn.shape
    cell = _CELL_BY_ID[cell_id]
    dxp = y.new_empty(y.shape[:-1] + (D * cell.num_gates * H,))
    db_hn = y.new_empty(D * H) if cell_id == _GRU else y.new_empty(0)
    dc0 = y.new_empty(D, B, cell.num_c * H) if cell.num_c else y.new_empty(0)
    return dxp, torch.empty_like(w_hh), db_hn, y.new_empty(D, B, H), dc0


def _setup_context(ctx, inputs, output):
    xp, w_hh, b_hn, h0, c0, lengths, cell_id, reverse, batch_first, save, *config = inputs
    y, _, _, saved, cs = output
    ctx.num_inputs = len(inputs)
    ctx.set_materialize_grads(False)  # an output nothing used gets None: cs's says whether to add dcs
    if not save:
        ctx.unsaved = True
        return
    ctx.unsaved = False
    # xp and b_hn are for a create_graph backward's recomputation (reference.recurrence) only: keeping
    # xp [T, B, D*G*H] until backward is the memory an exact second order costs (the saved slots hold
    # pre-activations rounded to the storage dtype, from which xp would come back only approximately).
    ctx.save_for_backward(xp, w_hh, b_hn, h0, c0, lengths, y, saved, cs)
    ctx.args = (cell_id, reverse, batch_first, *config[:7], config[8])  # recurrent_bwd's: all but fwd_chunk


def _backward(ctx, dy, dhn, dcn, _dsaved, dcs):
    """The kernels' backward (``recurrent_bwd``). Under ``create_graph=True`` (grad mode on here) the
    gradients keep the kernels' values and take the autograd graph of torch's recomputation of the
    layer (``reference``), so that they can be differentiated again."""
    if ctx.unsaved:
        raise RuntimeError("rnn_triton: backward through a forward that ran without saving for backward")
    xp, w_hh, b_hn, h0, c0, lengths, y, saved, cs = ctx.saved_tensors
    cell_id, reverse, batch_first = ctx.args[:3]
    num_c = _CELL_BY_ID[cell_id].num_c
    K, B, H = _num_blocks(w_hh, cell_id), _time_major(y, batch_first).shape[1], w_hh.shape[1]
    dy = torch.zeros_like(y) if dy is None else dy
    dhn = y.new_zeros(K, B, H) if dhn is None else dhn
    dcn = dhn if not num_c else (y.new_zeros(K, B, num_c * H) if dcn is None else dcn)  # unread without c
    with torch.no_grad():  # the values: the kernels; under create_graph their graph comes from below
        dxp, dw_hh, db_hn, dh0, dc0 = recurrent_bwd(dy, dhn, dcn, w_hh, saved, cs, h0, c0, lengths, y,
                                                    *ctx.args, dcs)
    grads = [dxp, dw_hh, db_hn if b_hn is not None else None, dh0 if h0 is not None else None,
             dc0 if c0 is not None else None]
    if torch.is_grad_enabled():
        torch._check(dcs is None, lambda: "rnn_triton: a create_graph=True backward does not take gradients of the "
                                          "per-step cell states (FlashRNN's states beyond h at every step)")
        inputs = (xp, w_hh, b_hn, h0, c0)
        recompute = lambda *xs: reference.recurrence(cell_id, *xs, lengths, reverse, batch_first,  # noqa: E731
                                                     ctx.args[-1])
        grads = reference.kernel_values_with_graph(grads, recompute, inputs,
                                                   (dy, dhn, dcn if num_c else None))
    return tuple(grads) + (None,) * (ctx.num_inputs - len(grads))


recurrent_fwd.register_autograd(_backward, setup_context=_setup_context)


def _not_differentiable(ctx, *grads):
    raise RuntimeError("rnn_triton: the backward ops' outputs are not differentiable themselves; a "
                       "create_graph=True backward through the modules differentiates a torch recomputation "
                       "instead (rnn_triton.reference)")


def _setup_nothing(ctx, inputs, output):
    pass


recurrent_bwd.register_autograd(_not_differentiable, setup_context=_setup_nothing)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def recurrent_layer(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                    b_hh: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                    config: KernelConfig, batch_first: bool, reverse: bool = False,
                    lengths: Optional[Tensor] = None):
    """One layer, one direction (run last step first when ``reverse``); see ``recurrent_directions``.
    h0, c0: [B, H] or None. Returns (y, hn [B, H], cn [B, H] or None)."""
    unsqueeze = (lambda t: None if t is None else t[None])
    y, hn, cn = recurrent_directions(cell, x, [(w_ih, w_hh, b_ih, b_hh, None)], unsqueeze(h0), unsqueeze(c0),
                                     config, batch_first, lengths, reverse)
    return y, hn[0], (None if cn is None else cn[0])


def recurrent_directions(cell: str, x: Tensor, weights, h0: Optional[Tensor], c0: Optional[Tensor],
                         config: KernelConfig, batch_first: bool, lengths: Optional[Tensor] = None,
                         reverse: bool = False, hidden_size: Optional[int] = None):
    """One layer, all its directions (the second one reversed): in one launch in the tile kernel, else
    one launch (or one per step, stepwise) per direction.

    x: [T, B, I] ([B, T, I] when batch_first); ``weights``: per direction (w_ih, w_hh, b_ih, b_hh,
    w_hr), torch.nn's parameters (biases None without bias; w_hr, the LSTM's projection, or None);
    h0: [D, B, H or P], c0: [D, B, H] or None; lengths: int32 [B] per-row sequence lengths (see
    recurrent_fwd) or None; hidden_size: H (the module's; else read off w_hh).

        xp = x @ W_ih^T + b       one GEMM for all steps and directions (torch; autograd differentiates it)
        y, hn, cn = recurrent_fwd(xp, ...)    the time loop of every direction

    H not a multiple of 16 runs padded to one with zero units (``padded_units``), sliced off after.

    A projected LSTM (w_hr [P, H]: h = W_hr m, m = o * tanh(c)) runs the same loop on m, whose
    recurrence is W_hh h_{t-1} = (W_hh W_hr) m_{t-1}: the kernel gets W_hh W_hr [4H, H], h0 enters as
    W_hh h0 added to the first step's projection, and y = m W_hr^T, hn = m_n W_hr^T after the loop.

    Returns (y [.., D*H or D*P], hn [D, B, H or P], cn [D, B, H] or None).
    """
    spec = CELLS[cell]
    D = len(weights)
    w_ih = [w[0] for w in weights]
    w_hh = [w[1] for w in weights]
    w_hr = [w[4] for w in weights] if weights[0][4] is not None else None
    # H from the module where it calls: a Python int even under torch.jit.trace, whose weight shapes
    # are traced values (the padding below branches on it)
    H = hidden_size or w_hh[0].shape[0] // spec.num_gates
    b_hn = None
    bias = None
    if weights[0][2] is not None:
        bias = []
        for _, _, b_ih, b_hh, _ in weights:
            if spec.kernel_id == _GRU:
                # b_hn multiplies with r inside the cell, so only b_hr and b_hz fold into the projection.
                bias.append(b_ih + torch.cat([b_hh[: 2 * H], torch.zeros_like(b_hh[2 * H:])]))
            else:
                bias.append(b_ih + b_hh)
        if spec.kernel_id == _GRU:
            b_hn = _cat([b_hh[2 * H:] for _, _, _, b_hh, _ in weights])
        bias = _cat(bias)
    xp = torch.nn.functional.linear(x, _cat(w_ih), bias)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, *(w for ws in weights for w in ws)))
    if w_hr is not None:
        if h0 is not None:
            xp = _add_at_first_steps(xp, torch.einsum("dbp,dgp->dbg", h0, torch.stack(w_hh)), lengths, batch_first,
                                     reverse)
            h0 = torch.zeros_like(c0)
        w_hh = [w @ r for w, r in zip(w_hh, w_hr)]
    w_hh = _cat(w_hh)
    Hp = -(-H // 16) * 16
    if Hp != H:  # zero units up to a multiple of 16: see ``padded_units``
        xp, b_hn, h0, c0 = (None if t is None else padded_units(t, H, Hp) for t in (xp, b_hn, h0, c0))
        w_hh = padded_units(padded_units(w_hh, H, Hp, 0), H, Hp, 1)
    y, hn, cn, _, _ = recurrent_fwd(xp, w_hh, b_hn, h0, c0, lengths, spec.kernel_id, reverse, batch_first,
                                    save, config.variant, config.block_b, config.block_h, config.block_u,
                                    config.groups, config.w_chunk, config.num_warps, config.fwd_chunk, 1)
    if Hp != H:
        y = y.unflatten(-1, (D, Hp))[..., :H].flatten(-2)
        hn, cn = hn[..., :H].contiguous(), cn[..., :H].contiguous() if cn.numel() else cn
    if w_hr is not None:
        w_hr = torch.stack(w_hr)
        y = torch.einsum("...dh,dph->...dp", y.unflatten(-1, (D, H)), w_hr).flatten(-2)
        hn = torch.einsum("dbh,dph->dbp", hn, w_hr)
    return y, hn, (cn if spec.kernel_id == _LSTM else None)


def padded_units(t: Tensor, units: int, to: int, dim: int = -1) -> Tensor:
    """``t`` with every block of ``units`` entries along ``dim`` (a gate's or a direction's hidden
    units) followed by ``to - units`` zeros.

    A layer whose H is not a multiple of 16 runs the kernels at H padded so: zero rows and columns of
    W_hh, zero projections and initial states. A padded unit then stays exactly 0 (every cell maps a
    zero state and zero pre-activations to a zero state) and reaches no real unit (its W_hh columns
    are 0), so the real units' outputs and gradients are those of the unpadded layer. The kernels see
    every size and stride divisible by 16, the specialisation Triton gives their vectorised loads
    (the builds for other H spill), so one build per configuration serves every H."""
    d = dim % t.dim()
    blocks = t.unflatten(d, (t.shape[d] // units, units))
    return torch.nn.functional.pad(blocks, [0, 0] * (t.dim() - d - 1) + [0, to - units]).flatten(d, d + 1)


def _cat(tensors):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _add_at_first_steps(xp: Tensor, v: Tensor, lengths: Optional[Tensor], batch_first: bool,
                        reverse: bool) -> Tensor:
    """xp + v placed at each direction's first step: v[d, b] goes to columns d*G.. of xp [T, B, D*G]
    at row b's step 0, or in a reversed direction at its last step (T - 1, or length - 1)."""
    xp_tm = _time_major(xp, batch_first)
    T, B, _ = xp_tm.shape
    D, _, G = v.shape
    rows = torch.arange(B, device=xp.device)
    last = lengths.long() - 1 if lengths is not None else torch.full((B,), T - 1, device=xp.device)
    first = [last if _reversed(reverse, d) else torch.zeros_like(rows) for d in range(D)]
    cols = torch.arange(D * G, device=xp.device).view(D, 1, G)
    index = (torch.stack(first)[:, :, None].expand(D, B, G), rows[None, :, None].expand(D, B, G),
             cols.expand(D, B, G))
    out = torch.index_put(xp_tm, index, v, accumulate=True)
    return _time_major(out, batch_first)
