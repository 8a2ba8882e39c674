"""Tile-persistent time loops: one program per batch tile keeps all of W_hh on chip for all T steps.

Both loops serve every cell (``CELL`` selects the math from ``cells``); a cell has NUM_GATES gate
slots of H units each, stacked in torch's order in W_hh [NUM_GATES*H, H].

Forward, per program (batch rows b0 .. b0+BLOCK_B):
    load W_hh^T once (NUM_GATES tiles [H, H]);  h, c <- h0, c0
    for s in 0 .. T-1:  t = s (or T-1-s when reverse)
        a_k = xp[t]_k + h @ W_k^T  (tl.dot, fp32 accumulation);  h, c = cell_forward(a, h, c)
        y[t] = h;  saved[t] = the cell's saved slots (and cs[t] = c) when SAVE
    hn, cn <- h, c

Backward, per program, reverse of the forward:
    load W_hh once (NUM_GATES tiles [H, H]);  dh, dc <- dhn, dcn
    for each step, last first:
        dh += dy[t] (dc += dcs[t] with STATE_GRADS);  dx, dc = cell_backward(dh, dc, saved[t], ...)
        dxp[t] = dx;  dh = sum_k dr_k @ W_k  (+ the cell's direct term)
    dh0, dc0 <- dh, dc
The weight gradients are not accumulated here: the host forms them from dxp with large GEMMs.

"c" is every state beside h, NUM_C slots of H side by side in each tensor that holds it (c0, cn, cs
[.., NUM_C*H]): the LSTM's c (NUM_C = 1); the sLSTM's c, n, m (NUM_C = 3: ``cells.slstm_forward``,
whose backward recomputes the step from the states before it). GRU and RNN have none (NUM_C = 1,
unread).

Both loops load a step ahead what the recurrence does not produce (xp; the backward's dy, saved slots
and states around the step), so each load's round trip overlaps the step before it; the loaded tiles
are split into their slots and converted only when their step runs (``tiles.load_slot_tile``).

Every tile is kept transposed, [BLOCK_H, BLOCK_B] (units x batch rows), so that the weight is the
left operand of each dot: gates^T = W_k @ h^T. With 128 units that is an M=128 dot, which Hopper runs
as wgmma reading W straight from shared memory; the other order would stream all of W through
registers every step and spill at H = 128.

Blocks (GROUPED): W_hh may be block-diagonal, K independent recurrences of H units each: the
directions of a bidirectional layer, heads (FlashRNN / xLSTM), or both: block k = d * heads + head.
W_hh holds the blocks' weights stacked ([K*NUM_GATES*H, H]), the grid's second axis is the block k,
and its programs read and write block k's slice of every tensor: columns k*NUM_GATES*H.. of xp,
columns k*H.. of y (so a bidirectional layer's output is written concatenated, as torch.nn returns
it), and [k] of the states and saved tensors, which are stacked [K, ...]. Direction d = k // heads
runs reversed when reverse + d is odd, so a layer's directions and heads run concurrently in one launch.

Sizes need not be powers of two: tiles are padded to BLOCK_H / BLOCK_B and every load and store is
masked. Offsets along T and B are computed in 64 bits.

Variable lengths (HAS_LENGTHS, a packed sequence): row b has length L_b. Its s-th step is t = s, or
t = L_b - 1 - s in reverse; past its length a row neither reads nor writes, and keeps its state (the
forward: h, c, so hn is its last state; the backward: dh, dc). So a packed batch costs what the
padded one does, and nothing is computed for the padding.
"""
import triton
import triton.language as tl

from .cells import GRU, LSTM, SLSTM, cell_backward, cell_forward, slstm_backward, slstm_forward
from .tiles import load_gate_tiles, load_slot_tile, row_offsets, row_steps, slots_of, step_offsets, store_slots


