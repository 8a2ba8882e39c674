"""Drop-in torch.nn recurrent modules whose forward runs the Triton kernels.

Each class subclasses its torch.nn counterpart: same constructor, parameters, state_dict, outputs and
input checks. ``forward`` asks ``dispatch`` for a plan; when no kernel serves the call it runs
torch.nn's own forward, or raises ``NotImplementedError`` with the reason under RNN_TRITON_STRICT=1.
"""
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import dispatch, packing, runtime
from .ops import recurrent_directions


class _TritonRecurrent:
    """The shared forward of LSTM, GRU and RNN; mixed in before the torch.nn class."""

    def _autocast_dtype(self, input):
        """The dtype autocast makes torch.nn's module compute in for ``input``, or None.

        On CUDA, cuDNN's RNN autocast wrapper casts to float16 whatever autocast's dtype (ATen's
        cudnn/AutocastRNN.cpp); on the CPU autocast casts LSTM and RNN but not GRU. float64 is never
        cast. We do the same.
        """
        device = input.device.type
        if input.dtype not in (torch.float32, torch.float16, torch.bfloat16) or \
                not torch.is_autocast_enabled(device):
            return None
        if device == "cuda":
            return torch.float16 if torch.backends.cudnn.enabled else None
        if device == "cpu" and self.mode == "GRU":
            return None
        return torch.get_autocast_dtype(device)

    def _invalid_input(self, input) -> bool:
        """Input torch.nn's forward rejects: it raises the right error, so let it."""
        if not isinstance(input, torch.Tensor):
            return True
        weight = self.weight_hh_l0
        return input.dim() not in (2, 3) or input.device != weight.device or (
            input.dtype != weight.dtype and self._autocast_dtype(input) is None)

    def kernel_plan(self, input) -> dispatch.Plan:
        """The kernel this module would run for ``input`` (a tensor or a PackedSequence), or the reason
        it would fall back to torch; ``.second_order`` says what a create_graph=True backward runs."""
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        if self._invalid_input(data) or (packed and data.dim() != 2):
            return dispatch.Plan(None, "input does not match the module (rank, dtype or device): torch.nn raises")
        dtype = self._autocast_dtype(data) or data.dtype
        if packed and input.sorted_indices is not None:
            batch = input.sorted_indices.shape[0]
        elif packed:
            # Under torch.compile batch_sizes[0] is a value, not a shape (.item(): a graph break); the
            # packed rows bound it, and the batch only sizes the cooperative kernels' batch groups.
            batch = data.shape[0] if torch.compiler.is_compiling() else int(input.batch_sizes[0])
        else:
            batch = input.shape[0 if self.batch_first else 1] if input.dim() == 3 else 1
        plan = dispatch.choose(self.mode, self.hidden_size, dtype, data.device, batch, packed=packed,
                               directions=2 if self.bidirectional else 1)
        if plan.uses_triton and data.device.type == "cpu" and not runtime.interpreter_ready():
            raise RuntimeError(
                "rnn_triton: TRITON_INTERPRET=1 was set after triton was imported (importing rnn_triton "
                "imports it), so the Triton kernels were built for a GPU and cannot run on the CPU. Set it "
                "before the first import of triton or rnn_triton: run `TRITON_INTERPRET=1 python ...`, or "
                "put `os.environ[\"TRITON_INTERPRET\"] = \"1\"` at the top of the script.")
        return plan

    def forward(self, input, hx=None):
        """torch.nn's forward: every check torch.nn makes comes first (its exception types), then the
        plan; the kernels where it has one, else torch.nn's forward (or, strict, NotImplementedError)."""
        check_state_type(type(self).__name__, self.mode == "LSTM", hx)
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if self._invalid_input(input):
            return super().forward(input, hx)
        batched = input.dim() == 3
        x, state = self._checked(input, hx, batched)
        plan = self.kernel_plan(input)
        if not plan.uses_triton:
            return self._torch_forward(plan, input, hx)

        is_lstm = self.mode == "LSTM"
        cast = self._autocast_dtype(x)
        if cast is not None:  # differentiable casts: the gradients come back in the parameters' dtype
            x = x.to(cast)
            state = None if state is None else (tuple(h.to(cast) for h in state) if is_lstm else state.to(cast))
        # Under autocast the casts are done: none inside. (No context otherwise: export keeps it.)
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            y, hn, cn = self._layers(x, state, plan.config, cast, self.batch_first)
        if not batched:
            y = y.squeeze(0 if self.batch_first else 1)
            hn = hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
        return (y, (hn, cn)) if is_lstm else (y, hn)

    def _checked(self, input, hx, batched):
        """torch.nn's checks of a padded call (state dtype, device and rank, sequence length, sizes), with
        its exception types and messages; returns (input, hx) batched (unbatched input gets a batch
        dimension of 1)."""
        is_lstm = self.mode == "LSTM"
        if hx is not None:
            _check_state_dtypes(hx, is_lstm, input, self._autocast_dtype(input) is not None)
            _check_state_ranks(hx, batched, is_lstm)
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        # Not while tracing: jit.trace turns the size into a tensor and warns at its use as a bool.
        if not torch.jit.is_tracing() and input.shape[0 if not self.batch_first else 1] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx is None:
            self.check_input(input, None)
        else:
            self.check_forward_args(input, hx, None)
        return input, hx

    def _torch_forward(self, plan, input, hx):
        """torch.nn's own forward, for a call no kernel serves; under RNN_TRITON_STRICT=1 an error."""
        if runtime.strict():
            raise NotImplementedError(f"rnn_triton.{type(self).__name__}: {plan.reason}")
        out = super().forward(input, hx)
        runtime.warn_fallback(self, plan.reason)  # after: what torch.nn rejects raises, unwarned
        return out

    def _forward_packed(self, input, hx):
        """A PackedSequence in and out, as torch.nn. The sequences run padded to the longest, each row
        stopping at its own length inside the kernel (y is zero past it, h_n is its last state, the
        reverse direction starts from its own last element), in the batch's original order; the output
        is packed with the input's batch sizes and indices. Tensor ops only (``packing``): torch.compile
        traces it without a graph break."""
        data = input.data
        if self._invalid_input(data) or data.dim() != 2:
            return super().forward(input, hx)
        is_lstm = self.mode == "LSTM"
        if hx is not None:
            _check_state_dtypes(hx, is_lstm, data, self._autocast_dtype(data) is not None)
            _check_state_ranks(hx, True, is_lstm)
        # torch.nn's own checks, with its messages and exception types: before any refusal of ours.
        t, row, lengths = packing.steps_and_rows(input)
        self.check_input(data, input.batch_sizes)
        x = packing.padded(input, t, row, lengths.shape[0])  # [T, B, I], the batch's original order
        if hx is not None:
            if torch.compiler.is_compiling():  # B is data there: what the check below compares it with
                for h in (hx if is_lstm else (hx,)):
                    torch._check(h.shape[1] == x.shape[1], lambda: "hx's batch size is not the input's")
            # torch.nn's own check of the states' sizes (its messages), on the padded input
            self.check_forward_args(x, hx, None)
        plan = self.kernel_plan(input)
        if not plan.uses_triton:
            return self._torch_forward(plan, input, hx)
        cast = self._autocast_dtype(data)
        if cast is not None:
            x = x.to(cast)
            hx = None if hx is None else (tuple(h.to(cast) for h in hx) if is_lstm else hx.to(cast))
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            y, hn, cn = self._layers(x, hx, plan.config, cast, False,
                                     lengths.to(device=x.device, dtype=torch.int32))
        out = PackedSequence(y[t, row], input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        return (out, (hn, cn)) if is_lstm else (out, hn)

    def _layers(self, x, hx, config, cast, batch_first, lengths=None):
        """Every layer in turn, each one call of ``recurrent_directions`` (its directions in one launch
        in the tile kernel; see ops.recurrent_fwd); h_n[k] is layer k // D, direction
        k % D, as torch.nn's. Dropout between layers only in training, as torch.nn does."""
        is_lstm = self.mode == "LSTM"
        D = 2 if self.bidirectional else 1
        hns, cns = [], []
        for layer in range(self.num_layers):
            weights = [self._direction_weights(layer, direction, cast) for direction in range(D)]
            h0 = c0 = None
            if hx is not None:
                h0, c0 = (hx[0][layer * D:(layer + 1) * D], hx[1][layer * D:(layer + 1) * D]) if is_lstm \
                    else (hx[layer * D:(layer + 1) * D], None)
            x, hn, cn = recurrent_directions(self.mode, x, weights, h0, c0, config, batch_first, lengths,
                                             hidden_size=self.hidden_size)
            hns.append(hn)
            cns.append(cn)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
        return x, torch.cat(hns), (torch.cat(cns) if is_lstm else None)

    def _direction_weights(self, layer, direction, cast):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction, None where absent, cast to
        ``cast`` when autocast asks for it (differentiably: gradients reach the parameters)."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        present = (True, True, self.bias, self.bias, getattr(self, "proj_size", 0) > 0)
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        weights = [getattr(self, name + suffix) if p else None for name, p in zip(names, present)]
        return [w.to(cast) if w is not None and cast is not None else w for w in weights]


def check_state_type(owner: str, is_lstm: bool, hx) -> None:
    """A TypeError naming the expected type when ``hx`` is neither None nor what ``owner`` (a module
    or cell class name) takes: a Tensor, or for the LSTMs a pair (h, c) of Tensors. (torch.nn lets
    an IndexError or AttributeError from deep inside its forward escape there.)"""
    if hx is None:
        return
    if is_lstm:
        if isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(h, torch.Tensor) for h in hx):
            return
        want = "a tuple (h, c) of two Tensors"
    elif isinstance(hx, torch.Tensor):
        return
    else:
        want = "a Tensor"
    got = type(hx).__name__
    if isinstance(hx, (tuple, list)):
        got = f"a {got} of {len(hx)} ({', '.join(type(h).__name__ for h in hx)})"
    raise TypeError(f"{owner}: hx must be {want} or None, got {got}")


def _check_state_dtypes(hx, is_lstm: bool, input, autocast: bool):
    """hx's dtype and device, with the exception type torch.nn raises (its messages are cryptic)."""
    for h in (hx if is_lstm else [hx]):
        if h.device != input.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input on "
                               f"{input.device} and hidden on {h.device}")
        if h.dtype != input.dtype and not autocast:
            raise RuntimeError(f"Input and hidden tensors are not the same dtype, found input of "
                               f"{input.dtype} and hidden of {h.dtype}")


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
