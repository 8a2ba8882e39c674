"""PackedSequence in and out, against torch.nn in float64: variable lengths handled inside the kernel
(a row stops at its length, h_n is its last state, the reverse direction starts from its own end), in
the tile-persistent kernel and in the cooperative ones (stepwise in the interpreter)."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_triton
from rnn_triton import dispatch, runtime
from rnn_triton.dispatch import BLOCK_B, BLOCK_U, KernelConfig, Plan

import copy
from contextlib import nullcontext

from helpers import (DEVICE, HALF_TYPES, TOLERANCE, interpreter_only, kernel_launches, recorded_layer_outputs,
                     rel_err, relu_rnn_on_pattern, twin)

CELLS = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def _packed_case(cell, lengths, enforce_sorted, layers=1, bidirectional=False, with_state=False,
                 dtype=torch.float64, H=16, I=5, bias=True, variant=None, proj_size=0):
    """Our module and its float64 torch.nn twin on the same packed batch: the packed output (data,
    batch sizes, indices), h_n (c_n) and every gradient (input, initial states, every parameter).
    ``variant``: the kernels that must have run, forward and backward (else any)."""
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
    relu_half = cell == "RNN_RELU" and dtype in HALF_TYPES
    on_pattern = copy.deepcopy(ref) if relu_half else None
    runs = [(ours, DEVICE, dtype), (ref, "cpu", torch.float64)]
    if dtype in HALF_TYPES:  # torch.nn's own error in this dtype sets the bar, as in helpers.py
        runs.append((copy.deepcopy(ref).to(dtype), "cpu", dtype))
    for module, device, in_dtype in runs:
        xi = x.to(device, in_dtype).detach().clone().requires_grad_()
        hi = [s.to(device, in_dtype).detach().clone().requires_grad_() for s in states]
        packed = pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        hx = None if not hi else (tuple(hi) if cell == "LSTM" else hi[0])
        with recorded_layer_outputs() if relu_half and module is ours else nullcontext([]) as layer_outputs:
            y, h = module(packed, hx)
        if layer_outputs:
            patterns = [(o.cpu() > 0).double() for o in layer_outputs]  # padded, original row order
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
    if relu_half:
        # gradients against float64 on ReLU's on/off pattern as our forward computed it (why: see
        # helpers.compare_with_torch); the outputs still against torch.nn
        xi = x.double().requires_grad_()
        hi = [s.double().requires_grad_() for s in states]
        y, h = relu_rnn_on_pattern(on_pattern, xi, hi[0] if hi else None, patterns, lengths)
        y = pack_padded_sequence(y, torch.tensor(lengths), enforce_sorted=enforce_sorted).data
        sum((o * g).sum() for o, g in zip([y, h], grads)).backward()
        n_outs = len(results[1][0])
        want = want[:n_outs] + [xi.grad] + [s.grad for s in hi] + [p.grad for p in on_pattern.parameters()]
        bounds = bounds[:n_outs] + [TOLERANCE[dtype]] * (len(want) - n_outs)
    for i, (a, b, bound) in enumerate(zip(got, want, bounds)):
        assert a is not None and a.shape == b.shape, i
        assert rel_err(a, b) < bound, f"tensor {i}: {rel_err(a, b):.1e} >= {bound:.1e}"
    assert kernel_launches("fwd") > kernel_launches("fwd", before)
    assert kernel_launches("bwd") > kernel_launches("bwd", before)
    if variant is not None:
        for direction in ("fwd", "bwd"):
            name = f"{variant}_{direction}"
            assert runtime.launches[name] > before.get(name, 0), f"no {name} launch"


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


def test_packed_relu_in_bfloat16(seed):
    """ReLU in half precision, whose gradients are checked on our forward's on/off pattern with the
    rows' lengths (helpers.relu_rnn_on_pattern): two layers, both directions, unsorted."""
    _packed_case("RNN_RELU", [4, 9, 2, 9], False, layers=2, bidirectional=True, with_state=True,
                 dtype=torch.bfloat16)


def test_relu_on_pattern_reference_with_lengths(seed):
    """The on-pattern reference, given torch.nn's own float64 pattern, is torch.nn's packed ReLU RNN."""
    ref = torch.nn.RNN(5, 8, num_layers=2, bidirectional=True, nonlinearity="relu").double()
    lengths = [3, 6, 1, 6]
    x, h0 = torch.randn(6, 4, 5, dtype=torch.float64), torch.randn(4, 4, 8, dtype=torch.float64)
    outputs, layer_in = [], pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    for layer in range(2):  # torch's per-layer outputs give the pattern
        one = torch.nn.RNN(layer_in.data.shape[-1], 8, bidirectional=True, nonlinearity="relu").double()
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            for suffix in ("", "_reverse"):
                setattr(one, f"{name}_l0{suffix}", getattr(ref, f"{name}_l{layer}{suffix}"))
        layer_in, _ = one(layer_in, h0[2 * layer:2 * layer + 2])
        outputs.append(torch.nn.utils.rnn.pad_packed_sequence(layer_in)[0])
    y, hn = relu_rnn_on_pattern(ref, x, h0, [(o > 0).double() for o in outputs], lengths)
    want_y, want_hn = ref(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False), h0)
    packed_y = pack_padded_sequence(y, torch.tensor(lengths), enforce_sorted=False)
    assert rel_err(packed_y.data, want_y.data) < 1e-12 and rel_err(hn, want_hn) < 1e-12