#: Integer arguments Triton does not specialise at launch (by default it compiles a build of its own for
#: a value of 1 and for multiples of 16): one build serves every length, direction and head count, and
#: it is the build the compile check compiles. (B stays specialised: B divisible by 16 saves registers.)
_SIZES = ["T", "reverse", "heads"]


@triton.jit(do_not_specialize=_SIZES)
def persistent_fwd_kernel(
    xp_ptr, stride_xp_t, stride_xp_b,   # [T, B, D*NUM_GATES*H] input projection, biases folded in (D blocks)
    w_hh_ptr,                           # [D*NUM_GATES*H, H], contiguous
    b_hn_ptr,                           # [D*H] (GRU only)
    h0_ptr, c0_ptr,                     # [D, B, H], [D, B, NUM_C*H] contiguous (read when HAS_H0)
    y_ptr, stride_y_t, stride_y_b,      # [T, B, D*H] output
    hn_ptr, cn_ptr,                     # [D, B, H], [D, B, NUM_C*H] final states
    saved_ptr, cs_ptr,                  # [D, T, B, NUM_SAVED*H], [D, T, B, NUM_C*H] storage dtype (SAVE)
    lengths_ptr,                        # [B] int32 sequence lengths (read when HAS_LENGTHS; else all T)
    T, B, H, reverse, heads,            # reverse: 1 runs direction 0 last step first (see above)
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr, NUM_C: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if GROUPED:  # a separate build: the moved pointers cost registers the one-group build lacks
        g = tl.program_id(1)  # the block: direction g // heads, head g % heads
        reverse = (reverse + g // heads) % 2
        xp_ptr += g * NUM_GATES * H
        w_hh_ptr += g * NUM_GATES * H * H
        b_hn_ptr += g * H
        y_ptr += g * H
        state_stride_g = tl.cast(B, tl.int64) * H  # products of sizes in 64 bits
        h0_ptr += g * state_stride_g
        c0_ptr += g * state_stride_g * NUM_C
        hn_ptr += g * state_stride_g
        cn_ptr += g * state_stride_g * NUM_C
        saved_ptr += g * T * state_stride_g * NUM_SAVED
        cs_ptr += g * T * state_stride_g * NUM_C
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
    n = c  # (sLSTM only)
    m = c
    c_offs = row_offsets(offs_b, NUM_C * H, offs_h)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask, other=0.0).to(ACC)
        if CELL == LSTM or CELL == SLSTM:
            c, n, m, _ = slots_of(load_slot_tile(c0_ptr + c_offs, H, mask, NUM_C), NUM_C, ACC)

    xp_rows = row_offsets(offs_b, stride_xp_b, offs_h)
    y_rows = row_offsets(offs_b, stride_y_b, offs_h)
    saved_rows = row_offsets(offs_b, NUM_SAVED * H, offs_h)
    saved_stride_t = tl.cast(B, tl.int64) * NUM_SAVED * H  # products of sizes in 64 bits too
    state_stride_t = tl.cast(B, tl.int64) * H
    lengths = offs_b  # (unread without lengths)
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + offs_b, mask=offs_b < B, other=0)
    # Software pipelining: xp, which the recurrence does not produce, is loaded a step ahead (all its
    # gate slots in one load), so its round trip overlaps the step before instead of starting this one.
    t, step = _step_at(0, T, reverse, lengths, mask, HAS_LENGTHS)
    ahead = load_slot_tile(xp_ptr + step_offsets(t, stride_xp_t, xp_rows), H, step, NUM_GATES)
    for s in range(T):
        t, step = _step_at(s, T, reverse, lengths, mask, HAS_LENGTHS)  # (a row past its length: masked)
        x0, x1, x2, x3 = slots_of(ahead, NUM_GATES, ACC)
        # the next step's (the last step re-reads its own: in bounds, unused)
        t_next, step_next = _step_at(tl.minimum(s + 1, T - 1), T, reverse, lengths, mask, HAS_LENGTHS)
        ahead = load_slot_tile(xp_ptr + step_offsets(t_next, stride_xp_t, xp_rows), H, step_next, NUM_GATES)
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
        n_new = n
        m_new = m
        if CELL == SLSTM:
            h_new, c_new, n_new, m_new = slstm_forward(a0, a1, a2, a3, c, n, m)
            s0, s1, s2, s3 = a0, a1, a2, a3
        else:
            h_new, c_new, s0, s1, s2, s3 = cell_forward(CELL, a0, a1, a2, a3, x2, b_hn, h, c)
        # Padded lanes stay finite zeros: they are the K dimension of the next step's dot.
        h = tl.where(step, h_new, h)
        if HAS_LENGTHS:
            c = tl.where(step, c_new, c)
            n = tl.where(step, n_new, n)
            m = tl.where(step, m_new, m)
        else:
            c = c_new
            n = n_new
            m = m_new
        tl.store(y_ptr + step_offsets(t, stride_y_t, y_rows), h.to(y_ptr.dtype.element_ty), mask=step)
        if SAVE:
            store_slots(saved_ptr + step_offsets(t, saved_stride_t, saved_rows), H, step, NUM_SAVED,
                        s0, s1, s2, s3)
            if CELL == LSTM or CELL == SLSTM:
                store_slots(cs_ptr + step_offsets(t, NUM_C * state_stride_t, c_offs), H, step, NUM_C, c, n, m, m)

    tl.store(hn_ptr + state_offs, h.to(hn_ptr.dtype.element_ty), mask=mask)
    if CELL == LSTM or CELL == SLSTM:
        store_slots(cn_ptr + c_offs, H, mask, NUM_C, c, n, m, m)


