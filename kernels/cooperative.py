"""Cooperative time loops: the hidden units are split over many programs that meet at a grid barrier.

For H too large for one program to hold all of W_hh, program (u, g) owns BLOCK_U hidden units
u*BLOCK_U .. and keeps on chip the W_hh rows of every gate for those units (forward) or the W_hh
columns for them (backward), so the cell math of its units stays local. Each step it publishes its
slice of the new state to global memory, and all programs of its batch group wait at a barrier
before anyone reads the next step's full state.

Forward, step s (t = s, or T-1-s when reverse), for each batch tile of the program's group:
    h_prev = y[t-1] (all units; h0 at the first step)        written by every program at step s-1
    a_k = xp[t]_k[units] + W_k[units, :] @ h_prev              (tl.dot, fp32 accumulation)
    h, carry = cell_forward(a, carry)   carry: c (LSTM), the fp32 h of the program's units (GRU)
    y[t][units] = h;  saved[t][units] = the cell's slots when SAVE
Backward, step s = 0 .. T (the forward's steps, last first; step T only finishes dh0):
    dh = sum_k W_k[:, units]^T @ dr_k[t_next]  (all units, published at step s-1; dLoss/dhn at s = 0)
         + carry (GRU: the direct term z*dh) + dy[t][units]
    dxp[t][units], carry = cell_backward(...)   carry: dc (LSTM), z*dh (GRU)
    at step T: dh0[units] = dh
dr_k is the gradient of gate k's recurrent part: dxp's slots, except GRU's n-slot (dqn).

Each keeps its rows of W_hh (backward: W_hh^T) on chip (W_CHUNK = 0) or, where they would spill or pass
shared memory (dispatch's tables: half precision LSTM/GRU at some sizes; float32 past 512; IEEE fp32),
re-reads them each step, W_CHUNK columns at a time: a program's 16 rows are its own and stay in L2.

Variable lengths (HAS_LENGTHS, a packed sequence), as in the tile-persistent loops: row b has length
L_b, its forward step s is t = s (or L_b-1-s in reverse) while s < L_b, and its h_{t-1} is y at its own
step s-1's t. Past its length a row reads and writes nothing, so its carry holds its last state (hn:
y at its last t, gathered by the host). In the backward, row b has steps T-L_b .. T-1: dLoss/dhn
enters at the first, before it the row gathers nothing and its carry (dLoss/dcn) waits; the gathered
dr_k of step s-1 is at the row's own t_next. The build without lengths keeps its scalar t.

The carry lives in a [B, H] fp32 buffer that only its owner reads and writes, once per step, so one
kernel body serves both launch modes:

- COOPERATIVE: one launch runs every step; a grid barrier separates them (an atomic counter per batch
  group with release/acquire ordering). Triton has no cooperative launch: all programs must be
  resident at once, which the dispatcher promises. The spin is bounded by ``max_spins``: a program
  that waits longer sets ``error_ptr`` and leaves, so a broken promise is an error, not a hang.
- stepwise: one launch per step (s_begin = s, s_end = s + 1), no barrier; kernel boundaries order the
  steps. This is how the interpreter (which runs programs one after another) checks the math, and the
  mode used when the grid would not be resident.
"""
import triton
import triton.language as tl

from .cells import GRU, LSTM, cell_backward, cell_forward
from .tiles import (load_slots_at_once, load_split_gate_tiles, load_split_stacked_tiles, row_offsets, row_steps,
                    split_dot, split_k, split_slots, step_offsets, store_slots, sum_slices)


@triton.jit
def _barrier_wait(counter_ptr, target, max_spins):
    """Spin until *counter_ptr >= target (acquire), at most max_spins polls; True if it got there.

    Stores made by other programs before their arrival are then visible to this program's loads
    that bypass L1 (``.cg``): an SM's L1 is not coherent with the others.
    """
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (arrived < target) & (spins < max_spins):
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()  # every thread of the program after the acquire
    return arrived >= target


