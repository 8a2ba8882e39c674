"""The cells' math in plain differentiable torch ops, and what a ``create_graph=True`` backward does
with it.

The Triton kernels compute the forward and the first-order backward. A gradient of a gradient
(gradient penalties, Hessian-vector products, meta-learning) needs the first-order backward itself as
a differentiable function of its inputs. Under ``create_graph=True`` the ops' backward therefore
still runs the kernels for the gradient *values*, and gives each gradient the autograd graph of the
same gradient computed by torch: the recurrence is recomputed here from the op's inputs with torch ops
(``step`` per cell, ``recurrence`` over the steps), torch's autograd differentiates it with
``create_graph=True``, and the second-order pass runs through that graph (``kernel_values_with_graph``).
That is exact (the same function, differentiated by autograd), costs O(T) memory (the recomputation's
per-step activations, as the first-order pass), and any order of derivative works.
"""
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .dispatch import CELLS

_GATES = {cell.kernel_id: cell.num_gates for cell in CELLS.values()}
_NUM_C = {cell.kernel_id: cell.num_c for cell in CELLS.values()}
LSTM, GRU, RNN_TANH, SLSTM = (CELLS[name].kernel_id for name in ("LSTM", "GRU", "RNN_TANH", "SLSTM"))


def step(cell_id: int, xp: Tensor, hp: Tensor, h: Tensor, c: Optional[Tensor]):
    """One step of a cell, torch.nn's equations, from the input projection xp = W_ih x + b_ih and the
    recurrent projection hp = W_hh h + b_hh (both [B, G*H], gates in torch.nn's order) and the state
    h, c (c: LSTM only; the sLSTM's c, n, m side by side, [B, 3H]). Returns (h', c'), c' None but for
    the LSTM and sLSTM.

    - LSTM: i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o) with a = xp + hp; c' = f c + i g,
      h' = o tanh(c').
    - GRU: r = σ(xp_r + hp_r), z = σ(xp_z + hp_z), n = tanh(xp_n + r hp_n), h' = (1 - z) n + z h
      (b_hn is in hp_n: r multiplies it).
    - RNN: h' = tanh(xp + hp) or relu(xp + hp).
    - sLSTM (FlashRNN's equations; kernels/cells.py ``slstm_forward``): a = xp + hp (gates i, f, z, o),
      lfm = m + log σ(a_f), m' = a_i where n = 0 else max(a_i, lfm), i = exp(a_i - m'),
      f = exp(lfm - m'), c' = f c + i tanh(a_z), n' = max(f n + i, 1), h' = σ(a_o) c' / n'.
    """
    if cell_id == SLSTM:
        a_i, a_f, a_z, a_o = (xp + hp).chunk(4, dim=-1)
        c, n, m = c.chunk(3, dim=-1)
        lfm = m + torch.nn.functional.logsigmoid(a_f)
        m_new = torch.where(n == 0, a_i, torch.maximum(a_i, lfm))
        i, f = torch.exp(a_i - m_new), torch.exp(lfm - m_new)
        c_new = f * c + i * torch.tanh(a_z)
        n_new = torch.maximum(f * n + i, torch.ones_like(n))
        return torch.sigmoid(a_o) * c_new / n_new, torch.cat([c_new, n_new, m_new], dim=-1)
    if cell_id == LSTM:
        i, f, g, o = (xp + hp).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    if cell_id == GRU:
        x_r, x_z, x_n = xp.chunk(3, dim=-1)
        h_r, h_z, h_n = hp.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    a = xp + hp
    return (torch.tanh(a) if cell_id == RNN_TANH else torch.relu(a)), None