@triton.jit(do_not_specialize=_SIZES)
def persistent_bwd_kernel(
    dy_ptr, stride_dy_t, stride_dy_b,   # [T, B, D*H] dLoss/dy
    dhn_ptr, dcn_ptr,                   # [D, B, H], [D, B, NUM_C*H] dLoss/dhn, dLoss/dcn, contiguous
    w_hh_ptr,                           # [D*NUM_GATES*H, H], contiguous
    saved_ptr, cs_ptr,                  # from the forward (SAVE)
    h0_ptr, c0_ptr,                     # [D, B, H], [D, B, NUM_C*H] initial states (read when HAS_H0)
    y_ptr, stride_y_t, stride_y_b,      # forward output [T, B, D*H] (GRU reads h_{t-1} from it)
    dxp_ptr, stride_dxp_t, stride_dxp_b,  # [T, B, D*NUM_GATES*H] out: dLoss/dxp
    dqn_ptr,                            # [D, T, B, H] out (GRU): dLoss/d(h @ W_hn^T), contiguous
    dh0_ptr, dc0_ptr,                   # [D, B, H], [D, B, NUM_C*H] out
    dcs_ptr,                            # [D, T, B, NUM_C*H] dLoss/d(cs), like cs (read when STATE_GRADS)
    lengths_ptr,                        # as in the forward
    T, B, H, reverse, heads,            # as in the forward
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr, NUM_C: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, GROUPED: tl.constexpr, STATE_GRADS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if GROUPED:
        g = tl.program_id(1)  # the block, as in the forward
        reverse = (reverse + g // heads) % 2
        dy_ptr += g * H
        y_ptr += g * H
        dxp_ptr += g * NUM_GATES * H
        w_hh_ptr += g * NUM_GATES * H * H
        state_stride_g = tl.cast(B, tl.int64) * H
        dhn_ptr += g * state_stride_g
        dcn_ptr += g * state_stride_g * NUM_C
        h0_ptr += g * state_stride_g
        c0_ptr += g * state_stride_g * NUM_C
        dh0_ptr += g * state_stride_g
        dc0_ptr += g * state_stride_g * NUM_C
        saved_ptr += g * T * state_stride_g * NUM_SAVED
        cs_ptr += g * T * state_stride_g * NUM_C
        dcs_ptr += g * T * state_stride_g * NUM_C
        dqn_ptr += g * T * state_stride_g
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    mask = mask_h[:, None] & (offs_b < B)[None, :]
    state_offs = row_offsets(offs_b, H, offs_h)

    w0, w1, w2, w3 = load_gate_tiles(w_hh_ptr, H, offs_h, mask_h, offs_h, mask_h, True, NUM_GATES, DOT_DTYPE)
    dh = tl.load(dhn_ptr + state_offs, mask=mask, other=0.0).to(ACC)
    dc = tl.zeros([BLOCK_H, BLOCK_B], ACC)
    dn = dc  # (sLSTM only)
    dm = dc
    c_offs = row_offsets(offs_b, NUM_C * H, offs_h)
    # the state before the first step as stored: c0 (LSTM), h0 (GRU), c0, n0, m0 (sLSTM: [units, rows, 4])
    state0 = tl.zeros([BLOCK_H, BLOCK_B], ACC)
    if CELL == SLSTM:
        state0 = tl.zeros([BLOCK_H, BLOCK_B, 4], ACC)
    if CELL == LSTM or CELL == SLSTM:
        dc, dn, dm, _ = slots_of(load_slot_tile(dcn_ptr + c_offs, H, mask, NUM_C), NUM_C, ACC)
        if HAS_H0:
            state0 = load_slot_tile(c0_ptr + c_offs, H, mask, NUM_C).to(ACC)
    if CELL == GRU:
        if HAS_H0:
            state0 = tl.load(h0_ptr + state_offs, mask=mask, other=0.0).to(ACC)

    dy_rows = row_offsets(offs_b, stride_dy_b, offs_h)
    y_rows = row_offsets(offs_b, stride_y_b, offs_h)
    saved_rows = row_offsets(offs_b, NUM_SAVED * H, offs_h)
    dxp_rows = row_offsets(offs_b, stride_dxp_b, offs_h)
    saved_stride_t = tl.cast(B, tl.int64) * NUM_SAVED * H  # products of sizes in 64 bits too
    state_stride_t = tl.cast(B, tl.int64) * H
    lengths = offs_b  # (unread without lengths)
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + offs_b, mask=offs_b < B, other=0)
    # Software pipelining, as in the forward: what a step reads that the recurrence does not produce
    # (dy, the saved slots, the states around it) is loaded a step ahead.
    ahead = _backward_inputs(0, T, reverse, lengths, mask, dy_ptr, stride_dy_t, dy_rows, saved_ptr, saved_stride_t,
                             saved_rows, cs_ptr, dcs_ptr, state_stride_t, c_offs, y_ptr, stride_y_t, y_rows, state0,
                             H, CELL, NUM_SAVED, NUM_C, HAS_LENGTHS, STATE_GRADS)
    for s in range(T):
        t, step = _step_at(T - 1 - s, T, reverse, lengths, mask, HAS_LENGTHS)  # the forward's steps, last first
        dy, saved, c_new, prev, dstates = ahead
        s0, s1, s2, s3 = slots_of(saved, NUM_SAVED, ACC)
        # the next step's (the last step re-reads its own: in bounds, unused)
        ahead = _backward_inputs(tl.minimum(s + 1, T - 1), T, reverse, lengths, mask, dy_ptr, stride_dy_t, dy_rows,
                                 saved_ptr, saved_stride_t, saved_rows, cs_ptr, dcs_ptr, state_stride_t, c_offs,
                                 y_ptr, stride_y_t, y_rows, state0, H, CELL, NUM_SAVED, NUM_C, HAS_LENGTHS,
                                 STATE_GRADS)
        dh += dy.to(ACC)
        if STATE_GRADS:  # dLoss/d(c_t) (and n_t, m_t) from outside, as dy is for h_t
            dcs0, dcs1, dcs2, _ = slots_of(dstates, NUM_C, ACC)
            dc += dcs0
            if CELL == SLSTM:
                dn += dcs1
                dm += dcs2
        c_new = c_new.to(ACC)
        prev = tl.where(s < T - 1, prev.to(ACC), state0)  # the forward's first step follows state0
        dn_prev = dn
        dm_prev = dm
        if CELL == SLSTM:
            pc, pn, pm, _ = slots_of(prev, NUM_C, ACC)
            d0, d1, d2, d3, dc_prev, dn_prev, dm_prev = slstm_backward(dh, dc, dn, dm, s0, s1, s2, s3, pc, pn, pm)
            dq2 = d2
            dh_direct = dh
        else:
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
            dn = tl.where(step, dn_prev, dn)
            dm = tl.where(step, dm_prev, dm)
        else:
            dh = dh_prev
            dc = dc_prev
            dn = dn_prev
            dm = dm_prev

    tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=mask)
    if CELL == LSTM or CELL == SLSTM:
        store_slots(dc0_ptr + c_offs, H, mask, NUM_C, dc, dn, dm, dm)