@triton.jit
def _barrier_arrive(counter_ptr):
    """Count this program in (release): all its threads' stores so far happen before the count."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _rows_if(offs_b, B, cond):
    """offs_b < B where the scalar ``cond`` holds, else no row. (Folded into the bound because the
    interpreter types a boolean tile & a boolean scalar as int32, which a mask may not be.)"""
    return offs_b < tl.where(cond, B, 0)


# How a step spends its time (read from the sm_90 SASS: ``python -m rnn_triton.static_cost``):
#
# - The dots are [BLOCK_U = 16 units, K] @ [K, 16 rows]. Triton splits a dot's M and N over the warps,
#   so with M = 16 every warp would compute the whole product; instead K is split over the warps
#   (``tiles.split_dot``: a batched dot over SPLIT = num_warps slices of K, then a sum), so each warp
#   does 1/SPLIT of the product and of the W_hh reads.
# - W_hh's tiles are loaded once. Where they take at most 64 registers per thread (half precision up to
#   BLOCK_K = 512 for the LSTM, 2048 for the RNN) they stay in registers (``tiles._in_registers``);
#   else in shared memory, read every step; or they are re-read from L2 in chunks (W_CHUNK, above).
# - The loads that do not depend on the other programs (xp; in the backward dy, dhn, the saved slots
#   and states) are issued before the barrier's wait, so they are in flight while it waits. A
#   tensor's gate slots come in one load (``tiles.load_slots_at_once``): separate small loads each
#   wait for their own layout conversion through shared memory, one round trip after another.
# - The backward sums over the gates in the dot itself: W_k^T's tiles side by side along K
#   (``tiles.load_split_stacked_tiles``) against the gate gradients read in one load.
# - Early release: a program arrives at the barrier right after storing what the others read (h_t; in
#   the backward the gate gradients); its carry, saved slots and cell state are stored after.
# - The sum over the K slices (``tiles.sum_slices``) leaves the [16, 16] result one element per thread,
#   so the cell math runs once per unit and row, not once per warp.
# - K is BLOCK_K + BLOCK_K2, two powers of two (768 = 512 + 256), so that H = 768 does not pay for 1024:
#   the tail is a second set of tiles whose dot accumulates into the first's before the one sum.


@triton.jit
def cooperative_fwd_kernel(
    xp_ptr, stride_xp_t, stride_xp_b,   # [T, B, NUM_GATES*H] input projection, biases folded in
    w_hh_ptr,                           # [NUM_GATES*H, H], contiguous
    b_hn_ptr,                           # [H] (GRU only)
    h0_ptr,                             # [B, H] contiguous (read when HAS_H0)
    y_ptr, stride_y_t, stride_y_b,      # [T, B, H] output; also the published h_t
    carry_ptr,                          # [B, H] accumulation dtype: c (LSTM) or h (GRU), in and out
    saved_ptr, cs_ptr,                  # [T, B, NUM_SAVED*H], [T, B, H] storage dtype (when SAVE)
    lengths_ptr,                        # [B] int32 sequence lengths (read when HAS_LENGTHS; else all T)
    sync_ptr, error_ptr,                # [groups] int32 arrivals (zeroed), [1] int32 error flag
    T, B, H, reverse, s_begin, s_end, max_spins,
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, COOPERATIVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    SPLIT: tl.constexpr, W_CHUNK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_u = tl.program_id(0)
    group = tl.program_id(1)
    num_units = tl.num_programs(0)
    num_groups = tl.num_programs(1)
    num_tiles = tl.cdiv(B, BLOCK_B)
    last_tile = group + (num_tiles - 1 - group) // num_groups * num_groups  # this program's last
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)  # this program's units
    mask_u = offs_u < H
    if W_CHUNK == 0:  # W_hh's rows of the program's units kept on chip (else re-read every step)
        w0, w1, w2, w3 = load_split_gate_tiles(w_hh_ptr, H, offs_u, mask_u, 0, BLOCK_K, SPLIT, NUM_GATES,
                                               DOT_DTYPE, True)
        v0, v1, v2, v3 = w0, w1, w2, w3  # K's tail, columns BLOCK_K .. BLOCK_K + BLOCK_K2 (unused without)
        if BLOCK_K2 > 0:
            v0, v1, v2, v3 = load_split_gate_tiles(w_hh_ptr, H, offs_u, mask_u, BLOCK_K, BLOCK_K2, SPLIT, NUM_GATES,
                                                   DOT_DTYPE, _tail_in_registers(NUM_GATES, BLOCK_U, BLOCK_K + BLOCK_K2,
                                                                                 DOT_DTYPE, SPLIT))
    b_hn = tl.zeros([BLOCK_U, 1], ACC)
    if CELL == GRU:
        b_hn += tl.load(b_hn_ptr + offs_u[:, None], mask=mask_u[:, None], other=0.0).to(ACC)
    saved_stride_t = tl.cast(B, tl.int64) * NUM_SAVED * H  # products of sizes in 64 bits too
    state_stride_t = tl.cast(B, tl.int64) * H
    counter = sync_ptr + group

    s = s_begin
    alive = s_begin >= 0
    while (s < s_end) & alive:
        if not HAS_LENGTHS:  # one t for all rows (else per row, below)
            t = s + reverse * (T - 1 - 2 * s)
            t_prev = tl.minimum(tl.maximum(t - 1 + 2 * reverse, 0), T - 1)  # clamped; unread at s = 0
        for tile in range(group, num_tiles, num_groups):
            offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            mask = mask_u[:, None] & mask_b[None, :]
            if HAS_LENGTHS:
                # Each row's own t and t_prev (its step s-1's t), [1, BLOCK_B]; a row past its length
                # reads nothing and writes nothing, so its carry keeps its last state (all rows have step 0).
                lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
                t, _ = row_steps(s, lengths, reverse, T)
                t_prev, _ = row_steps(s - 1, lengths, reverse, T)
                rows = mask_b & (s < lengths)
                mask = mask_u[:, None] & rows[None, :]
            state_offs = row_offsets(offs_b, H, offs_u)
            # Its units' input projection is loaded before the wait, in flight while the other programs
            # finish the step.
            x0, x1, x2, x3 = load_slots_at_once(xp_ptr + step_offsets(t, stride_xp_t,
                                                                      row_offsets(offs_b, stride_xp_b, offs_u)),
                                                H, mask, NUM_GATES, ACC)
            if COOPERATIVE and tile == group:  # everyone's h_{t-1} is published
                alive = _barrier_wait(counter, s * num_units, max_spins)
                tl.store(error_ptr, 1, mask=alive == 0)
            # The carry after the wait: the wait's CTA barrier orders this program's store of it (after
            # the last arrival) before this load, whichever threads the two layouts give each element.
            carry = tl.load(carry_ptr + state_offs, mask=mask, other=0.0)
            # a_k = xp_k + W_k @ h_{t-1} (GRU's n-gate: b_hn + W_n @ h_{t-1}, which r multiplies)
            first = s == 0
            rows_prev = _rows_if(offs_b, B, HAS_H0 | (s > 0))
            if HAS_LENGTHS:
                rows_prev = rows_prev & rows
            a2 = x2
            if CELL == GRU:
                a2 = tl.zeros([BLOCK_U, BLOCK_B], ACC) + b_hn
            if W_CHUNK == 0:
                h_all = _h_prev(h0_ptr, y_ptr, stride_y_t, stride_y_b, t_prev, first, offs_b, rows_prev, H, 0,
                                BLOCK_K, SPLIT, HAS_LENGTHS).to(DOT_DTYPE)
                h_tail = h_all
                if BLOCK_K2 > 0:
                    h_tail = _h_prev(h0_ptr, y_ptr, stride_y_t, stride_y_b, t_prev, first, offs_b, rows_prev, H,
                                     BLOCK_K, BLOCK_K2, SPLIT, HAS_LENGTHS).to(DOT_DTYPE)
                a0, a1, a2, a3 = _gate_dots(w0, w1, w2, w3, h_all, v0, v1, v2, v3, h_tail, x0, x1, a2, x3, NUM_GATES,
                                            BLOCK_K2 > 0, PRECISION)
            else:  # W_k[units, :] from the cache, W_CHUNK columns at a time
                a0 = x0
                a1 = x1
                a3 = x3
                for k0 in range(0, H, W_CHUNK):
                    c0, c1, c2, c3 = load_split_gate_tiles(w_hh_ptr, H, offs_u, mask_u, k0, W_CHUNK, SPLIT,
                                                           NUM_GATES, DOT_DTYPE, False)
                    h_all = _h_prev(h0_ptr, y_ptr, stride_y_t, stride_y_b, t_prev, first, offs_b, rows_prev, H,
                                    k0, W_CHUNK, SPLIT, HAS_LENGTHS).to(DOT_DTYPE)
                    a0, a1, a2, a3 = _gate_dots(c0, c1, c2, c3, h_all, c0, c1, c2, c3, h_all, a0, a1, a2, a3,
                                                NUM_GATES, False, PRECISION)
            h, c, s0, s1, s2, s3 = cell_forward(CELL, a0, a1, a2, a3, x2, 0.0, carry, carry)  # b_hn is in a2
            y_offs = step_offsets(t, stride_y_t, row_offsets(offs_b, stride_y_b, offs_u))
            tl.store(y_ptr + y_offs, h.to(y_ptr.dtype.element_ty), mask=mask)
            if COOPERATIVE and tile == last_tile:
                # Early release: h_t is all the others wait for; the stores below are this program's
                # alone (its carry, read back after its next wait) or the backward's.
                _barrier_arrive(counter)
            if CELL == LSTM:
                tl.store(carry_ptr + state_offs, c, mask=mask)
            if CELL == GRU:
                tl.store(carry_ptr + state_offs, h, mask=mask)
            if SAVE:
                saved_offs = step_offsets(t, saved_stride_t, row_offsets(offs_b, NUM_SAVED * H, offs_u))
                store_slots(saved_ptr + saved_offs, H, mask, NUM_SAVED, s0, s1, s2, s3)
                if CELL == LSTM:
                    tl.store(cs_ptr + step_offsets(t, state_stride_t, state_offs), c, mask=mask)
        s += 1


@triton.jit
def _gather(w, w_n, dxp_ptr, dqn_ptr, t, stride_t, stride_b, state_stride_t, offs_b, rows, H, k0,
            BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, CELL: tl.constexpr, SLOTS: tl.constexpr,
            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, acc):
    """acc + sum_k W_k[:, j]^T @ dr_k[t][j] over the gates k, for the units j = k0 .. k0 + BLOCK_K (t:
    [1, rows]): the part of dLoss/dh_{t-1} that flows through them, as ``split_dot``'s slices before
    their sum (acc: [SPLIT, units, rows]). w: the tiles of W_k^T[units, j] of the gates k < SLOTS side
    by side along K (``tiles.load_split_stacked_tiles``), whose dr_k are dxp's slots, read in one load;
    GRU's n-gate (w_n) takes its dr from dqn. Other programs wrote dr: read from L2."""
    dr = split_slots(dxp_ptr, t, stride_t, offs_b, stride_b, rows, H, k0, BLOCK_K, SPLIT, SLOTS)
    acc = tl.dot(w, dr.to(DOT_DTYPE), acc=acc, input_precision=PRECISION)
    if CELL == GRU:
        dq = split_slots(dqn_ptr, t, state_stride_t, offs_b, H, rows, H, k0, BLOCK_K, SPLIT, 1)
        acc = tl.dot(w_n, dq.to(DOT_DTYPE), acc=acc, input_precision=PRECISION)
    return acc


