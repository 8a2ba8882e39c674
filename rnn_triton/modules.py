"""Drop-in torch.nn recurrent modules whose forward runs the Triton kernels.

Each class subclasses its torch.nn counterpart: same constructor, parameters, state_dict, outputs and
input checks. ``forward`` asks ``dispatch`` for a plan; when no kernel serves the call it runs
torch.nn's own forward, or raises ``NotImplementedError`` with the reason under RNN_TRITON_STRICT=1.
"""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import dispatch, runtime
from .ops import recurrent_layer


class _TritonRecurrent:
    """The shared forward of LSTM, GRU and RNN; mixed in before the torch.nn class."""

    def _module_limit(self, input) -> str | None:
        """Why this module's configuration or this input cannot run on the kernels, or None."""
        if isinstance(input, PackedSequence):
            return "PackedSequence input is not supported yet"
        if self.num_layers != 1:
            return f"num_layers={self.num_layers} is not supported yet (only 1)"
        if self.bidirectional:
            return "bidirectional=True is not supported yet"
        if getattr(self, "proj_size", 0) > 0:
            return "proj_size > 0 is not supported yet"
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            return "input is not a 2-D or 3-D tensor"  # torch.nn's forward raises the right error
        return None

    def kernel_plan(self, input) -> dispatch.Plan:
        """The kernel this module would run for ``input``, or the reason it would fall back to torch."""
        reason = self._module_limit(input)
        if reason is not None:
            return dispatch.Plan(None, reason)
        weight = self.weight_hh_l0
        if input.dtype != weight.dtype or input.device != weight.device:
            return dispatch.Plan(None, "input and weights differ in dtype or device")
        return dispatch.choose(self.mode, self.hidden_size, input.dtype, input.device)

    def forward(self, input, hx=None):
        plan = self.kernel_plan(input)
        if not plan.uses_triton:
            if runtime.strict():
                raise NotImplementedError(f"rnn_triton.{type(self).__name__}: {plan.reason}")
            return super().forward(input, hx)

        is_lstm = self.mode == "LSTM"
        batched = input.dim() == 3
        if hx is not None:
            _check_state_ranks(hx, batched, is_lstm)
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        if hx is not None:
            # torch.nn's own shape, dtype and device checks, with its messages and exception types.
            self.check_forward_args(input, hx, None)

        h0 = c0 = None
        if hx is not None:
            h0, c0 = (hx[0][0], hx[1][0]) if is_lstm else (hx[0], None)
        y, hn, cn = recurrent_layer(
            self.mode, input, self.weight_ih_l0, self.weight_hh_l0,
            self.bias_ih_l0 if self.bias else None, self.bias_hh_l0 if self.bias else None,
            h0, c0, plan.config, self.batch_first)
        hn = hn.unsqueeze(0)
        if not batched:
            y = y.squeeze(0 if self.batch_first else 1)
            hn = hn.squeeze(1)
        if is_lstm:
            cn = cn.unsqueeze(0)
            return y, (hn, cn if batched else cn.squeeze(1))
        return y, hn


def _check_state_ranks(hx, batched: bool, is_lstm: bool):
    """The rank checks torch.nn's forward makes before check_forward_args, with its messages."""
    want = 3 if batched else 2
    kind = "batched 3-D" if batched else "unbatched 2-D"
    if is_lstm:
        if hx[0].dim() != want or hx[1].dim() != want:
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
    elif hx.dim() != want:
        raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")


class LSTM(_TritonRecurrent, nn.LSTM):
    """``torch.nn.LSTM`` whose forward runs one persistent Triton kernel per layer (see README)."""


class GRU(_TritonRecurrent, nn.GRU):
    """``torch.nn.GRU`` whose forward runs one persistent Triton kernel per layer (see README)."""


class RNN(_TritonRecurrent, nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) whose forward runs one persistent Triton kernel per layer."""
