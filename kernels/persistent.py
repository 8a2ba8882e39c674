"""Tile-persistent time loops: one program per batch tile keeps all of W_hh on chip for all T steps.

Both loops serve every cell (``CELL`` selects the math from ``cells``); a cell has NUM_GATES gate
slots of H units each, stacked in torch's order in W_hh [NUM_GATES*H, H].

Forward, per program (batch rows b0 .. b0+BLOCK_B):
    load W_hh^T once (NUM_GATES tiles [H, H]);  h, c <- h0, c0
    for s in 0 .. T-1:  t = s (or T-1-s when reverse)
        a_k = xp[t]_k + h @ W_k^T  (tl.dot, fp32 accumulation);  h, c = cell_forward(a, h, c)
        y[t] = h;  saved[t] = the cell's saved slots (and cs[t] = c for the LSTM) when SAVE
    hn, cn <- h, c

Backward, per program, reverse of the forward:
    load W_hh once (NUM_GATES tiles [H, H]);  dh, dc <- dhn, dcn
    for each step, last first:
        dh += dy[t];  dx, dc = cell_backward(dh, dc, saved[t], ...);  dxp[t] = dx
        dh = sum_k dr_k @ W_k  (+ the cell's direct term)
    dh0, dc0 <- dh, dc
The weight gradients are not accumulated here: the host forms them from dxp with large GEMMs.

Every tile is kept transposed, [BLOCK_H, BLOCK_B] (units x batch rows), so that the weight is the
left operand of each dot: gates^T = W_k @ h^T. With 128 units that is an M=128 dot, which Hopper runs
as wgmma reading W straight from shared memory; the other order would stream all of W through
registers every step and spill at H = 128.

Directions (D = DIRECTIONS = 1 or 2): with D = 2, W_hh holds both directions' weights stacked
([2*NUM_GATES*H, H]), the grid's second axis is the direction d, and its programs read and write
direction d's slice of every tensor: columns d*NUM_GATES*H.. of xp, columns d*H.. of y (so a
bidirectional layer's output is written concatenated, as torch.nn returns it), and [d] of the states
and saved tensors, which are stacked [D, ...]. Direction d runs reversed when reverse + d is odd, so
a bidirectional layer's two directions run concurrently in one launch.

Sizes need not be powers of two: tiles are padded to BLOCK_H / BLOCK_B and every load and store is
masked. Offsets along T and B are computed in 64 bits.

Variable lengths (HAS_LENGTHS, a packed sequence): row b has length L_b. Its s-th step is t = s, or
t = L_b - 1 - s in reverse; past its length a row neither reads nor writes, and keeps its state (the
forward: h, c, so hn is its last state; the backward: dh, dc). So a packed batch costs what the
padded one does, and nothing is computed for the padding.
"""
import triton
import triton.language as tl

from .cells import GRU, LSTM, cell_backward, cell_forward
from .tiles import load_gate_tiles, load_slots_at_once, row_offsets, row_steps, step_offsets, store_slots


