"""Tile helpers shared by the time loops: weight tiles, 64-bit offsets, per-slot loads and stores.

A tile is [units, batch rows] ("transposed"), so that the weight is the left operand of every dot.
"""
import triton
import triton.language as tl


@triton.jit
def load_gate_tiles(w_ptr, H, rows, mask_rows, cols, mask_cols, TRANSPOSE: tl.constexpr,
                    NUM_GATES: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The NUM_GATES tiles W_k[rows, cols] of W_hh [NUM_GATES*H, H] (W_k: gate k's H rows), or with
    TRANSPOSE their transposes.

    Always read row-major (contiguous, vectorised loads); the transpose is a view for the dot.
    Slots beyond NUM_GATES repeat slot 0 and are never used.
    """
    offs = rows[:, None] * H + cols[None, :]
    mask = mask_rows[:, None] & mask_cols[None, :]
    w0 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(DOT_DTYPE)
    w1 = w0
    w2 = w0
    w3 = w0
    if NUM_GATES > 1:
        w1 = tl.load(w_ptr + H * H + offs, mask=mask, other=0.0).to(DOT_DTYPE)
        w2 = tl.load(w_ptr + 2 * H * H + offs, mask=mask, other=0.0).to(DOT_DTYPE)
    if NUM_GATES > 3:
        w3 = tl.load(w_ptr + 3 * H * H + offs, mask=mask, other=0.0).to(DOT_DTYPE)
    if TRANSPOSE:
        w0 = tl.trans(w0)
        w1 = tl.trans(w1)
        w2 = tl.trans(w2)
        w3 = tl.trans(w3)
    return w0, w1, w2, w3


@triton.jit
def row_offsets(offs_b, stride_b, offs_h):
    """Offsets of the [units, batch rows] tile within one step, b*stride_b + h, in 64 bits."""
    return offs_b.to(tl.int64)[None, :] * tl.cast(stride_b, tl.int64) + offs_h[:, None]


@triton.jit
def step_offsets(t, stride_t, rows):
    """``rows`` (from row_offsets) at step t: t*stride_t + rows, in 64 bits, since T*B*G*H passes
    2^31 in long or wide runs. (tl.cast, not .to: Triton passes a size or stride of 1 as a constant.)"""
    return tl.cast(t, tl.int64) * tl.cast(stride_t, tl.int64) + rows


@triton.jit
def load_slots(ptr, H, mask, NUM: tl.constexpr, ACC: tl.constexpr):
    """NUM consecutive H-wide slots at ptr (a tile of pointers); unused slots repeat slot 0."""
    s0 = tl.load(ptr, mask=mask, other=0.0).to(ACC)
    s1 = s0
    s2 = s0
    s3 = s0
    if NUM > 1:
        s1 = tl.load(ptr + H, mask=mask, other=0.0).to(ACC)
        s2 = tl.load(ptr + 2 * H, mask=mask, other=0.0).to(ACC)
    if NUM > 3:
        s3 = tl.load(ptr + 3 * H, mask=mask, other=0.0).to(ACC)
    return s0, s1, s2, s3


@triton.jit
def store_slots(ptr, H, mask, NUM: tl.constexpr, s0, s1, s2, s3):
    tl.store(ptr, s0.to(ptr.dtype.element_ty), mask=mask)
    if NUM > 1:
        tl.store(ptr + H, s1.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + 2 * H, s2.to(ptr.dtype.element_ty), mask=mask)
    if NUM > 3:
        tl.store(ptr + 3 * H, s3.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_steps(s, lengths, reverse, T):
    """Each batch row's time index at its s-th step, and whether it has an s-th step, as [1, BLOCK_B]
    tiles: t = s, or length - 1 - s when reverse (a sequence shorter than T runs backwards from its own
    last element, as torch.nn does with packed input); a row has a step while s < length.
    t is clamped into [0, T) so that every address stays in bounds."""
    t = s + reverse * (lengths - 1 - 2 * s)
    t = tl.minimum(tl.maximum(t, 0), T - 1)
    return t[None, :], (s < lengths)[None, :]


@triton.jit
def split_k(BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """K's indices split in SPLIT slices, [SPLIT, BLOCK_K // SPLIT]: slice s holds s * (BLOCK_K //
    SPLIT) ... (see ``split_dot``; a left operand takes them as [:, None, :], a right one as [:, :, None])."""
    KS: tl.constexpr = BLOCK_K // SPLIT
    return tl.arange(0, SPLIT)[:, None] * KS + tl.arange(0, KS)[None, :]


@triton.jit
def load_split_gate_tiles(w_ptr, H, rows, mask_rows, k0, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                          NUM_GATES: tl.constexpr, DOT_DTYPE: tl.constexpr, KEPT: tl.constexpr):
    """The NUM_GATES tiles W_k[rows, k0 : k0 + BLOCK_K] of W_hh [NUM_GATES*H, H] (W_k: gate k's H
    rows), each split along K for ``split_dot``: [SPLIT, rows, BLOCK_K // SPLIT].

    KEPT: the tiles serve every step (loaded before the time loop). In half precision, where they then
    take at most 64 registers per thread, they are returned as a
    tensor-core dot leaves them (``_in_registers``), so that the time loop keeps them in registers;
    else they stay in shared memory, read by every step. Slots beyond NUM_GATES repeat slot 0 and are never used.
    """
    k = k0 + split_k(BLOCK_K, SPLIT)[:, None, :]
    offs = rows[None, :, None] * H + k
    mask = mask_rows[None, :, None] & (k < H)
    # registers per thread the tiles take there: at most 64 (the rest of a step needs ~170 of 255)
    IN_REGS: tl.constexpr = KEPT and (NUM_GATES * rows.shape[0] * BLOCK_K * DOT_DTYPE.primitive_bitwidth
                                      <= 64 * 32 * 32 * SPLIT)
    w0 = _in_registers(tl.load(w_ptr + offs, mask=mask, other=0.0).to(DOT_DTYPE), IN_REGS)
    w1 = w0
    w2 = w0
    w3 = w0
    if NUM_GATES > 1:
        w1 = _in_registers(tl.load(w_ptr + H * H + offs, mask=mask, other=0.0).to(DOT_DTYPE), IN_REGS)
        w2 = _in_registers(tl.load(w_ptr + 2 * H * H + offs, mask=mask, other=0.0).to(DOT_DTYPE), IN_REGS)
    if NUM_GATES > 3:
        w3 = _in_registers(tl.load(w_ptr + 3 * H * H + offs, mask=mask, other=0.0).to(DOT_DTYPE), IN_REGS)
    return w0, w1, w2, w3


@triton.jit
def _in_registers(w, IN_REGS: tl.constexpr):
    """A half-precision tile w [SPLIT, M, K] as the result of I @ w (exact: each sum has one nonzero
    product), which puts it in the tensor-core accumulator layout. From there Triton converts it to a
    dot's operand layout in registers; a tile loaded from global memory would instead be staged in shared
    memory and read back (ldmatrix) at every use, i.e. every step. Without IN_REGS, and float32 and
    float64 tiles, as they are."""
    if IN_REGS and w.dtype.primitive_bitwidth == 16:
        i = tl.arange(0, w.shape[1])
        eye = (i[:, None] == i[None, :]).to(w.dtype)
        w = tl.dot(tl.broadcast_to(eye[None, :, :], [w.shape[0], w.shape[1], w.shape[1]]), w,
                   out_dtype=tl.float32).to(w.dtype)
    return w


@triton.jit
def split_dot(w, x, acc, PRECISION: tl.constexpr):
    """acc + w @ x with K split over the program's warps: w [SPLIT, M, K/SPLIT] and x [SPLIT, K/SPLIT,
    N] (``split_k``'s slices) multiply slice by slice, one slice per warp, and the SPLIT partial
    products are summed. An [M, K] @ [K, N] dot with M = 16 would give every warp the whole product
    (warps split M and N only); this gives each warp a 1/SPLIT share of it."""
    return acc + sum_slices(tl.dot(w, x, out_dtype=acc.dtype, input_precision=PRECISION))


@triton.jit
def load_slots_at_once(ptr, H, mask, NUM: tl.constexpr, ACC: tl.constexpr):
    """``load_slots`` in one load (``load_slot_tile``), split into the slots (``slots_of``). One load is
    one round trip, where separate loads each wait for their layout conversion; and a tile with more
    elements than the program has threads gives the math that follows it its layout."""
    return slots_of(load_slot_tile(ptr, H, mask, NUM), NUM, ACC)


@triton.jit
def load_slot_tile(ptr, H, mask, NUM: tl.constexpr):
    """The NUM consecutive H-wide slots at ptr (a tile of pointers) in one load, as stored: [units,
    rows, 4] (slots past NUM read 0), or [units, rows] when NUM is 1. A time loop that loads it a step
    ahead splits it (``slots_of``) only when the step uses it: the split's layout conversion waits for
    the data, and there it has long arrived."""
    if NUM == 1:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        g = tl.arange(0, 4)[None, None, :]
        return tl.load(ptr[:, :, None] + g * H, mask=mask[:, :, None] & (g < NUM), other=0.0)


@triton.jit
def slots_of(x, NUM: tl.constexpr, ACC: tl.constexpr):
    """The slots of a ``load_slot_tile`` tile in ACC; unused slots repeat slot 0."""
    x = x.to(ACC)
    if NUM == 1:
        return x, x, x, x
    else:
        even, odd = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))  # slots 0, 2 and 1, 3
        s0, s2 = tl.split(even)
        s1, s3 = tl.split(odd)
        return s0, s1, s2, s3


@triton.jit
def load_split_stacked_tiles(w_ptr, H, rows, mask_rows, k0, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                             SLOTS: tl.constexpr, DOT_DTYPE: tl.constexpr, KEPT: tl.constexpr):
    """The tiles W_k[rows, k0 : k0 + BLOCK_K] of gates k < SLOTS of W_hh [*, H] side by side along K,
    split for ``split_dot``: [SPLIT, rows, SLOTS * BLOCK_K // SPLIT], slice s holding, gate after gate,
    the columns s * (BLOCK_K // SPLIT) ... of each. One dot with it sums the gates' products
    (``split_slots`` loads its right operand). KEPT and registers: as ``load_split_gate_tiles``."""
    KS: tl.constexpr = BLOCK_K // SPLIT
    k = k0 + split_k(BLOCK_K, SPLIT)[:, None, None, :]
    offs = tl.arange(0, SLOTS)[None, None, :, None] * H * H + rows[None, :, None, None] * H + k
    w = tl.load(w_ptr + offs, mask=mask_rows[None, :, None, None] & (k < H), other=0.0).to(DOT_DTYPE)
    IN_REGS: tl.constexpr = KEPT and (SLOTS * rows.shape[0] * BLOCK_K * DOT_DTYPE.primitive_bitwidth
                                      <= 64 * 32 * 32 * SPLIT)
    return _in_registers(tl.reshape(w, [SPLIT, rows.shape[0], SLOTS * KS]), IN_REGS)


@triton.jit
def split_slots(ptr, t, stride_t, offs_b, stride_b, rows, H, k0, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                SLOTS: tl.constexpr):
    """The right operand to ``load_split_stacked_tiles``' left: slots k < SLOTS (H apart) of all units
    of a [T, B, *] tensor at step t ([1, rows] per row), [SPLIT, SLOTS * BLOCK_K // SPLIT, rows], in
    one load (one round trip for all the slots). Rows where ``rows`` is false read zeros."""
    KS: tl.constexpr = BLOCK_K // SPLIT
    k = k0 + split_k(BLOCK_K, SPLIT)[:, None, :, None]
    b = offs_b[None, None, None, :]
    offs = (tl.cast(t, tl.int64)[:, None, None, :] * tl.cast(stride_t, tl.int64) + b.to(tl.int64) * stride_b
            + tl.arange(0, SLOTS)[None, :, None, None] * H + k)
    x = tl.load(ptr + offs, mask=(k < H) & rows[None, None, None, :], other=0.0, cache_modifier=".cg")
    return tl.reshape(x, [SPLIT, SLOTS * KS, x.shape[3]])


@triton.jit
def sum_slices(p):
    """p [SPLIT, M, N] summed over its first axis, as pairwise splits of the last axis."""
    p = tl.permute(p, (1, 2, 0))
    if p.shape[2] >= 8:
        a, b = tl.split(tl.reshape(p, [p.shape[0], p.shape[1], p.shape[2] // 2, 2]))
        p = a + b
    if p.shape[2] >= 4:
        a, b = tl.split(tl.reshape(p, [p.shape[0], p.shape[1], p.shape[2] // 2, 2]))
        p = a + b
    if p.shape[2] >= 2:
        a, b = tl.split(tl.reshape(p, [p.shape[0], p.shape[1], p.shape[2] // 2, 2]))
        p = a + b
    return tl.reshape(p, [p.shape[0], p.shape[1]])
