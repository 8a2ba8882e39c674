"""Multi-head (block-diagonal) recurrences and the sLSTM: FlashRNN's and xLSTM's layers as modules.

A layer of ``num_heads`` heads of DH = hidden_size / num_heads units is num_heads independent
recurrences: W_hh is block-diagonal, head j's units see only head j's units of h_{t-1}. Each head runs
in the tile-persistent kernel, one program per (head, batch tile) holding its head's block of W_hh on
chip for all T steps, with no grid barrier (``ops.recurrent_fwd`` with ``heads``). So a large total H
with moderate heads (H = 768 as 12 heads of 64) runs where a dense H = 768 needs the cooperative kernel.

Layouts (FlashRNN's, so that its tensors pass as they are): the hidden vector is head-major, unit
u of head j at j*DH + u; the gate pre-activations are gate-major, [G, heads, DH] (column (g, j, u) at
(g*heads + j)*DH + u); the recurrent weights are R [G, heads, DH, DH] (gate g of head j maps h_j to
R[g, j] @ h_j, rows the outputs, as torch.nn's W_hh). The kernels take them head-major
([heads, G, DH] columns, [heads*G*DH, DH] weights): ``headed_layer`` permutes (one copy of xp).

Cells, all with torch.nn's gate order: LSTM (i, f, g, o), GRU (r, z, n; b_hn inside r * (...)),
RNN (tanh), and the sLSTM (i, f, z, o; kernels/cells.py ``slstm_forward``; states h, c, n, m).
"""
import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import dispatch, packing, reference, runtime
from .dispatch import CELLS
from .ops import padded_units, recurrent_fwd


def headed_layer(cell: str, xp: Tensor, r: Tensor, b_hn: Optional[Tensor], h0: Optional[Tensor],
                 c0: Optional[Tensor], plan: dispatch.Plan, batch_first: bool = False,
                 lengths: Optional[Tensor] = None, states: bool = False):
    """One layer of ``cell`` with R.shape[1] heads, forward, differentiable.

    xp: [T, B, G*H] (or [B, T, G*H]) the gate pre-activations' input part, gate-major (biases folded
    in; GRU: b_hn apart); r: [G, heads, DH, DH]; b_hn: [H] (GRU) or None; h0: [B, H] or None; c0:
    [C, B, H] (the states beside h: the LSTM's c; the sLSTM's c, n, m) or None; ``plan``: from
    ``dispatch.choose(cell, DH, ..., heads=heads)``: the kernel's configuration, or torch's loop
    (``reference.recurrence``) when it has none; lengths: int32 [B] per-row sequence lengths or None.

    Returns (y [T, B, H] (or batch first), hn [B, H], cn [C, B, H] or None, cs [C, T, B, H] or None):
    cs, the states beside h after every step, only with ``states`` (and never past a row's length)."""
    spec = CELLS[cell]
    G, C = spec.num_gates, spec.num_c
    heads, DH = r.shape[1], r.shape[2]
    xp_tm = xp.transpose(0, 1) if batch_first else xp
    T, B, _ = xp_tm.shape
    # the kernels' layout: block j (a head) holds its gates side by side, [heads, G, DH]
    xk = xp_tm.unflatten(-1, (G, heads, DH)).transpose(-3, -2).flatten(-3)
    wk = r.transpose(0, 1).flatten(0, 2)  # [heads*G*DH, DH]
    h0k = None if h0 is None else h0.unflatten(-1, (heads, DH)).transpose(0, 1)  # [heads, B, DH]
    c0k = None if c0 is None else c0.unflatten(-1, (heads, DH)).permute(2, 1, 0, 3).flatten(-2)  # [heads, B, C*DH]
    if not plan.uses_triton:
        y, hn, cn, cs = reference.recurrence(spec.kernel_id, xk, wk, b_hn, h0k, c0k, lengths, False, False, heads,
                                             states=True)
        return _from_blocks(y, hn, cn, cs if states else None, heads, DH, DH, C, batch_first)
    DHp = -(-DH // 16) * 16
    if DHp != DH:  # zero units up to a multiple of 16 in every head (ops.padded_units)
        xk, b_hn, h0k, c0k = (None if t is None else padded_units(t, DH, DHp) for t in (xk, b_hn, h0k, c0k))
        wk = padded_units(padded_units(wk, DH, DHp, 0), DH, DHp, 1)
    save = states or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xp, r, b_hn, h0, c0)))
    c = plan.config
    y, hn, cn, _, cs = recurrent_fwd(xk, wk, b_hn, h0k, c0k, lengths, spec.kernel_id, False, False, save,
                                     c.variant, c.block_b, c.block_h, c.block_u, c.groups, c.w_chunk, c.num_warps,
                                     c.fwd_chunk, heads)
    return _from_blocks(y, hn, cn if C else None, cs if states and C else None, heads, DH, DHp, C, batch_first)


