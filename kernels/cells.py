"""One step of each recurrent cell, forward and backward, in fp32 (or fp64) registers.

Gate order and equations are torch.nn's, so weights load from torch.nn modules unchanged:

- LSTM (gates i, f, g, o):  i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o),
  c' = f*c + i*g,  h' = o*tanh(c'),  where a_k = x_k + r_k  (x_k: input projection with both biases,
  r_k = (h @ W_hh^T)_k).
- GRU (gates r, z, n):  r = sigmoid(x_r + r_r), z = sigmoid(x_z + r_z), q = r_n + b_hn,
  n = tanh(x_n + r*q),  h' = (1-z)*n + z*h.   b_hn stays inside r*(...), so it is not in x_n.
- RNN:  h' = tanh(x + r) or relu(x + r).

The time loops call ``cell_forward`` / ``cell_backward`` with four gate slots; a cell with fewer gates
gets (and returns) unused slots that the loops never load or store (CELL decides at compile time).

What each cell saves per step for its backward ("saved slots", in the storage dtype): the
pre-activations, from which the backward recomputes the gates. (An activation rounded to bf16 would
lose 1 - sigma where a gate saturates: sigma(5) = 0.9933 is 1 - 2^-7.2, one bf16 step from 1.)
LSTM: a_i, a_f, a_g, a_o.  GRU: a_r, a_z, a_n = x_n + r*q, q.  RNN: a.
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

#: Kernels run through Triton's interpreter (TRITON_INTERPRET=1, read at import, as triton does).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

LSTM = tl.constexpr(0)
GRU = tl.constexpr(1)
RNN_TANH = tl.constexpr(2)
RNN_RELU = tl.constexpr(3)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    """tanh(x), accurate to float32's precision for every x, near 0 too.

    Compiled: libdevice's tanh (within 2 ulp). Interpreted (libdevice does not run there): the exp
    form 2*sigmoid(2x) - 1 in float64, whose cancellation near 0 (absolute error ~1e-16, so relative
    ~1e-16/|x|) is far below float32's precision; in float32 the same form is 1e-3 off at |x| = 1e-4.
    (float64 inputs, the interpreter's exactness tests, keep that ~1e-16/|x|.)
    """
    if INTERPRETED:
        return (2.0 / (1.0 + tl.exp(-2.0 * x.to(tl.float64))) - 1.0).to(x.dtype)
    else:
        return libdevice.tanh(x)


@triton.jit
def cell_forward(CELL: tl.constexpr, a0, a1, a2, a3, x_n, b_hn, h, c):
    """One step. a_k = x_k + (h @ W_hh^T)_k per gate slot, except GRU's a2 = (h @ W_hn^T) alone, whose
    input part is x_n.

    Returns (h', c', s0, s1, s2, s3): the new state and the saved slots for backward (the
    pre-activations; GRU's q too).
    """
    if CELL == LSTM:
        i = _sigmoid(a0)
        f = _sigmoid(a1)
        g = _tanh(a2)
        o = _sigmoid(a3)
        c_new = f * c + i * g
        h_new = o * _tanh(c_new)
        return h_new, c_new, a0, a1, a2, a3
    elif CELL == GRU:
        r = _sigmoid(a0)
        z = _sigmoid(a1)
        q = a2 + b_hn
        a_n = x_n + r * q
        n = _tanh(a_n)
        h_new = (1.0 - z) * n + z * h
        return h_new, c, a0, a1, a_n, q
    elif CELL == RNN_TANH:
        h_new = _tanh(a0)
        return h_new, c, a0, a0, a0, a0
    else:
        h_new = tl.maximum(a0, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) is NaN, as torch
        return h_new, c, a0, a0, a0, a0


@triton.jit
def cell_backward(CELL: tl.constexpr, dh, dc, s0, s1, s2, s3, c_new, c, h):
    """Derivative of ``cell_forward``.

    dh, dc: dLoss/dh', dLoss/dc' (everything after this step).  s*: saved slots of this step (the
    gates are recomputed from them);
    c_new, c: cell state after and before the step (LSTM); h: hidden state before the step (GRU).

    Returns (dx0, dx1, dx2, dx3, dr2, dh_direct, dc_prev): gradients of the input-projection slots,
    the gradient of the recurrent n-slot r_n (GRU only, where it differs from dx2), the part of
    dLoss/dh that does not go through W_hh, and dLoss/dc.
    The recurrent slots' gradients equal the input slots' (dr_k = dx_k) except GRU's n-slot.
    """
    if CELL == LSTM:
        i = _sigmoid(s0)
        f = _sigmoid(s1)
        g = _tanh(s2)
        o = _sigmoid(s3)
        tc = _tanh(c_new)
        dc = dc + dh * o * (1.0 - tc * tc)
        di = dc * g * i * (1.0 - i)
        df = dc * c * f * (1.0 - f)
        dg = dc * i * (1.0 - g * g)
        do = dh * tc * o * (1.0 - o)
        return di, df, dg, do, dg, dh * 0.0, dc * f
    elif CELL == GRU:
        r = _sigmoid(s0)
        z = _sigmoid(s1)
        n = _tanh(s2)
        q = s3
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dz = dh * (h - n) * z * (1.0 - z)
        dr = dn * q * r * (1.0 - r)
        return dr, dz, dn, dn, dn * r, dh * z, dc
    elif CELL == RNN_TANH:
        h_new = _tanh(s0)
        da = dh * (1.0 - h_new * h_new)
        return da, da, da, da, da, dh * 0.0, dc
    else:
        da = tl.where(s0 <= 0.0, 0.0, dh)  # torch's threshold_backward: a NaN h' (a) passes dh on
        return da, da, da, da, da, dh * 0.0, dc


SLSTM = tl.constexpr(4)


@triton.jit
def slstm_forward(a_i, a_f, a_z, a_o, c, n, m):
    """One sLSTM step (xLSTM, arXiv 2405.04517), FlashRNN's equations: gates i, f, z, o with
    a_k = x_k + (h @ R^T)_k, states h, c, n (normaliser), m (stabiliser, a log scale):

        lfm = m + log sigmoid(a_f);   m' = a_i where n = 0 (a fresh state), else max(a_i, lfm)
        i = exp(a_i - m'),  f = exp(lfm - m'),  c' = f c + i tanh(a_z),  n' = max(f n + i, 1)
        h' = sigmoid(a_o) c' / n'

    (FlashRNN's ``vanilla`` backend takes the a_i branch when n = 0 for every element of the batch, its
    Triton kernel per element, as here: they differ only for initial states whose n is 0 in some
    elements and not in others.) Returns (h', c', n', m')."""
    lfm = m + _logsigmoid(a_f)
    m_new = tl.where(n == 0.0, a_i, tl.maximum(a_i, lfm))
    i = tl.exp(a_i - m_new)
    f = tl.exp(lfm - m_new)
    c_new = f * c + i * _tanh(a_z)
    n_new = tl.maximum(f * n + i, 1.0)
    return _sigmoid(a_o) * c_new / n_new, c_new, n_new, m_new


@triton.jit
def slstm_backward(dh, dc, dn, dm, a_i, a_f, a_z, a_o, c, n, m):
    """Derivative of ``slstm_forward`` (autograd's of FlashRNN's vanilla step, stabiliser included):
    dh, dc, dn, dm: dLoss/d(h', c', n', m'); a_*: the step's pre-activations; c, n, m: the states before
    it (the step is recomputed from them). A tie of max() passes half the gradient to each side, as
    torch.maximum's derivative does (n' = max(f n + i, 1) ties at a fresh state's first step).

    Returns (da_i, da_f, da_z, da_o, dc, dn, dm) for the state before the step."""
    lfm = m + _logsigmoid(a_f)
    fresh = n == 0.0
    m_new = tl.where(fresh, a_i, tl.maximum(a_i, lfm))
    i = tl.exp(a_i - m_new)
    f = tl.exp(lfm - m_new)
    z = _tanh(a_z)
    o = _sigmoid(a_o)
    c_new = f * c + i * z
    v = f * n + i
    n_new = tl.maximum(v, 1.0)
    dc = dc + dh * o / n_new
    dn = dn - dh * o * c_new / (n_new * n_new)
    dv = dn * tl.where(v > 1.0, 1.0, tl.where(v == 1.0, 0.5, 0.0))
    e_i = (dc * z + dv) * i    # dLoss/d(a_i - m') through i
    e_f = (dc * c + dv * n) * f  # dLoss/d(lfm - m') through f
    dm_new = dm - e_i - e_f    # m' itself: what reaches it directly and through i and f
    to_i = tl.where(fresh | (a_i > lfm), 1.0, tl.where(a_i == lfm, 0.5, 0.0))
    dlfm = e_f + (1.0 - to_i) * dm_new
    return (e_i + to_i * dm_new, dlfm * _sigmoid(-a_f), dc * i * (1.0 - z * z), dh * c_new / n_new * o * (1.0 - o),
            dc * f, dv * f, dlfm)


@triton.jit
def _logsigmoid(x):
    """log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), without overflow for any x."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))
