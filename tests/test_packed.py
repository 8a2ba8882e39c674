"""PackedSequence in and out, against torch.nn in float64: variable lengths handled inside the kernel
(a row stops at its length, h_n is its last state, the reverse direction starts from its own end)."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_triton
from rnn_triton import runtime

import copy

from helpers import DEVICE, HALF_TYPES, RELU_HALF_GRAD_TOLERANCE, TOLERANCE, kernel_launches, rel_err, twin

CELLS = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def _packed_case(cell, lengths, enforce_sorted, layers=1, bidirectional=False, with_state=False,
                 dtype=torch.float64, H=16, I=5, bias=True, proj_size=0):
    """Our module and its float64 torch.nn twin on the same packed batch: the packed output (data,
    batch sizes, indices), h_n (c_n) and every gradient (input, initial states, every parameter)."""
    extra = dict(CELLS[cell][2], **({"proj_size": proj_size} if proj_size else {}))
    ours = CELLS[cell][0](I, H, num_layers=layers, bidirectional=bidirectional, bias=bias, **extra).to(dtype)
    ref = twin(ours, CELLS[cell][1])
    ours.to(DEVICE)
    T, B = max(lengths), len(lengths)
    x = torch.randn(T, B, I, dtype=torch.float64).to(dtype)
    states = []
    if with_state:
        n = layers * (2 if bidirectional else 1)
        widths = [proj_size or H, H] if cell == "LSTM" else [H]
        states = [torch.randn(n, B, w, dtype=torch.float64).to(dtype) for w in widths]
    results = []
    before = dict(runtime.launches)
    runs = [(ours, DEVICE, dtype), (ref, "cpu", torch.float64)]
    if dtype in HALF_TYPES:  # torch.nn's own error in this dtype sets the bar, as in helpers.py
        runs.append((copy.deepcopy(ref).to(dtype), "cpu", dtype))
    for module, device, in_dtype in runs:
        xi = x.to(device, in_dtype).detach().clone().requires_grad_()
        hi = [s.to(device, in_dtype).detach().clone().requires_grad_() for s in states]
        packed = pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        hx = None if not hi else (tuple(hi) if cell == "LSTM" else hi[0])
        y, h = module(packed, hx)
        assert isinstance(y, PackedSequence)
        assert torch.equal(y.batch_sizes, packed.batch_sizes)
        for a, b in ((y.sorted_indices, packed.sorted_indices), (y.unsorted_indices, packed.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        outs = [y.data] + (list(h) if cell == "LSTM" else [h])
        results.append((outs, xi, hi, module))
    grads = [torch.randn_like(o, dtype=torch.float64) for o in results[1][0]]
    for outs, *_ in results:
        sum((o.double().cpu() * g).sum() for o, g in zip(outs, grads)).backward()
    got, want, *low = [outs + [x.grad] + [s.grad for s in hs] + [p.grad for p in m.parameters()]
                       for outs, x, hs, m in results]
    bounds = [TOLERANCE[dtype]] * len(got)
    if low:
        bounds = [max(b, 2 * rel_err(t, w)) for b, t, w in zip(bounds, low[0], want)]
        if cell == "RNN_RELU":  # see RELU_HALF_GRAD_TOLERANCE
            n_out = len(results[0][0])
            bounds = bounds[:n_out] + [max(b, RELU_HALF_GRAD_TOLERANCE) for b in bounds[n_out:]]
    for i, (a, b, bound) in enumerate(zip(got, want, bounds)):
        assert a is not None and a.shape == b.shape, i
        assert rel_err(a, b) < bound, f"tensor {i}: {rel_err(a, b):.1e} >= {bound:.1e}"
    assert kernel_launches("fwd") > kernel_launches("fwd", before)
    assert kernel_launches("bwd") > kernel_launches("bwd", before)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences(cell, enforce_sorted, seed):
    lengths = [7, 5, 5, 2, 1] if enforce_sorted else [2, 7, 1, 5, 5]  # ties, a length 1, one full row
    _packed_case(cell, lengths, enforce_sorted, with_state=enforce_sorted)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_layers_and_directions(cell, seed):
    """Two layers, both directions: the reverse direction starts at each row's own last element."""
    _packed_case(cell, [3, 6, 1, 6], False, layers=2, bidirectional=True, with_state=True)


def test_packed_projected_lstm(seed):
    """proj_size with lengths: the initial h enters at each row's own first step in both directions."""
    _packed_case("LSTM", [3, 6, 1, 6], False, layers=2, bidirectional=True, with_state=True, proj_size=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_lower_precision(dtype, seed):
    _packed_case("LSTM", [4, 9, 2], False, bidirectional=True, with_state=True, dtype=dtype)


def test_packed_beyond_the_tile_kernel_says_why():
    module = rnn_triton.RNN(4, 300).to(DEVICE)  # float32 H = 300 runs cooperatively
    packed = pack_padded_sequence(torch.randn(3, 2, 4, device=DEVICE), torch.tensor([3, 2]))
    plan = module.kernel_plan(packed)
    assert not plan.uses_triton and "PackedSequence" in plan.reason
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        module(packed)


def test_packed_plan_runs_the_tile_kernel():
    packed = pack_padded_sequence(torch.randn(3, 2, 4, device=DEVICE), torch.tensor([3, 2]))
    plan = rnn_triton.GRU(4, 32).to(DEVICE).kernel_plan(packed)
    assert plan.uses_triton and plan.config.variant == "tile-persistent"