def recurrence(cell_id: int, xp: Tensor, w_hh: Tensor, b_hn: Optional[Tensor], h0: Optional[Tensor],
               c0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, batch_first: bool,
               heads: int = 1, states: bool = False):
    """What ``ops.recurrent_fwd`` computes (same arguments and conventions: K = D x heads blocks
    stacked in w_hh [K*G*H, H], xp [T, B, K*G*H] or batch first, b_hn [K*H], h0 [K, B, H], c0
    [K, B, C*H], per-row ``lengths``; block k's direction k // heads runs last step first when
    reverse + k // heads is odd), as a Python loop over the steps of ``step``. Returns (y, hn, cn), cn
    None but for the LSTM and sLSTM, and with ``states`` also cs [K, T, B, C*H], the states beside h
    after every step (recurrent_fwd's cs)."""
    H = w_hh.shape[1]
    GH = _GATES[cell_id] * H
    D = w_hh.shape[0] // GH
    C = _NUM_C[cell_id]
    xp_tm = xp.transpose(0, 1) if batch_first else xp
    T, B, _ = xp_tm.shape
    ys, hns, cns, css = [], [], [], []
    for d in range(D):  # the blocks
        w = w_hh[d * GH:(d + 1) * GH]
        bias = None  # GRU: b_hn, inside r * (W_hn h + b_hn)
        if b_hn is not None:
            bias = torch.cat([b_hn.new_zeros(2 * H), b_hn[d * H:(d + 1) * H]])
        h = h0[d] if h0 is not None else xp.new_zeros(B, H)
        c = (c0[d] if c0 is not None else xp.new_zeros(B, C * H)) if C else None
        backwards = (int(reverse) + d // heads) % 2 == 1
        y, cs = [None] * T, [None] * T
        for t in (range(T - 1, -1, -1) if backwards else range(T)):
            hp = torch.nn.functional.linear(h, w, bias)
            h_new, c_new = step(cell_id, xp_tm[t, :, d * GH:(d + 1) * GH], hp, h, c)
            if lengths is None:
                h, c, y[t] = h_new, c_new, h_new
            else:  # past its length a row keeps its state (the reverse direction starts at its own end)
                live = (t < lengths)[:, None]
                h = torch.where(live, h_new, h)
                c = torch.where(live, c_new, c) if c is not None else None
                y[t] = torch.where(live, h_new, torch.zeros_like(h_new))
            cs[t] = c
        ys.append(torch.stack(y) if T else xp_tm.new_zeros(0, B, H))
        hns.append(h)
        cns.append(c)
        if states and C:
            css.append(torch.stack(cs) if T else xp_tm.new_zeros(0, B, C * H))
    y = torch.cat(ys, dim=-1)
    out = (y.transpose(0, 1) if batch_first else y), torch.stack(hns), (torch.stack(cns) if C else None)
    return out + ((torch.stack(css) if C else None),) if states else out


class _KernelValues(torch.autograd.Function):
    """``kernel``'s values with ``recomputed``'s gradient: y = kernel, dy/d(recomputed) = identity."""

    @staticmethod
    def forward(ctx, kernel, recomputed):
        return kernel.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def kernel_values_with_graph(grads: Sequence[Optional[Tensor]], recompute: Callable[..., Sequence[Optional[Tensor]]],
                             inputs: Sequence[Optional[Tensor]], grad_outputs: Sequence[Optional[Tensor]]):
    """The kernels' first-order gradients ``grads`` (of an op's outputs, weighted by ``grad_outputs``,
    w.r.t. its ``inputs``; None where not asked for), made differentiable for a ``create_graph=True``
    backward: each keeps its values and takes the autograd graph of the same gradient through
    ``recompute(*inputs)`` (the op's outputs in torch ops), so that the gradient of a gradient is
    autograd's exact second derivative of the recomputation."""
    wanted = [i for i, (g, t) in enumerate(zip(grads, inputs))
              if g is not None and t is not None and t.requires_grad]
    if not wanted:
        return list(grads)
    # The op's partial derivatives, not total ones: recompute from fresh aliases of the inputs, so that
    # autograd.grad stops at them. (From the inputs themselves it would also follow paths that run
    # from one input back to another: a cell's state is the last step's output, which depends on the
    # same weights; and a tensor passed twice, as x and as h, would get the sum of both gradients.)
    aliases = [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]
    outputs = recompute(*aliases)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and g is not None]
    recomputed = torch.autograd.grad([o for o, _ in pairs], [aliases[i] for i in wanted], [g for _, g in pairs],
                                     create_graph=True, allow_unused=True)
    grads = list(grads)
    for i, r in zip(wanted, recomputed):
        if r is not None:  # None: the outputs do not depend on this input (its gradient is a constant 0)
            grads[i] = _KernelValues.apply(grads[i], r)
    return grads
