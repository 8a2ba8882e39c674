"""One step of a cell (``nn.LSTMCell`` / ``GRUCell`` / ``RNNCell``), the GEMMs and the cell math fused.

For autoregressive decoding, where each step's input depends on the last step's output, so there is no
sequence to hand a time loop. Forward, one launch:

    a_k = x @ W_ih,k^T + h @ W_hh,k^T + b_ih,k + b_hh,k     (GRU's n-slot keeps h @ W_hn^T + b_hn apart)
    h', c', saved = cells.cell_forward(a)

Program (u, b) owns BLOCK_U hidden units (every gate's rows for them, so the cell math stays local) and
BLOCK_B batch rows. It walks the K dimension, I then H, in chunks of BLOCK_K: each chunk is one [BLOCK_U,
BLOCK_K] tile per gate of W_ih (then W_hh) times the matching [BLOCK_K, BLOCK_B] tile of x^T (then h^T),
accumulated in fp32 (fp64 in the interpreter). No size is held whole, so any I and H compile to the same
registers; the weights are read once per batch tile.

Backward, one launch. dgates = cells.cell_backward(dh', dc', saved, ...) is elementwise; the input and
state gradients are the GEMMs dx = sum_k dgates_k @ W_ih,k and dh = sum_k dr_k @ W_hh,k (+ GRU's direct
z*dh'). A program owns BLOCK_N output columns (of dx, or of dh) and BLOCK_B batch rows and walks all H
units in chunks of BLOCK_U as the dot's K, recomputing that chunk's dgates from the saved slots (cheap,
elementwise, read through L2) rather than waiting for another program to publish them. The programs that
own state columns also store dgates, GRU's dr_n and LSTM's dc for their own units: the host forms
dW_ih = dgates^T x, dW_hh = dr^T h and the bias gradients from them with torch GEMMs.

Every tile is [units, batch rows] ("transposed") like the time loops', so the weight is the dot's left
operand. Sizes need not be powers of two: tiles pad to the block sizes and every load and store is masked;
padded lanes load as 0, which every cell maps to finite zeros, so they add nothing to any dot.
"""
import triton
import triton.language as tl

from .cells import GRU, LSTM, cell_backward, cell_forward
from .tiles import load_slots, row_offsets, store_slots


@triton.jit
def _gate_tile(w_ptr, gate, H, K, offs_u, mask_u, offs_k, mask_k, DOT_DTYPE: tl.constexpr):
    """W[gate*H + u, k] for u in offs_u, k in offs_k: a [units, K] tile of a row-major [G*H, K] weight,
    contiguous along K. Row offsets in 64 bits (G*H*K may pass 2^31)."""
    rows = (gate * H + offs_u).to(tl.int64) * K
    return tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=mask_u[:, None] & mask_k[None, :],
                   other=0.0).to(DOT_DTYPE)


@triton.jit
def _bias(b_ptr, gate, H, offs_u, mask_u, ACC: tl.constexpr):
    """b[gate*H + u] as a [units, 1] column."""
    return tl.load(b_ptr + gate * H + offs_u[:, None], mask=mask_u[:, None], other=0.0).to(ACC)