@triton.jit
def persistent_fwd_kernel(
    xp_ptr, stride_xp_t, stride_xp_b,   # [T, B, D*NUM_GATES*H] input projection, biases folded in
    w_hh_ptr,                           # [D*NUM_GATES*H, H], contiguous
    b_hn_ptr,                           # [D*H] (GRU only)
    h0_ptr, c0_ptr,                     # [D, B, H] contiguous (read when HAS_H0)
    y_ptr, stride_y_t, stride_y_b,      # [T, B, D*H] output
    hn_ptr, cn_ptr,                     # [D, B, H] final states
    saved_ptr, cs_ptr,                  # [D, T, B, NUM_SAVED*H], [D, T, B, H] storage dtype (SAVE)
    lengths_ptr,                        # [B] int32 sequence lengths (read when HAS_LENGTHS; else all T)
    T, B, H, reverse,                   # reverse: 1 runs direction 0 last step first (see above)
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, DIRECTIONS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if DIRECTIONS == 2:  # a separate build: the moved pointers cost registers the one-way build lacks
        d = tl.program_id(1)  # the direction
        reverse = (reverse + d) % 2
        xp_ptr += d * NUM_GATES * H
        w_hh_ptr += d * NUM_GATES * H * H
        b_hn_ptr += d * H
        y_ptr += d * H
        state_stride_d = tl.cast(B, tl.int64) * H  # products of sizes in 64 bits
        h0_ptr += d * state_stride_d
        c0_ptr += d * state_stride_d
        hn_ptr += d * state_stride_d
        cn_ptr += d * state_stride_d
        saved_ptr += d * T * state_stride_d * NUM_SAVED
        cs_ptr += d * T * state_stride_d
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = mask_h[:, None] & (offs_b < B)[None, :]
    state_offs = row_offsets(offs_b, H, offs_h)

    w0, w1, w2, w3 = load_gate_tiles(w_hh_ptr, H, offs_h, mask_h, offs_h, mask_h, False, NUM_GATES, DOT_DTYPE)
    b_hn = tl.zeros([BLOCK_H, BLOCK_B], ACC)
    if CELL == GRU:
        b_hn += tl.load(b_hn_ptr + offs_h[:, None], mask=mask_h[:, None], other=0.0).to(ACC)
    h = tl.zeros([BLOCK_H, BLOCK_B], ACC)
    c = tl.zeros([BLOCK_H, BLOCK_B], ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask, other=0.0).to(ACC)
        if CELL == LSTM:
            c = tl.load(c0_ptr + state_offs, mask=mask, other=0.0).to(ACC)

    xp_rows = row_offsets(offs_b, stride_xp_b, offs_h)
    y_rows = row_offsets(offs_b, stride_y_b, offs_h)
    saved_rows = row_offsets(offs_b, NUM_SAVED * H, offs_h)
    saved_stride_t = tl.cast(B, tl.int64) * NUM_SAVED * H  # products of sizes in 64 bits too
    state_stride_t = tl.cast(B, tl.int64) * H
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + offs_b, mask=offs_b < B, other=0)
    for s in range(T):
        if HAS_LENGTHS:
            t, live = row_steps(s, lengths, reverse, T)
            step = mask & live  # a row past its length keeps its state and writes nothing
        else:
            t = s + reverse * (T - 1 - 2 * s)
            step = mask
        # a tensor's gate slots in one load: one round trip, not one per slot (tiles.load_slots_at_once)
        x0, x1, x2, x3 = load_slots_at_once(xp_ptr + step_offsets(t, stride_xp_t, xp_rows), H, step, NUM_GATES,
                                             ACC)
        hd = h.to(DOT_DTYPE)
        # The input projection is the dot's accumulator: a_k = x_k + h @ W_k^T without another tile
        # live. GRU's n-slot keeps h @ W_n^T apart, since r multiplies it alone.
        a0 = tl.dot(w0, hd, acc=x0, input_precision=PRECISION)
        a1 = a0
        a2 = a0
        a3 = a0
        if NUM_GATES > 1:
            a1 = tl.dot(w1, hd, acc=x1, input_precision=PRECISION)
            if CELL == GRU:
                a2 = tl.dot(w2, hd, out_dtype=ACC, input_precision=PRECISION)
            else:
                a2 = tl.dot(w2, hd, acc=x2, input_precision=PRECISION)
        if NUM_GATES > 3:
            a3 = tl.dot(w3, hd, acc=x3, input_precision=PRECISION)
        h_new, c_new, s0, s1, s2, s3 = cell_forward(CELL, a0, a1, a2, a3, x2, b_hn, h, c)
        # Padded lanes stay finite zeros: they are the K dimension of the next step's dot.
        h = tl.where(step, h_new, h)
        if HAS_LENGTHS:
            c = tl.where(step, c_new, c)
        else:
            c = c_new
        tl.store(y_ptr + step_offsets(t, stride_y_t, y_rows), h.to(y_ptr.dtype.element_ty), mask=step)
        if SAVE:
            store_slots(saved_ptr + step_offsets(t, saved_stride_t, saved_rows), H, step, NUM_SAVED,
                        s0, s1, s2, s3)
            if CELL == LSTM:
                tl.store(cs_ptr + step_offsets(t, state_stride_t, state_offs), c, mask=step)

    tl.store(hn_ptr + state_offs, h.to(hn_ptr.dtype.element_ty), mask=mask)
    if CELL == LSTM:
        tl.store(cn_ptr + state_offs, c.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def persistent_bwd_kernel(
    dy_ptr, stride_dy_t, stride_dy_b,   # [T, B, D*H] dLoss/dy
    dhn_ptr, dcn_ptr,                   # [D, B, H] dLoss/dhn, dLoss/dcn, contiguous
    w_hh_ptr,                           # [D*NUM_GATES*H, H], contiguous
    saved_ptr, cs_ptr,                  # from the forward (SAVE)
    h0_ptr, c0_ptr,                     # [D, B, H] initial states (read when HAS_H0)
    y_ptr, stride_y_t, stride_y_b,      # forward output [T, B, D*H] (GRU reads h_{t-1} from it)
    dxp_ptr, stride_dxp_t, stride_dxp_b,  # [T, B, D*NUM_GATES*H] out: dLoss/dxp
    dqn_ptr,                            # [D, T, B, H] out (GRU): dLoss/d(h @ W_hn^T), contiguous
    dh0_ptr, dc0_ptr,                   # [D, B, H] out
    lengths_ptr,                        # as in the forward
    T, B, H, reverse,                   # as in the forward
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, DIRECTIONS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if DIRECTIONS == 2:
        d = tl.program_id(1)  # the direction, as in the forward
        reverse = (reverse + d) % 2
        dy_ptr += d * H
        y_ptr += d * H
        dxp_ptr += d * NUM_GATES * H
        w_hh_ptr += d * NUM_GATES * H * H
        state_stride_d = tl.cast(B, tl.int64) * H
        dhn_ptr += d * state_stride_d
        dcn_ptr += d * state_stride_d
        h0_ptr += d * state_stride_d
        c0_ptr += d * state_stride_d
        dh0_ptr += d * state_stride_d
        dc0_ptr += d * state_stride_d
        saved_ptr += d * T * state_stride_d * NUM_SAVED
        cs_ptr += d * T * state_stride_d
        dqn_ptr += d * T * state_stride_d
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = mask_h[:, None] & (offs_b < B)[None, :]
    state_offs = row_offsets(offs_b, H, offs_h)

    w0, w1, w2, w3 = load_gate_tiles(w_hh_ptr, H, offs_h, mask_h, offs_h, mask_h, True, NUM_GATES, DOT_DTYPE)
    dh = tl.load(dhn_ptr + state_offs, mask=mask, other=0.0).to(ACC)
    dc = tl.zeros([BLOCK_H, BLOCK_B], ACC)
    state0 = tl.zeros([BLOCK_H, BLOCK_B], ACC)  # the state before the first step: c0 (LSTM), h0 (GRU)
    if CELL == LSTM:
        dc = tl.load(dcn_ptr + state_offs, mask=mask, other=0.0).to(ACC)
        if HAS_H0:
            state0 = tl.load(c0_ptr + state_offs, mask=mask, other=0.0).to(ACC)
    if CELL == GRU:
        if HAS_H0:
            state0 = tl.load(h0_ptr + state_offs, mask=mask, other=0.0).to(ACC)

    dy_rows = row_offsets(offs_b, stride_dy_b, offs_h)
    y_rows = row_offsets(offs_b, stride_y_b, offs_h)
    saved_rows = row_offsets(offs_b, NUM_SAVED * H, offs_h)
    dxp_rows = row_offsets(offs_b, stride_dxp_b, offs_h)
    saved_stride_t = tl.cast(B, tl.int64) * NUM_SAVED * H  # products of sizes in 64 bits too
    state_stride_t = tl.cast(B, tl.int64) * H
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + offs_b, mask=offs_b < B, other=0)
    for s in range(T):
        fs = T - 1 - s  # the forward's steps, last first
        if HAS_LENGTHS:
            t, live = row_steps(fs, lengths, reverse, T)
            step = mask & live  # a row without this step passes dh and dc through unchanged
        else:
            t = fs + reverse * (T - 1 - 2 * fs)
            step = mask
        # The step before t in the forward's order (clamped; at the first step state0 replaces it).
        t_prev = tl.minimum(tl.maximum(t - 1 + 2 * reverse, 0), T - 1)
        has_prev = fs > 0
        dh += tl.load(dy_ptr + step_offsets(t, stride_dy_t, dy_rows), mask=step, other=0.0).to(ACC)
        s0, s1, s2, s3 = load_slots_at_once(saved_ptr + step_offsets(t, saved_stride_t, saved_rows), H, step,
                                            NUM_SAVED, ACC)
        c_new = state0
        prev = state0
        if CELL == LSTM:
            c_new = tl.load(cs_ptr + step_offsets(t, state_stride_t, state_offs), mask=step, other=0.0).to(ACC)
            prev = tl.load(cs_ptr + step_offsets(t_prev, state_stride_t, state_offs), mask=step,
                           other=0.0).to(ACC)
        if CELL == GRU:
            prev = tl.load(y_ptr + step_offsets(t_prev, stride_y_t, y_rows), mask=step, other=0.0).to(ACC)
        prev = tl.where(has_prev, prev, state0)
        d0, d1, d2, d3, dq2, dh_direct, dc_prev = cell_backward(CELL, dh, dc, s0, s1, s2, s3, c_new, prev,
                                                                prev)
        store_slots(dxp_ptr + step_offsets(t, stride_dxp_t, dxp_rows), H, step, NUM_GATES, d0, d1, d2, d3)
        if CELL == GRU:
            tl.store(dqn_ptr + step_offsets(t, state_stride_t, state_offs), dq2.to(dqn_ptr.dtype.element_ty),
                     mask=step)
        dh_prev = tl.dot(w0, d0.to(DOT_DTYPE), out_dtype=ACC, input_precision=PRECISION)
        if NUM_GATES > 1:
            dh_prev += tl.dot(w1, d1.to(DOT_DTYPE), out_dtype=ACC, input_precision=PRECISION)
            dh_prev += tl.dot(w2, dq2.to(DOT_DTYPE), out_dtype=ACC, input_precision=PRECISION)
        if NUM_GATES > 3:
            dh_prev += tl.dot(w3, d3.to(DOT_DTYPE), out_dtype=ACC, input_precision=PRECISION)
        if CELL == GRU:
            dh_prev += dh_direct
        if HAS_LENGTHS:
            # Batch rows are the dot's N: a column depends on its own row only, so rows without this
            # step keep what they had.
            dh = tl.where(step, dh_prev, dh)
            dc = tl.where(step, dc_prev, dc)
        else:
            dh = dh_prev
            dc = dc_prev

    tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=mask)
    if CELL == LSTM:
        tl.store(dc0_ptr + state_offs, dc.to(dc0_ptr.dtype.element_ty), mask=mask)