@triton.jit
def cooperative_bwd_kernel(
    dy_ptr, stride_dy_t, stride_dy_b,   # [T, B, H] dLoss/dy
    dhn_ptr,                            # [B, H] dLoss/dhn, contiguous
    w_t_ptr,                            # [NUM_GATES*H, H]: W_k^T stacked (w_t[k*H + u, j] = W_hh[k*H + j, u])
    saved_ptr, cs_ptr,                  # from the forward (SAVE)
    h0_ptr, c0_ptr,                     # [B, H] initial states (read when HAS_H0)
    y_ptr, stride_y_t, stride_y_b,      # forward output (GRU reads h_{t-1} from it)
    dxp_ptr, stride_dxp_t, stride_dxp_b,  # [T, B, NUM_GATES*H] out: dLoss/dxp; also published
    dqn_ptr,                            # [T, B, H] out (GRU): dLoss/d(h @ W_hn^T), contiguous
    dh0_ptr,                            # [B, H] out
    carry_ptr,                          # [B, H] accumulation dtype: dc (LSTM), z*dh (GRU), in and out
    lengths_ptr,                        # as in the forward
    sync_ptr, error_ptr,                # as in the forward
    T, B, H, reverse, s_begin, s_end, max_spins,  # steps s_begin .. s_end-1 of 0 .. T
    CELL: tl.constexpr, NUM_GATES: tl.constexpr, NUM_SAVED: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, COOPERATIVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    SPLIT: tl.constexpr, W_CHUNK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_u = tl.program_id(0)
    group = tl.program_id(1)
    num_units = tl.num_programs(0)
    num_groups = tl.num_programs(1)
    num_tiles = tl.cdiv(B, BLOCK_B)
    last_tile = group + (num_tiles - 1 - group) // num_groups * num_groups  # this program's last
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    mask_u = offs_u < H
    # W_k[:, units]^T = W_k^T[units, :], read row-major from W_hh's per-gate transpose: the same
    # access as the forward's.
    # The gates whose gradients are dxp's slots, side by side along K (GRU's n-gate apart: dqn's).
    SLOTS: tl.constexpr = 2 if CELL == GRU else NUM_GATES
    if W_CHUNK == 0:
        w, w_n = _transposed_tiles(w_t_ptr, H, offs_u, mask_u, 0, BLOCK_K, SPLIT, CELL, SLOTS, DOT_DTYPE, True)
        v = w  # K's tail, as in the forward (unused without)
        v_n = w_n
        if BLOCK_K2 > 0:
            v, v_n = _transposed_tiles(w_t_ptr, H, offs_u, mask_u, BLOCK_K, BLOCK_K2, SPLIT, CELL, SLOTS, DOT_DTYPE,
                                       _tail_in_registers(NUM_GATES, BLOCK_U, BLOCK_K + BLOCK_K2, DOT_DTYPE, SPLIT))
    saved_stride_t = tl.cast(B, tl.int64) * NUM_SAVED * H
    state_stride_t = tl.cast(B, tl.int64) * H
    counter = sync_ptr + group

    s = s_begin
    alive = s_begin >= 0
    while (s < s_end) & alive:
        active = s < T  # step T only gathers dh0
        if not HAS_LENGTHS:  # one t for all rows (else per row, below)
            t_raw = T - 1 - s + reverse * (2 * s - (T - 1))  # the forward's step; off the end at s = T
            t = tl.minimum(tl.maximum(t_raw, 0), T - 1)  # clamped, so every address stays in bounds
            t_next = tl.minimum(tl.maximum(t_raw + 1 - 2 * reverse, 0), T - 1)  # step s-1's t
            t_prev = tl.minimum(tl.maximum(t_raw - 1 + 2 * reverse, 0), T - 1)  # the state before step t
        has_prev = s < T - 1
        for tile in range(group, num_tiles, num_groups):
            offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            mask = mask_u[:, None] & mask_b[None, :]
            state_offs = row_offsets(offs_b, H, offs_u)
            if HAS_LENGTHS:
                # Row b has the forward's steps fs < L_b, so backward steps T - L_b .. T - 1: before
                # them it gathers nothing and its carry (dLoss/dcn for the LSTM) waits untouched;
                # dLoss/dhn enters at the first. t, t_next, t_prev: its own, as [1, BLOCK_B] tiles.
                fs = T - 1 - s  # the forward's step; -1 at s = T
                lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)
                t, live = row_steps(fs, lengths, reverse, T)
                t_next, _ = row_steps(fs + 1, lengths, reverse, T)  # its step s-1's t
                t_prev, _ = row_steps(fs - 1, lengths, reverse, T)  # the state before step t
                rows_prev = fs + 1 < lengths  # step s-1 was the row's (none at s = 0; none beyond B)
                rows_hn = mask_b & (fs == lengths - 1)
            else:
                rows_prev = _rows_if(offs_b, B, s > 0)  # nothing before step 0
                rows_hn = _rows_if(offs_b, B, s == 0)
            step = mask_u[:, None] & _rows_if(offs_b, B, active)[None, :]
            if HAS_LENGTHS:
                step = step & live  # before its first step a row reads and writes nothing
            # What only the forward wrote (dLoss/dy and dLoss/dhn of its units, its saved slots and
            # states) is loaded before the wait, in flight while the other programs finish the step.
            dh = tl.load(dhn_ptr + state_offs, mask=mask_u[:, None] & rows_hn[None, :], other=0.0).to(ACC)
            dh += tl.load(dy_ptr + step_offsets(t, stride_dy_t, row_offsets(offs_b, stride_dy_b, offs_u)),
                          mask=step, other=0.0).to(ACC)
            s0, s1, s2, s3 = load_slots_at_once(saved_ptr + step_offsets(t, saved_stride_t,
                                                                         row_offsets(offs_b, NUM_SAVED * H, offs_u)),
                                                H, step, NUM_SAVED, ACC)
            state0 = tl.zeros([BLOCK_U, BLOCK_B], ACC)  # the state before the first step
            if HAS_H0:
                if CELL == LSTM:
                    state0 = tl.load(c0_ptr + state_offs, mask=step, other=0.0).to(ACC)
                if CELL == GRU:
                    state0 = tl.load(h0_ptr + state_offs, mask=step, other=0.0).to(ACC)
            c_new = state0
            prev = state0
            if CELL == LSTM:
                c_new = tl.load(cs_ptr + step_offsets(t, state_stride_t, state_offs), mask=step,
                                other=0.0).to(ACC)
                prev = tl.load(cs_ptr + step_offsets(t_prev, state_stride_t, state_offs), mask=step,
                               other=0.0).to(ACC)
            if CELL == GRU:
                prev = tl.load(y_ptr + step_offsets(t_prev, stride_y_t, row_offsets(offs_b, stride_y_b, offs_u)),
                               mask=step, other=0.0).to(ACC)
            prev = tl.where(has_prev, prev, state0)
            if COOPERATIVE and tile == group:  # everyone's gate gradients of step s-1 are published
                alive = _barrier_wait(counter, s * num_units, max_spins)
                tl.store(error_ptr, 1, mask=alive == 0)
            # The carry after the wait, as in the forward (its store comes after this program's arrival).
            carry = tl.load(carry_ptr + state_offs, mask=mask, other=0.0)
            # dh += sum_k W_k[:, units]^T @ dr_k of step s-1, all units (read from L2).
            t_rows = t_next + tl.zeros([1, BLOCK_B], tl.int32)  # per row, with lengths or without
            if W_CHUNK == 0:
                p = _gather(w, w_n, dxp_ptr, dqn_ptr, t_rows, stride_dxp_t, stride_dxp_b, state_stride_t, offs_b,
                            rows_prev, H, 0, BLOCK_K, SPLIT, CELL, SLOTS, DOT_DTYPE, PRECISION,
                            tl.zeros([SPLIT, BLOCK_U, BLOCK_B], ACC))
                if BLOCK_K2 > 0:
                    p = _gather(v, v_n, dxp_ptr, dqn_ptr, t_rows, stride_dxp_t, stride_dxp_b, state_stride_t, offs_b,
                                rows_prev, H, BLOCK_K, BLOCK_K2, SPLIT, CELL, SLOTS, DOT_DTYPE, PRECISION, p)
                dh += sum_slices(p)
            else:  # W_k^T[units, :] from the cache, W_CHUNK columns at a time
                for k0 in range(0, H, W_CHUNK):
                    c, c_n = _transposed_tiles(w_t_ptr, H, offs_u, mask_u, k0, W_CHUNK, SPLIT, CELL, SLOTS, DOT_DTYPE,
                                               False)
                    dh += sum_slices(_gather(c, c_n, dxp_ptr, dqn_ptr, t_rows, stride_dxp_t, stride_dxp_b,
                                             state_stride_t, offs_b, rows_prev, H, k0, W_CHUNK, SPLIT, CELL, SLOTS,
                                             DOT_DTYPE, PRECISION, tl.zeros([SPLIT, BLOCK_U, BLOCK_B], ACC)))
            if CELL == GRU:
                dh += carry
            d0, d1, d2, d3, dq2, dh_direct, dc = cell_backward(CELL, dh, carry, s0, s1, s2, s3, c_new, prev,
                                                              prev)
            dxp_offs = step_offsets(t, stride_dxp_t, row_offsets(offs_b, stride_dxp_b, offs_u))
            store_slots(dxp_ptr + dxp_offs, H, step, NUM_GATES, d0, d1, d2, d3)
            if CELL == GRU:
                tl.store(dqn_ptr + step_offsets(t, state_stride_t, state_offs),
                         dq2.to(dqn_ptr.dtype.element_ty), mask=step)
            if COOPERATIVE and tile == last_tile:
                # Early release: the gate gradients are all the others wait for; the stores below are
                # this program's alone (its carry, read back after its next wait) or the host's.
                _barrier_arrive(counter)
            tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty),
                     mask=mask_u[:, None] & _rows_if(offs_b, B, s == T)[None, :])
            if CELL == GRU:
                tl.store(carry_ptr + state_offs, dh_direct, mask=step)
            if CELL == LSTM:
                tl.store(carry_ptr + state_offs, dc, mask=step)
        s += 1


