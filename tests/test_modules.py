"""rnn_triton.LSTM, GRU and RNN (tanh, relu) against torch.nn in float64: outputs, final states and
every gradient, through the Triton kernels (strict mode; each test checks a kernel launched)."""
import itertools

import pytest
import torch

import rnn_triton
from rnn_triton import dispatch, ops, runtime

from helpers import DEVICE, compare_with_torch, interpreter_only

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = list(itertools.product([16, 48, 64, 128], [1, 3, 16, 17], [1, 2, 37]))  # H, B, T

#: cell name (dispatch) -> (our module, torch.nn module, constructor extras)
CELLS = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def _supported(cell, H, dtype):
    return dispatch.choose(cell, H, dtype, DEVICE).uses_triton


def _make(cell, I, H, **kwargs):
    ours, _, extra = CELLS[cell]
    return ours(I, H, **extra, **kwargs)


def _case(cell, H, B, T, dtype, bias, batch_first, with_state, seed, I=None):
    I = I or max(1, H // 3 + 1)
    module = _make(cell, I, H, bias=bias, batch_first=batch_first).to(dtype)
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(T, B, I, dtype=torch.float64)
    hx = None
    if with_state:
        hx = torch.randn(1, B, H, dtype=torch.float64)
        hx = (hx, torch.randn(1, B, H, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(module, CELLS[cell][1], x, hx, seed)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("H,B,T", SIZES)
def test_sizes(cell, H, B, T, seed):
    """Every (H, B, T) of the grid, in the widest dtype the kernel takes at that H; bias, batch_first
    and initial state cycle through their values across the grid."""
    dtype = torch.float32 if _supported(cell, H, torch.float32) else torch.bfloat16
    i = SIZES.index((H, B, T))
    _case(cell, H, B, T, dtype, bias=i % 2 == 0, batch_first=(i // 2) % 2 == 0,
          with_state=(i // 4) % 2 == 0, seed=seed)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,batch_first,with_state", list(itertools.product([True, False], repeat=3)))
def test_flags(cell, dtype, bias, batch_first, with_state, seed):
    """Every combination of bias, batch_first and initial state in every dtype."""
    _case(cell, 48, 17, 37, dtype, bias, batch_first, with_state, seed)


@pytest.mark.parametrize("cell,dtype,H", [(c, d, h) for c in CELLS for d in DTYPES for h in [16, 48, 64, 128]
                                          if _supported(c, h, d)], ids=str)
def test_dtypes_per_hidden_size(cell, dtype, H, seed):
    """Every hidden size of the grid in every dtype whose kernel takes it (float32 stops at 64:
    test_unsupported_size_* covers what happens beyond)."""
    _case(cell, H, 3, 37, dtype, True, False, True, seed)


def _too_big(cell):
    """The smallest hidden size no kernel takes in float32 (float64 takes its sizes)."""
    return dispatch.max_hidden(cell, torch.float32) + 1


@pytest.mark.parametrize("cell", CELLS)
def test_unsupported_size_raises_in_strict_mode(cell):
    module = _make(cell, 8, _too_big(cell)).to(DEVICE)
    with pytest.raises(NotImplementedError, match=f"hidden_size={_too_big(cell)}"):
        module(torch.randn(5, 2, 8, device=DEVICE))


@pytest.mark.parametrize("cell", CELLS)
def test_unsupported_size_falls_back_to_torch(cell, monkeypatch, seed):
    monkeypatch.setenv("RNN_TRITON_STRICT", "0")
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    before = dict(runtime.launches)
    with pytest.warns(rnn_triton.FallbackWarning, match=f"hidden_size={_too_big(cell)}"):
        compare_with_torch(_make(cell, 8, _too_big(cell)), CELLS[cell][1], x, None, seed, expect_kernels=False)
    assert runtime.launches == before


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,bidirectional,batch_first,with_state,dtype", [
    (2, False, False, True, torch.float32), (1, True, True, True, torch.float32),
    (3, True, False, False, torch.float32), (2, True, True, True, torch.bfloat16)], ids=str)
def test_layers_and_directions(cell, layers, bidirectional, batch_first, with_state, dtype, seed):
    """num_layers and bidirectional: outputs concatenated as torch.nn does, h_n (c_n) in its order,
    every gradient (each layer's and direction's parameters included)."""
    H, B, T = 32, 3, 9
    module = _make(cell, 8, H, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn(B, T, 8, dtype=torch.float64) if batch_first else torch.randn(T, B, 8, dtype=torch.float64)
    hx = None
    if with_state:
        n = layers * (2 if bidirectional else 1)
        hx = torch.randn(n, B, H, dtype=torch.float64)
        hx = (hx, torch.randn(n, B, H, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(module.to(dtype), CELLS[cell][1], x, hx, seed)


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_between_layers(cell, seed):
    """Masks cannot match torch's RNG: dropout=1 (deterministic) shows where dropout sits (between
    layers, never after the last); p=0.5 matches torch in eval mode and is random in training."""
    ours = _make(cell, 8, 16, num_layers=3, dropout=1.0).to(DEVICE)
    compare_with_torch(ours, CELLS[cell][1], torch.randn(6, 2, 8, dtype=torch.float64), None, seed)
    ours = _make(cell, 8, 16, num_layers=2, dropout=0.5).to(DEVICE).eval()
    compare_with_torch(ours, CELLS[cell][1], torch.randn(6, 2, 8, dtype=torch.float64), None, seed)
    ours.train()
    x = torch.randn(6, 2, 8, device=DEVICE)
    a, b, evaluated = ours(x)[0], ours(x)[0], ours.eval()(x)[0]
    assert not torch.equal(a, b) and not torch.equal(a, evaluated) and torch.isfinite(a).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layers,bidirectional,batch_first,P", [(1, False, False, 5), (2, True, True, 15)])
def test_lstm_projection(dtype, layers, bidirectional, batch_first, P, seed):
    """proj_size > 0: h = W_hr (o * tanh(c)), h_n of width P, c_n of width H, every gradient (W_hr's
    too); the initial h enters the first step through W_hh, in both directions."""
    if dtype == torch.float64 and DEVICE.type != "cpu":
        pytest.skip("float64 kernels run only in the interpreter")
    H, I, B, T = 16, 6, 3, 5
    module = rnn_triton.LSTM(I, H, proj_size=P, num_layers=layers, bidirectional=bidirectional,
                             batch_first=batch_first).to(dtype)
    n = layers * (2 if bidirectional else 1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    for hx in (None, (torch.randn(n, B, P, dtype=torch.float64), torch.randn(n, B, H, dtype=torch.float64))):
        outs = compare_with_torch(module, torch.nn.LSTM, x, hx, seed)
        assert outs[0].shape[-1] == P * (2 if bidirectional else 1) and outs[1].shape[-1] == P
        assert outs[2].shape[-1] == H


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_layer_is_one_launch(cell):
    """Both directions of a layer run concurrently: one forward and one backward launch per layer."""
    module = _make(cell, 4, 16, num_layers=2, bidirectional=True).to(DEVICE)
    before = dict(runtime.launches)
    module(torch.randn(5, 3, 4, device=DEVICE, requires_grad=True))[0].sum().backward()
    assert runtime.launches["persistent_fwd"] - before.get("persistent_fwd", 0) == 2
    assert runtime.launches["persistent_bwd"] - before.get("persistent_bwd", 0) == 2


def test_padded_units_pads_every_block():
    """Each block of 3 units (a gate's or a direction's) followed by zeros up to 4, along any dim."""
    t = torch.arange(12.0).view(6, 2)
    assert ops.padded_units(t, 3, 4, 0).tolist() == [[0, 1], [2, 3], [4, 5], [0, 0], [6, 7], [8, 9],
                                                     [10, 11], [0, 0]]
    assert ops.padded_units(t.T, 3, 4).tolist() == ops.padded_units(t, 3, 4, 0).T.tolist()


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_RELU"])
def test_h_not_a_multiple_of_16_runs_padded_to_one(cell, seed, monkeypatch):
    """H = 20 in two directions: the kernels get H = 32, each gate's and direction's units padded with
    zero ones (ops.padded_units); outputs, final states and every gradient are torch.nn's (float64)."""
    seen = []
    original = ops.recurrent_fwd

    def recording(xp, w_hh, *args):
        seen.append((xp.shape[-1], tuple(w_hh.shape)))
        return original(xp, w_hh, *args)

    monkeypatch.setattr(ops, "recurrent_fwd", recording)
    ours, theirs, extra = CELLS[cell]
    G = dispatch.CELLS[cell].num_gates
    hx = torch.randn(2, 3, 20, dtype=torch.float64)
    hx = (hx, torch.randn(2, 3, 20, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(ours(5, 20, bidirectional=True, **extra).to(torch.float32), theirs,
                       torch.randn(4, 3, 5, dtype=torch.float64), hx, seed)
    assert seen and all(shapes == (2 * G * 32, (2 * G * 32, 32)) for shapes in seen), seen


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_state", [True, False])
def test_gradcheck_float64(cell, with_state):
    """torch.autograd.gradcheck through the kernels (the interpreter runs them in float64), in its fast
    mode: a random vector-Jacobian-vector product against finite differences (the full Jacobian took
    ~15 minutes of CI; every gradient is also compared with torch.nn's to 1e-10, compare_with_torch)."""
    T, B, I, H = 3, 2, 3, 16
    G = dispatch.CELLS[cell].num_gates
    config = dispatch.choose(cell, H, torch.float64, torch.device("cpu")).config
    shapes = [(T, B, I), (G * H, I), (G * H, H), (G * H,), (G * H,)]
    if with_state:
        shapes += [(B, H), (B, H)] if cell == "LSTM" else [(B, H)]
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]

    def layer(x, w_ih, w_hh, b_ih, b_hh, h0=None, c0=None):
        y, hn, cn = ops.recurrent_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, config, False)
        return (y, hn) if cn is None else (y, hn, cn)

    assert torch.autograd.gradcheck(layer, args, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_input(cell, seed):
    x = torch.randn(7, 5, dtype=torch.float64)
    hx = torch.randn(1, 16, dtype=torch.float64)
    hx = (hx, torch.randn(1, 16, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(_make(cell, 5, 16), CELLS[cell][1], x, hx, seed)


@pytest.mark.parametrize("cell", CELLS)
def test_module_is_its_torch_class_with_the_same_state_dict(cell):
    ours, ref_cls, extra = CELLS[cell]
    ours, ref = ours(6, 16, bias=False, **extra), ref_cls(6, 16, bias=False, **extra)
    assert isinstance(ours, ref_cls)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())


def test_kernel_plan_says_what_runs():
    lstm = rnn_triton.LSTM(4, 48)
    plan = lstm.kernel_plan(torch.randn(3, 2, 4))
    assert plan.uses_triton and plan.config.variant == "tile-persistent" and plan.config.block_h == 64
    plan = rnn_triton.LSTM(4, 48, proj_size=8).kernel_plan(torch.randn(3, 2, 4))
    assert plan.uses_triton and plan.config.block_h == 64  # the loop runs on the H-wide o * tanh(c)
    plan = rnn_triton.LSTM(4, 4000).kernel_plan(torch.randn(3, 2, 4))
    assert not plan.uses_triton and "limit" in plan.reason


@pytest.mark.parametrize("cell", CELLS)
def test_gradient_of_a_plain_sum(cell):
    """loss = y.sum() hands backward an expanded (stride 0) gradient: it must be read as such."""
    ours = _make(cell, 5, 16).to(DEVICE)
    ref = CELLS[cell][1](5, 16, **CELLS[cell][2]).double()
    ref.load_state_dict({k: v.cpu().double() for k, v in ours.state_dict().items()})
    x = torch.randn(6, 3, 5)
    ours(x.to(DEVICE))[0].sum().backward()
    ref(x.double())[0].sum().backward()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert ((p.grad.cpu().double() - q.grad).norm() / q.grad.norm()) < 1e-4
