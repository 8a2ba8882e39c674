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
