"""The implementations a benchmark puts side by side, all built from one torch.nn module's weights.

``build(provider, ref, ...)`` returns a callable ``x -> output sequence`` or raises ``Unavailable``
with the reason (a library not installed, a configuration a provider does not cover).
"""
import importlib.util

import torch

import rnn_triton

#: cell -> (ours, torch.nn module, torch.nn single-step cell, constructor extras)
CELLS = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, torch.nn.LSTMCell, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, torch.nn.GRUCell, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, torch.nn.RNNCell, {"nonlinearity": "relu"}),
}

PROVIDERS = ["rnn_triton", "torch.nn", "torch-loop", "torch-loop-compiled", "flashrnn", "haste"]


class Unavailable(Exception):
    """This provider cannot run this configuration; the message says why."""


def make_reference(cell, input_size, hidden_size, num_layers, bidirectional, device, dtype):
    _, nn_cls, _, extra = CELLS[cell]
    return nn_cls(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                  **extra).to(device, dtype)


class CellLoop(torch.nn.Module):
    """What people write without a fused kernel: a Python loop over T steps of torch.nn.*Cell."""

    def __init__(self, ref):
        super().__init__()
        _, _, cell_cls, extra = CELLS[ref.mode]
        self.cell = cell_cls(ref.input_size, ref.hidden_size, **extra).to(ref.weight_ih_l0)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.cell, name).copy_(getattr(ref, name + "_l0"))
        self.is_lstm = ref.mode == "LSTM"

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        state = (h, h) if self.is_lstm else h
        outputs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outputs.append(state[0] if self.is_lstm else state)
        return torch.stack(outputs)


def build(provider, ref, x, on_gpu):
    """A callable computing ``ref``'s output sequence for inputs like ``x`` ([T, B, I])."""
    if provider == "torch.nn":
        return lambda inp: ref(inp)[0]
    if provider == "rnn_triton":
        ours_cls = CELLS[ref.mode][0]
        ours = ours_cls(ref.input_size, ref.hidden_size, num_layers=ref.num_layers,
                        bidirectional=ref.bidirectional, **CELLS[ref.mode][3]).to(x.device, x.dtype)
        ours.load_state_dict(ref.state_dict())
        plan = ours.kernel_plan(x)
        if not plan.uses_triton:
            raise Unavailable(plan.reason)
        return lambda inp: ours(inp)[0]
    if provider in ("torch-loop", "torch-loop-compiled"):
        if ref.num_layers != 1 or ref.bidirectional:
            raise Unavailable("the cell loop covers one layer in one direction")
        loop = CellLoop(ref)
        if provider == "torch-loop":
            return loop
        if not on_gpu:
            raise Unavailable("not run on the CPU: compiling the unrolled loop takes minutes there")
        return torch.compile(loop)
    if provider in ("flashrnn", "haste"):
        module = {"flashrnn": "flashrnn", "haste": "haste_pytorch"}[provider]
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed")
        raise Unavailable(f"{module} is installed, but its adapter is not written yet")
    raise ValueError(f"unknown provider {provider!r}")