@triton.jit
def _project(acc0, acc1, acc2, acc3, v_ptr, stride_v, w_ptr, K, H, offs_u, mask_u, offs_b, mask_b,
             N_TO_SLOT3: tl.constexpr, NUM_GATES: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc_k += W_k[units, :] @ v^T[:, rows] for each gate k, v: [B, K] (unit stride along K), W: [G*H, K].

    The K loop runs in chunks of BLOCK_K, so registers do not grow with K. N_TO_SLOT3: gate 2 goes to
    acc3 instead of acc2 (GRU's h @ W_hn^T, which r multiplies alone; GRU has no gate 3).
    """
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        v = tl.load(v_ptr + row_offsets(offs_b, stride_v, offs_k), mask=mask_k[:, None] & mask_b[None, :],
                    other=0.0).to(DOT_DTYPE)
        acc0 = tl.dot(_gate_tile(w_ptr, 0, H, K, offs_u, mask_u, offs_k, mask_k, DOT_DTYPE), v, acc=acc0,
                      input_precision=PRECISION)
        if NUM_GATES > 1:
            acc1 = tl.dot(_gate_tile(w_ptr, 1, H, K, offs_u, mask_u, offs_k, mask_k, DOT_DTYPE), v, acc=acc1,
                          input_precision=PRECISION)
            w2 = _gate_tile(w_ptr, 2, H, K, offs_u, mask_u, offs_k, mask_k, DOT_DTYPE)
            if N_TO_SLOT3:
                acc3 = tl.dot(w2, v, acc=acc3, input_precision=PRECISION)
            else:
                acc2 = tl.dot(w2, v, acc=acc2, input_precision=PRECISION)
        if NUM_GATES > 3:
            acc3 = tl.dot(_gate_tile(w_ptr, 3, H, K, offs_u, mask_u, offs_k, mask_k, DOT_DTYPE), v, acc=acc3,
                          input_precision=PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def cell_step_fwd_kernel(
    x_ptr, stride_x,                    # [B, I], unit stride along I
    w_ih_ptr, w_hh_ptr,                 # [G*H, I], [G*H, H], contiguous
    b_ih_ptr, b_hh_ptr,                 # [G*H] (read when HAS_BIAS)
    hx_ptr, cx_ptr,                     # [B, H] contiguous (read when HAS_H; cx: LSTM)
    hy_ptr, cy_ptr,                     # [B, H] out (cy: LSTM)
    saved_ptr, cs_ptr,                  # [B, NUM_SAVED*H], [B, H] accumulation dtype (when SAVE; cs: LSTM)
    B, I, H,
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_H: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_u = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_u = offs_u < H
    mask_b = offs_b < B
    mask = mask_u[:, None] & mask_b[None, :]

    # Accumulators start from the biases. GRU: slot 2 collects x @ W_in^T + b_in (x_n), slot 3 h @ W_hn^T;
    # b_hn stays out of both, for cell_forward to add inside r * (...).
    acc0 = tl.zeros([BLOCK_U, BLOCK_B], ACC)
    acc1 = tl.zeros([BLOCK_U, BLOCK_B], ACC)
    acc2 = tl.zeros([BLOCK_U, BLOCK_B], ACC)
    acc3 = tl.zeros([BLOCK_U, BLOCK_B], ACC)
    b_hn = tl.zeros([BLOCK_U, 1], ACC)
    if HAS_BIAS:
        acc0 += _bias(b_ih_ptr, 0, H, offs_u, mask_u, ACC) + _bias(b_hh_ptr, 0, H, offs_u, mask_u, ACC)
        if NUM_GATES > 1:
            acc1 += _bias(b_ih_ptr, 1, H, offs_u, mask_u, ACC) + _bias(b_hh_ptr, 1, H, offs_u, mask_u, ACC)
            acc2 += _bias(b_ih_ptr, 2, H, offs_u, mask_u, ACC)
            if CELL == GRU:
                b_hn += _bias(b_hh_ptr, 2, H, offs_u, mask_u, ACC)
            else:
                acc2 += _bias(b_hh_ptr, 2, H, offs_u, mask_u, ACC)
        if NUM_GATES > 3:
            acc3 += _bias(b_ih_ptr, 3, H, offs_u, mask_u, ACC) + _bias(b_hh_ptr, 3, H, offs_u, mask_u, ACC)

    acc0, acc1, acc2, acc3 = _project(acc0, acc1, acc2, acc3, x_ptr, stride_x, w_ih_ptr, I, H, offs_u, mask_u,
                                      offs_b, mask_b, False, NUM_GATES, BLOCK_K, DOT_DTYPE, PRECISION)
    state_offs = row_offsets(offs_b, H, offs_u)
    h = tl.zeros([BLOCK_U, BLOCK_B], ACC)
    c = tl.zeros([BLOCK_U, BLOCK_B], ACC)
    if HAS_H:  # without a state, h = c = 0: nothing of W_hh is read
        acc0, acc1, acc2, acc3 = _project(acc0, acc1, acc2, acc3, hx_ptr, H, w_hh_ptr, H, H, offs_u, mask_u,
                                          offs_b, mask_b, CELL == GRU, NUM_GATES, BLOCK_K, DOT_DTYPE,
                                          PRECISION)
        if CELL == GRU:
            h = tl.load(hx_ptr + state_offs, mask=mask, other=0.0).to(ACC)
        if CELL == LSTM:
            c = tl.load(cx_ptr + state_offs, mask=mask, other=0.0).to(ACC)

    if CELL == GRU:
        h_new, c_new, s0, s1, s2, s3 = cell_forward(CELL, acc0, acc1, acc3, acc3, acc2, b_hn, h, c)
    else:
        h_new, c_new, s0, s1, s2, s3 = cell_forward(CELL, acc0, acc1, acc2, acc3, acc2, b_hn, h, c)
    tl.store(hy_ptr + state_offs, h_new.to(hy_ptr.dtype.element_ty), mask=mask)
    if CELL == LSTM:
        tl.store(cy_ptr + state_offs, c_new.to(cy_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        store_slots(saved_ptr + row_offsets(offs_b, NUM_SAVED * H, offs_u), H, mask, NUM_SAVED, s0, s1, s2, s3)
        if CELL == LSTM:
            tl.store(cs_ptr + state_offs, c_new, mask=mask)


@triton.jit
def _cell_grads(offs_u, mask_u, offs_b, mask_b, dhy_ptr, dcy_ptr, saved_ptr, cs_ptr, hx_ptr, cx_ptr, H,
                CELL: tl.constexpr, NUM_SAVED: tl.constexpr, HAS_H: tl.constexpr, ACC: tl.constexpr):
    """cells.cell_backward for units offs_u and rows offs_b: (d0, d1, d2, d3, dr2, dh_direct, dc_prev),
    [units, rows] tiles, zero in masked lanes."""
    mask = mask_u[:, None] & mask_b[None, :]
    offs = row_offsets(offs_b, H, offs_u)
    dh = tl.load(dhy_ptr + offs, mask=mask, other=0.0).to(ACC)
    dc = tl.zeros_like(dh)
    c_new = tl.zeros_like(dh)
    prev = tl.zeros_like(dh)  # the state before the step: c (LSTM), h (GRU); 0 without a state
    if CELL == LSTM:
        dc = tl.load(dcy_ptr + offs, mask=mask, other=0.0).to(ACC)
        c_new = tl.load(cs_ptr + offs, mask=mask, other=0.0).to(ACC)
        if HAS_H:
            prev = tl.load(cx_ptr + offs, mask=mask, other=0.0).to(ACC)
    if CELL == GRU:
        if HAS_H:
            prev = tl.load(hx_ptr + offs, mask=mask, other=0.0).to(ACC)
    s0, s1, s2, s3 = load_slots(saved_ptr + row_offsets(offs_b, NUM_SAVED * H, offs_u), H, mask, NUM_SAVED,
                                ACC)
    return cell_backward(CELL, dh, dc, s0, s1, s2, s3, c_new, prev, prev)


@triton.jit
def _backprop(w_ptr, K, offs_j, mask_j, offs_b, mask_b, dhy_ptr, dcy_ptr, saved_ptr, cs_ptr, hx_ptr, cx_ptr,
              H, CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr, HAS_H: tl.constexpr,
              RECURRENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
              DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """sum_k W_k[:, j]^T-weighted gate gradients: out[j, b] = sum_{k,u} W[k*H + u, j] * g_k[u, b] for the
    columns offs_j of W [G*H, K], over all H units in chunks of BLOCK_U. g_k = dgates_k (input side) or
    dr_k (RECURRENT: GRU's n-slot is dr_n = dn * r there)."""
    out = tl.zeros([BLOCK_N, BLOCK_B], ACC)
    for u0 in range(0, H, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        mask_u = offs_u < H
        d0, d1, d2, d3, dr2, _dh_direct, _dc = _cell_grads(offs_u, mask_u, offs_b, mask_b, dhy_ptr, dcy_ptr,
                                                           saved_ptr, cs_ptr, hx_ptr, cx_ptr, H, CELL,
                                                           NUM_SAVED, HAS_H, ACC)
        w = tl.trans(_gate_tile(w_ptr, 0, H, K, offs_u, mask_u, offs_j, mask_j, DOT_DTYPE))
        out = tl.dot(w, d0.to(DOT_DTYPE), acc=out, input_precision=PRECISION)
        if NUM_GATES > 1:
            w = tl.trans(_gate_tile(w_ptr, 1, H, K, offs_u, mask_u, offs_j, mask_j, DOT_DTYPE))
            out = tl.dot(w, d1.to(DOT_DTYPE), acc=out, input_precision=PRECISION)
            w = tl.trans(_gate_tile(w_ptr, 2, H, K, offs_u, mask_u, offs_j, mask_j, DOT_DTYPE))
            if RECURRENT:
                out = tl.dot(w, dr2.to(DOT_DTYPE), acc=out, input_precision=PRECISION)
            else:
                out = tl.dot(w, d2.to(DOT_DTYPE), acc=out, input_precision=PRECISION)
        if NUM_GATES > 3:
            w = tl.trans(_gate_tile(w_ptr, 3, H, K, offs_u, mask_u, offs_j, mask_j, DOT_DTYPE))
            out = tl.dot(w, d3.to(DOT_DTYPE), acc=out, input_precision=PRECISION)
    return out


@triton.jit
def cell_step_bwd_kernel(
    dhy_ptr, dcy_ptr,                   # [B, H] dLoss/dh', dLoss/dc' (LSTM), contiguous
    saved_ptr, cs_ptr,                  # from the forward (SAVE)
    hx_ptr, cx_ptr,                     # [B, H] the forward's states (read when HAS_H), contiguous
    w_ih_ptr, w_hh_ptr,                 # [G*H, I], [G*H, H], contiguous
    dx_ptr,                             # [B, I] out (programs pid_n < n_dx_blocks)
    dhx_ptr, dcx_ptr,                   # [B, H] out (NEED_STATE; dcx: LSTM)
    dg_ptr, dq_ptr,                     # [B, G*H] out: dLoss/dgates;  [B, H] out (GRU): dLoss/d(h @ W_hn^T)
    B, I, H, n_dx_blocks,
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_H: tl.constexpr, NEED_STATE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (n_dx_blocks + cdiv(H, BLOCK_N), cdiv(B, BLOCK_B)): the first n_dx_blocks column programs
    form dx, the others own BLOCK_N state units each (their dgates, dr_n, dc, and dh when NEED_STATE)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if pid_n < n_dx_blocks:
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_j = offs_j < I
        dx = _backprop(w_ih_ptr, I, offs_j, mask_j, offs_b, mask_b, dhy_ptr, dcy_ptr, saved_ptr, cs_ptr, hx_ptr,
                       cx_ptr, H, CELL, NUM_GATES, NUM_SAVED, HAS_H, False, BLOCK_B, BLOCK_N, BLOCK_U, DOT_DTYPE,
                       ACC, PRECISION)
        tl.store(dx_ptr + row_offsets(offs_b, I, offs_j), dx.to(dx_ptr.dtype.element_ty),
                 mask=mask_j[:, None] & mask_b[None, :])
    else:
        offs_j = (pid_n - n_dx_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_j = offs_j < H
        mask = mask_j[:, None] & mask_b[None, :]
        d0, d1, d2, d3, dr2, dh_direct, dc_prev = _cell_grads(offs_j, mask_j, offs_b, mask_b, dhy_ptr, dcy_ptr,
                                                              saved_ptr, cs_ptr, hx_ptr, cx_ptr, H, CELL,
                                                              NUM_SAVED, HAS_H, ACC)
        store_slots(dg_ptr + row_offsets(offs_b, NUM_GATES * H, offs_j), H, mask, NUM_GATES, d0, d1, d2, d3)
        state_offs = row_offsets(offs_b, H, offs_j)
        if CELL == GRU:
            tl.store(dq_ptr + state_offs, dr2.to(dq_ptr.dtype.element_ty), mask=mask)
        if NEED_STATE:
            dh = _backprop(w_hh_ptr, H, offs_j, mask_j, offs_b, mask_b, dhy_ptr, dcy_ptr, saved_ptr, cs_ptr,
                           hx_ptr, cx_ptr, H, CELL, NUM_GATES, NUM_SAVED, HAS_H, True, BLOCK_B, BLOCK_N,
                           BLOCK_U, DOT_DTYPE, ACC, PRECISION)
            if CELL == GRU:
                dh += dh_direct
            tl.store(dhx_ptr + state_offs, dh.to(dhx_ptr.dtype.element_ty), mask=mask)
            if CELL == LSTM:
                tl.store(dcx_ptr + state_offs, dc_prev.to(dcx_ptr.dtype.element_ty), mask=mask)