def _from_blocks(y, hn, cn, cs, heads: int, DH: int, DHp: int, C: int, batch_first: bool):
    """``headed_layer``'s outputs from the kernels' per-head blocks of DHp units (the first DH real)."""
    y = y.unflatten(-1, (heads, DHp))[..., :DH].flatten(-2)
    hn = hn[..., :DH].transpose(0, 1).flatten(1)
    if cn is not None:  # [heads, B, C*DHp] -> [C, B, H]
        cn = cn.unflatten(-1, (C, DHp))[..., :DH].permute(2, 1, 0, 3).flatten(-2)
    if cs is not None:  # [heads, T, B, C*DHp] -> [C, T, B, H]
        cs = cs.unflatten(-1, (C, DHp))[..., :DH].permute(3, 1, 2, 0, 4).flatten(-2)
    return (y.transpose(0, 1) if batch_first else y), hn, cn, cs


def projection_bias(cell: str, b_ih: Optional[Tensor], b_hh: Optional[Tensor]):
    """(bias folded into the input projection, b_hn) from torch.nn-style biases [G*H] (gate-major):
    all of both, except the GRU's b_hn (its n-gate part of b_hh), which r multiplies in the cell."""
    if b_ih is None:
        return None, None
    if cell != "GRU":
        return b_ih + b_hh, None
    H = b_hh.shape[0] // 3
    return b_ih + torch.cat([b_hh[:2 * H], torch.zeros_like(b_hh[2 * H:])]), b_hh[2 * H:]