def _cooperative_plan(monkeypatch, H, variant="stepwise", groups=1, w_chunk=0, fwd_chunk=0):
    """Make the modules run ``variant`` with BLOCK_U units per program, whatever size the dispatcher
    would choose for H."""
    config = KernelConfig(variant, BLOCK_B, dispatch.block_h_for(H), 8, BLOCK_U, groups, w_chunk, fwd_chunk)
    monkeypatch.setattr(dispatch, "choose", lambda *args, **kwargs: Plan(config))


#: 19 rows (two batch tiles, the second partial) of lengths 1 .. 4: ties, ones and full rows.
LENGTHS_19 = [4, 1, 3, 4, 2, 2, 4, 1, 3, 3, 4, 2, 1, 1, 4, 3, 2, 4, 4]


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_stepwise_float64(cell, enforce_sorted, monkeypatch, seed):
    """Packed input through the cooperative kernels (stepwise), both directions, with initial states:
    H = 136 takes 9 unit programs, the last partial; each row reads h_{t-1} of all units at its own
    t, and its backward starts (dLoss/dh_n enters) at its own first step."""
    _cooperative_plan(monkeypatch, 136)
    lengths = sorted(LENGTHS_19, reverse=True) if enforce_sorted else LENGTHS_19
    _packed_case(cell, lengths, enforce_sorted, bidirectional=True, with_state=True, H=136, variant="stepwise")


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
def test_packed_stepwise_weights_from_the_cache(cell, monkeypatch, seed):
    """The forward and backward that re-read W_hh and W_hh^T each step, 128 columns at a time (H = 300:
    two full chunks and a partial one), as float32 LSTM and GRU H = 1024 run them, with lengths."""
    _cooperative_plan(monkeypatch, 300, w_chunk=128, fwd_chunk=128)
    _packed_case(cell, [2, 3, 1, 3, 2], False, bidirectional=True, with_state=True, H=300, variant="stepwise")


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_cooperative_barrier_with_one_program_per_group(cell, groups, monkeypatch, seed):
    """The cooperative launch (one kernel, a barrier each step) with lengths, where the interpreter can
    run it: H = 16, one program per batch group. 35 rows make three batch tiles, so a group walks more
    than one; two layers, both directions, no initial state."""
    _cooperative_plan(monkeypatch, 16, "cooperative", groups)
    lengths = [i * 7 % 5 + 1 for i in range(35)]
    _packed_case(cell, lengths, False, layers=2, bidirectional=True, variant="cooperative")


@pytest.mark.parametrize("cell,H,dtype", [("LSTM", 192, torch.bfloat16), ("GRU", 256, torch.float16),
                                          ("RNN_RELU", 100, torch.float32)], ids=str)
def test_packed_beyond_the_tile_kernel(cell, H, dtype, seed):
    """The modules' own plan for packed input past the tile-persistent sizes: the cooperative kernels
    (stepwise in the interpreter), against torch.nn in float64."""
    packed = pack_padded_sequence(torch.randn(3, 2, 5, device=DEVICE, dtype=dtype), torch.tensor([3, 2]))
    plan = CELLS[cell][0](5, H, **CELLS[cell][2]).to(DEVICE, dtype).kernel_plan(packed)
    assert plan.uses_triton and plan.config.variant in ("stepwise", "cooperative"), plan
    _packed_case(cell, [3, 5, 1, 5, 4], False, with_state=True, dtype=dtype, H=H,
                 variant=plan.config.variant if DEVICE.type == "cpu" else None)


def test_packed_beyond_every_kernel_says_why():
    module = rnn_triton.RNN(4, 4096).to(DEVICE)  # past the cooperative kernel's float32 sizes
    packed = pack_padded_sequence(torch.randn(3, 2, 4, device=DEVICE), torch.tensor([3, 2]))
    plan = module.kernel_plan(packed)
    assert not plan.uses_triton and "limit" in plan.reason
    with pytest.raises(NotImplementedError, match="limit"):
        module(packed)


def test_packed_input_where_the_tile_build_with_lengths_spills_goes_cooperative(seed):
    """The float32 LSTM at BLOCK_H = 64 runs the tile kernel, but packed the cooperative one (its tile
    build with lengths spills: ``dispatch.PACKED_COOPERATIVE``): packed H = 50 matches torch.nn there."""
    assert ("LSTM", torch.float32, 64) in dispatch.PACKED_COOPERATIVE
    plan = dispatch.choose("LSTM", 50, torch.float32, DEVICE, 2, packed=True)
    assert plan.uses_triton and plan.config.variant in ("stepwise", "cooperative"), plan
    assert dispatch.choose("LSTM", 50, torch.float32, DEVICE, 2).config.variant == "tile-persistent"
    _packed_case("LSTM", [3, 5, 1], False, with_state=True, dtype=torch.float32, H=50,
                 variant=plan.config.variant if DEVICE.type == "cpu" else None)


def test_packed_plan_runs_the_tile_kernel():
    packed = pack_padded_sequence(torch.randn(3, 2, 4, device=DEVICE), torch.tensor([3, 2]))
    plan = rnn_triton.GRU(4, 32).to(DEVICE).kernel_plan(packed)
    assert plan.uses_triton and plan.config.variant == "tile-persistent"
