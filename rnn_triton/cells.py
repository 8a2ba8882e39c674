"""Drop-in torch.nn cells (``RNNCell``, ``LSTMCell``, ``GRUCell``) whose forward is one fused Triton step.

Each class subclasses its torch.nn counterpart: same constructor, parameters, state_dict, outputs and
input checks (1-D unbatched input, hx omitted = zeros). ``forward`` runs ``cell_ops.cell_step``: the
GEMMs x @ W_ih^T and h @ W_hh^T and the cell math in one launch, the backward in one more (made for
autoregressive decoding, where each step's input is the last step's output).

Input torch.nn rejects goes to torch.nn's forward, which raises its own error (before any refusal of
ours), except an ``hx`` of the wrong type: a TypeError naming the type expected. Input the kernels do not
serve (see ``kernel_plan`` and ``_call_plan``) runs torch.nn's forward too, or, under
``RNN_TRITON_STRICT=1``, raises ``NotImplementedError`` with the reason.
"""
from contextlib import nullcontext

import torch
from torch import nn

from . import cell_ops, dispatch, runtime
from .modules import check_state_type

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


class _TritonCell:
    """The shared forward of LSTMCell, GRUCell and RNNCell; mixed in before the torch.nn class."""

    @property
    def _cell(self) -> str:
        if isinstance(self, nn.LSTMCell):
            return "LSTM"
        if isinstance(self, nn.GRUCell):
            return "GRU"
        return {"tanh": "RNN_TANH", "relu": "RNN_RELU"}.get(self.nonlinearity, f"RNN_{self.nonlinearity}")

    def _autocast_dtype(self, input):
        """The dtype autocast makes torch.nn's cell compute in, or None. On CUDA, autocast casts the
        cell ops (lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell) to its dtype, float16 or bfloat16;
        on the CPU it casts only some of the GEMMs inside them (not served: see ``kernel_plan``)."""
        device = input.device.type
        if device != "cuda" or not torch.is_autocast_enabled(device):
            return None
        return torch.get_autocast_dtype(device)

    def _compute_dtype(self, t, cast):
        """t's dtype after autocast's cast (which leaves float64 and non-float tensors alone)."""
        return cast if cast is not None and t.dtype in _CASTABLE else t.dtype

    def kernel_plan(self, input) -> dispatch.Plan:
        """The kernel this cell would run for ``input``, or the reason it would fall back to torch;
        ``.second_order`` says what a create_graph=True backward runs."""
        if not isinstance(input, torch.Tensor):
            return dispatch.Plan(None, f"input is a {type(input).__name__}, not a Tensor: torch.nn raises")
        if input.dim() not in (1, 2):
            return dispatch.Plan(None, f"input is {input.dim()}-D, not 1-D or 2-D: torch.nn raises")
        if self._cell not in cell_ops.CELLS:
            return dispatch.Plan(None, f"nonlinearity {self.nonlinearity!r} is not tanh or relu: torch.nn raises")
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu") and input.dtype != torch.float64:
            return dispatch.Plan(None, "CPU autocast (which casts only some GEMMs inside torch's cells) is "
                                       "not supported")
        cast = self._autocast_dtype(input)
        dtype = self._compute_dtype(input, cast)
        weights = [self.weight_ih, self.weight_hh] + ([self.bias_ih, self.bias_hh] if self.bias else [])
        G = cell_ops.CELLS[self._cell].num_gates
        H, I = self.hidden_size, input.shape[-1]
        shapes = [(G * H, I), (G * H, H), (G * H,), (G * H,)]
        if any(w.device != input.device for w in weights):
            return dispatch.Plan(None, "input and parameters are on different devices: torch.nn raises")
        if any(self._compute_dtype(w, cast) != dtype for w in weights):
            return dispatch.Plan(None, f"input ({input.dtype}) and parameters "
                                       f"({', '.join(str(w.dtype) for w in weights)}) differ in dtype")
        if I != self.input_size or any(tuple(w.shape) != s for w, s in zip(weights, shapes)):
            return dispatch.Plan(None, f"input of {I} features, parameters "
                                       f"{[tuple(w.shape) for w in weights]} do not fit input_size="
                                       f"{self.input_size}, hidden_size={H}")
        return cell_ops.choose(self._cell, I, H, dtype, input.device)

    def _call_plan(self, input, hx) -> dispatch.Plan:
        """``kernel_plan(input)``, refused also when ``hx`` is not exactly the state this input needs."""
        plan = self.kernel_plan(input)
        reason = self._state_mismatch(input, hx) if plan.uses_triton and hx is not None else None
        return plan if reason is None else dispatch.Plan(None, reason)

    def _state_mismatch(self, input, hx):
        """Why ``hx`` is not a state the kernels take for ``input`` (or None)."""
        states = hx if self._cell == "LSTM" else (hx,)  # their types: checked in forward
        cast = self._autocast_dtype(input)
        dtype = self._compute_dtype(input, cast)
        want = input.shape[:-1] + (self.hidden_size,)
        for h in states:
            if tuple(h.shape) != tuple(want):
                return (f"hx of shape {tuple(h.shape)} for input of shape {tuple(input.shape)}: expected "
                        f"{tuple(want)}")
            if h.device != input.device:
                return "input and hx are on different devices"
            if self._compute_dtype(h, cast) != dtype:
                return f"hx is {h.dtype}, input {input.dtype}"
        return None

    def forward(self, input, hx=None):
        check_state_type(type(self).__name__, self._cell == "LSTM", hx)
        plan = self._call_plan(input, hx)
        if not plan.uses_triton:
            if runtime.strict():
                super().forward(input, hx)  # input torch.nn rejects: its own error, as without strict mode
                raise NotImplementedError(f"rnn_triton.{type(self).__name__}: {plan.reason}")
            out = super().forward(input, hx)
            runtime.warn_fallback(self, plan.reason)  # after: what torch.nn rejects raises, unwarned
            return out
        is_lstm = self._cell == "LSTM"
        batched = input.dim() == 2
        h = c = None
        if hx is not None:
            h, c = hx if is_lstm else (hx, None)
        if not batched:
            input = input.unsqueeze(0)
            h = None if h is None else h.unsqueeze(0)
            c = None if c is None else c.unsqueeze(0)
        weights = [self.weight_ih, self.weight_hh, self.bias_ih if self.bias else None,
                   self.bias_hh if self.bias else None]
        cast = self._autocast_dtype(input)
        if cast is not None:  # differentiable casts: gradients come back in each tensor's own dtype
            input, h, c, *weights = [t.to(cast) if t is not None and t.dtype in _CASTABLE else t
                                     for t in (input, h, c, *weights)]
        device = input.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            hy, cy = cell_ops.cell_step(self._cell, input, *weights, h, c, plan.config)
        if not batched:
            hy = hy.squeeze(0)
            cy = None if cy is None else cy.squeeze(0)
        return (hy, cy) if is_lstm else hy


class LSTMCell(_TritonCell, nn.LSTMCell):
    """``torch.nn.LSTMCell`` whose step is one fused Triton kernel (both GEMMs and the cell math)."""


class GRUCell(_TritonCell, nn.GRUCell):
    """``torch.nn.GRUCell`` whose step is one fused Triton kernel (both GEMMs and the cell math)."""


class RNNCell(_TritonCell, nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) whose step is one fused Triton kernel."""