class _MultiHead(nn.Module):
    """The shared module of the headed cells: ``num_layers`` layers of ``num_heads`` heads each.

    Parameters per layer k (gate-major rows, FlashRNN's layout; torch.nn's gate order and biases):
    weight_ih_l{k} [G*H, I] (I = input_size for layer 0, else H), weight_hh_l{k} [G, heads, DH, DH],
    bias_ih_l{k}, bias_hh_l{k} [G*H] (with ``bias``), all initialised U(-1/sqrt(H), 1/sqrt(H)) as
    torch.nn's. forward(input, hx) as torch.nn's: input [T, B, I] ([B, T, I] batch first; [T, I]
    unbatched; or a PackedSequence), hx the states [num_layers, B, H] each (None: zeros)."""

    mode = ""
    state_names = ("h",)

    def __init__(self, input_size: int, hidden_size: int, num_heads: int = 1, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        self.input_size, self.hidden_size, self.num_heads = input_size, hidden_size, num_heads
        self.num_layers, self.bias, self.batch_first = num_layers, bias, batch_first
        G, DH = CELLS[self.mode].num_gates, hidden_size // num_heads
        kw = {"device": device, "dtype": dtype}
        for k in range(num_layers):
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(
                torch.empty(G * hidden_size, input_size if k == 0 else hidden_size, **kw)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G, num_heads, DH, DH, **kw)))
            if bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G * hidden_size, **kw)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G * hidden_size, **kw)))
        self.reset_parameters()

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_heads={self.num_heads}, num_layers={self.num_layers}"
                + ("" if self.bias else ", bias=False") + (", batch_first=True" if self.batch_first else ""))

    def kernel_plan(self, input) -> dispatch.Plan:
        """The kernel this module would run for ``input`` (a tensor or a PackedSequence), or the reason
        it would run torch's loop (``reference.recurrence``) instead."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if packed:
            batch = data.shape[0]  # a bound: the batch only sizes the cooperative kernels, which heads never run
        else:
            batch = data.shape[0 if self.batch_first else 1] if data.dim() == 3 else 1
        plan = dispatch.choose(self.mode, self.head_size, data.dtype, data.device, batch, packed=packed,
                               heads=self.num_heads)
        if plan.uses_triton and data.device.type == "cpu" and not runtime.interpreter_ready():
            raise RuntimeError("rnn_triton: TRITON_INTERPRET=1 was set after triton was imported: set it before "
                               "the first import of triton or rnn_triton")
        return plan

    def forward(self, input, hx=None):
        """(output, h_n) (the LSTM: (output, (h_n, c_n)); the sLSTM: (output, (h_n, c_n, n_n, m_n))), as
        torch.nn's modules return them."""
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            t, row, lengths = packing.steps_and_rows(input)
            x = packing.padded(input, t, row, lengths.shape[0])
            lengths = lengths.to(device=x.device, dtype=torch.int32)
            batch_first, batched = False, True
        else:
            x, batch_first, batched = input, self.batch_first, input.dim() == 3 if isinstance(input, Tensor) else True
        self._check_input(x, batched)
        if not batched:
            x = x.unsqueeze(1)
        B = x.shape[0 if batch_first else 1]
        states = self._check_states(hx, B, batched, x)
        plan = self.kernel_plan(input)
        if not plan.uses_triton:
            if runtime.strict():
                raise NotImplementedError(f"rnn_triton.{type(self).__name__}: {plan.reason}")
            runtime.warn_fallback(self, plan.reason + " (torch's loop over the steps runs instead)")
        hns, cns = [], []
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            for k in range(self.num_layers):
                b, b_hn = projection_bias(self.mode, getattr(self, f"bias_ih_l{k}", None),
                                          getattr(self, f"bias_hh_l{k}", None))
                xp = torch.nn.functional.linear(x, getattr(self, f"weight_ih_l{k}"), b)
                h0 = None if states is None else states[0][k]
                c0 = None if states is None or len(states) == 1 else torch.stack([s[k] for s in states[1:]])
                x, hn, cn, _ = headed_layer(self.mode, xp, getattr(self, f"weight_hh_l{k}"), b_hn, h0, c0, plan,
                                            batch_first, lengths)
                hns.append(hn)
                cns.append(cn)
        finals = [torch.stack(hns)] + ([torch.stack([c[i] for c in cns]) for i in range(cns[0].shape[0])]
                                       if cns[0] is not None else [])
        if packed:
            out = PackedSequence(x[t, row], input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            out = x if batched else x.squeeze(1)
            finals = finals if batched else [f.squeeze(1) for f in finals]
        return out, (finals[0] if len(finals) == 1 else tuple(finals))

    def _check_input(self, x, batched: bool) -> None:
        """torch.nn's input checks, with its exception types."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor or a PackedSequence, got "
                            f"{type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {x.dim()}D instead")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        w = self.weight_hh_l0
        if x.dtype != w.dtype or x.device != w.device:
            raise RuntimeError(f"input ({x.dtype} on {x.device}) must have the parameters' dtype and device "
                               f"({w.dtype} on {w.device})")
        if not torch.jit.is_tracing() and x.shape[0 if not self.batch_first or not batched else 1] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    def _check_states(self, hx, B: int, batched: bool, x: Tensor):
        """hx as a tuple of batched [num_layers, B, H] states, or None; torch.nn's errors."""
        if hx is None:
            return None
        names = self.state_names
        states = (hx,) if isinstance(hx, Tensor) and len(names) == 1 else hx
        if not isinstance(states, (tuple, list)) or len(states) != len(names) or not all(
                isinstance(s, Tensor) for s in states):
            want = "a Tensor" if len(names) == 1 else f"a tuple ({', '.join(names)}) of {len(names)} Tensors"
            raise TypeError(f"{type(self).__name__}: hx must be {want} or None")
        want = (self.num_layers, B, self.hidden_size) if batched else (self.num_layers, self.hidden_size)
        for name, s in zip(names, states):
            if tuple(s.shape) != want:
                raise RuntimeError(f"Expected hidden size {want} for {name}, got {tuple(s.shape)}")
            if s.dtype != x.dtype or s.device != x.device:
                raise RuntimeError(f"Input and hidden tensors are not the same dtype and device, found input "
                                   f"of {x.dtype} on {x.device} and {name} of {s.dtype} on {s.device}")
        return tuple(states) if batched else tuple(s.unsqueeze(1) for s in states)


class MultiHeadLSTM(_MultiHead):
    """An LSTM of ``num_heads`` independent heads (block-diagonal W_hh), torch.nn.LSTM's equations per
    head; hx and the returned states are (h, c)."""
    mode = "LSTM"
    state_names = ("h", "c")


class MultiHeadGRU(_MultiHead):
    """A GRU of ``num_heads`` independent heads (block-diagonal W_hh), torch.nn.GRU's equations per head."""
    mode = "GRU"


class MultiHeadRNN(_MultiHead):
    """An Elman RNN (tanh) of ``num_heads`` independent heads (block-diagonal W_hh)."""
    mode = "RNN_TANH"


class SLSTM(_MultiHead):
    """xLSTM's sLSTM (arXiv 2405.04517) with ``num_heads`` heads, FlashRNN's equations (kernels/cells.py
    ``slstm_forward``): exponential input gate, sigmoid forget gate, normaliser n and stabiliser m.
    Gates i, f, z, o; hx and the returned states are (h, c, n, m); zero states start fresh (n = 0)."""
    mode = "SLSTM"
    state_names = ("h", "c", "n", "m")