@triton.jit
def _step_at(s, T, reverse, lengths, mask, HAS_LENGTHS: tl.constexpr):
    """The forward's s-th step: its time index t (a scalar, or per row with lengths) and the tile's
    mask for it (with lengths: only the rows that have an s-th step)."""
    if HAS_LENGTHS:
        t, live = row_steps(s, lengths, reverse, T)
        return t, mask & live
    else:
        return s + reverse * (T - 1 - 2 * s), mask


@triton.jit
def _backward_inputs(s, T, reverse, lengths, mask, dy_ptr, stride_dy_t, dy_rows, saved_ptr, saved_stride_t,
                     saved_rows, cs_ptr, dcs_ptr, state_stride_t, c_offs, y_ptr, stride_y_t, y_rows, state0, H,
                     CELL: tl.constexpr, NUM_SAVED: tl.constexpr, NUM_C: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                     STATE_GRADS: tl.constexpr):
    """What the backward's s-th step (the forward's step T-1-s) reads and its recurrence does not
    produce, as stored: dy[t], the saved slots of t (``load_slot_tile``), the LSTM's c_t, the state
    before t (c_{t-1}; GRU: h_{t-1}; sLSTM: c, n, m of t-1 as one tile; unread at the forward's first
    step, where state0 is) and, with STATE_GRADS, dLoss/d(cs[t])."""
    fs = T - 1 - s
    t, step = _step_at(fs, T, reverse, lengths, mask, HAS_LENGTHS)
    t_prev = tl.minimum(tl.maximum(t - 1 + 2 * reverse, 0), T - 1)  # the forward's step before t (clamped)
    dy = tl.load(dy_ptr + step_offsets(t, stride_dy_t, dy_rows), mask=step, other=0.0)
    saved = load_slot_tile(saved_ptr + step_offsets(t, saved_stride_t, saved_rows), H, step, NUM_SAVED)
    c_new = dy  # (the LSTM's only)
    prev = state0
    dstates = dy  # (STATE_GRADS only)
    if CELL == LSTM:
        c_new = tl.load(cs_ptr + step_offsets(t, state_stride_t, c_offs), mask=step, other=0.0)
    if CELL == LSTM or CELL == SLSTM:
        prev = load_slot_tile(cs_ptr + step_offsets(t_prev, NUM_C * state_stride_t, c_offs), H, step, NUM_C)
    if CELL == GRU:
        prev = tl.load(y_ptr + step_offsets(t_prev, stride_y_t, y_rows), mask=step, other=0.0)
    if STATE_GRADS:
        dstates = load_slot_tile(dcs_ptr + step_offsets(t, NUM_C * state_stride_t, c_offs), H, step, NUM_C)
    return dy, saved, c_new, prev, dstates