@triton.jit
def _h_prev(h0_ptr, y_ptr, stride_y_t, stride_y_b, t_prev, first, offs_b, rows, H, k0, BLOCK_K: tl.constexpr,
            SPLIT: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """h_{t-1} of the units k0 .. k0 + BLOCK_K as the dot's right operand, [SPLIT, BLOCK_K // SPLIT,
    BLOCK_B] (``split_dot``): y[t_prev], or h0 at the first step, zero where ``rows`` is false (t_prev:
    a scalar, or [1, BLOCK_B] per row with lengths). One load: two loads summed would keep the whole
    tile in registers. Other programs wrote most of it: read from L2 (``.cg``)."""
    k = k0 + split_k(BLOCK_K, SPLIT)[:, :, None]
    b = offs_b[None, None, :]
    mask = (k < H) & rows[None, None, :]
    if HAS_LENGTHS:
        ptr = tl.where(first, h0_ptr, y_ptr)
        offs = step_offsets(t_prev[:, None, :], tl.where(first, 0, stride_y_t),
                            b.to(tl.int64) * tl.where(first, H, stride_y_b) + k)
    else:
        ptr = tl.where(first, h0_ptr, y_ptr + tl.cast(t_prev, tl.int64) * stride_y_t)
        offs = b.to(tl.int64) * tl.where(first, H, stride_y_b) + k
    return tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _gate_dots(w0, w1, w2, w3, h, v0, v1, v2, v3, h_tail, a0, a1, a2, a3, NUM_GATES: tl.constexpr,
               TAIL: tl.constexpr, PRECISION: tl.constexpr):
    """a_k + W_k @ h for the NUM_GATES gates (``split_dot``), with TAIL + V_k @ h_tail (K's tail: both
    dots' slices summed once); the other slots repeat a0."""
    a0 = _split_dot_tail(w0, h, v0, h_tail, a0, TAIL, PRECISION)
    if NUM_GATES > 1:
        a1 = _split_dot_tail(w1, h, v1, h_tail, a1, TAIL, PRECISION)
        a2 = _split_dot_tail(w2, h, v2, h_tail, a2, TAIL, PRECISION)
    else:
        a1 = a0
        a2 = a0
    if NUM_GATES > 3:
        a3 = _split_dot_tail(w3, h, v3, h_tail, a3, TAIL, PRECISION)
    else:
        a3 = a0
    return a0, a1, a2, a3


@triton.jit
def _split_dot_tail(w, x, v, x_tail, acc, TAIL: tl.constexpr, PRECISION: tl.constexpr):
    """``split_dot``: acc + w @ x, and with TAIL + v @ x_tail, the tail's slices added before the sum."""
    if TAIL:
        p = tl.dot(w, x, out_dtype=acc.dtype, input_precision=PRECISION)
        return acc + sum_slices(tl.dot(v, x_tail, acc=p, input_precision=PRECISION))
    else:
        return split_dot(w, x, acc, PRECISION)


@triton.constexpr_function
def _tail_in_registers(NUM_GATES: tl.constexpr, BLOCK_U: tl.constexpr, K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       SPLIT: tl.constexpr):
    """Whether K's tail may join the first tiles in registers (``KEPT`` of ``tiles.load_split_gate_tiles``):
    only where all K of the weights together stay within the tiles' register budget there."""
    return NUM_GATES * BLOCK_U * K * DOT_DTYPE.primitive_bitwidth <= 64 * 32 * 32 * SPLIT



@triton.jit
def _transposed_tiles(w_t_ptr, H, offs_u, mask_u, k0, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, CELL: tl.constexpr,
                      SLOTS: tl.constexpr, DOT_DTYPE: tl.constexpr, KEPT: tl.constexpr):
    """The backward's W_k^T[units, k0 : k0 + BLOCK_K] for ``_gather``: the gates k < SLOTS side by side
    along K, and GRU's n-gate apart (the first again for the other cells)."""
    w = load_split_stacked_tiles(w_t_ptr, H, offs_u, mask_u, k0, BLOCK_K, SPLIT, SLOTS, DOT_DTYPE, KEPT)
    w_n = w
    if CELL == GRU:
        w_n = load_split_stacked_tiles(w_t_ptr + 2 * H * H, H, offs_u, mask_u, k0, BLOCK_K, SPLIT, 1, DOT_DTYPE, KEPT)
    return w, w_n
