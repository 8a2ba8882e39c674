"""rnn_triton.convert / convert_back on whole models: classes change, parameters do not.

The converted model must compute what the torch.nn model computed (outputs and every gradient, float64,
through the kernels), keep the same Parameter objects (so an optimizer built before the conversion
trains on), and convert_back must give the exact torch.nn classes again.
"""
import copy

import pytest
import torch
from torch import nn

import rnn_triton
from rnn_triton import runtime

from helpers import TOLERANCE, rel_err

B, T, I = 3, 5, 4


def _launched(direction: str, counts=None) -> int:
    """Kernel launches of any variant in ``direction`` ("fwd" or "bwd"), now or in a saved copy."""
    counts = runtime.launches if counts is None else counts
    return sum(n for name, n in counts.items() if name.endswith("_" + direction))


class Net(nn.Module):
    """Every cell kind, batch-first and sequence-first, one layer and two bidirectional, a projection."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, 8, batch_first=True, proj_size=3)
        self.gru = nn.GRU(3, 6, num_layers=2, bidirectional=True)
        self.rnn = nn.RNN(12, 5, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):                            # x: (B, T, I)
        y, (h, c) = self.lstm(x)
        y, g = self.gru(y.transpose(0, 1))           # (T, B, 12)
        y, r = self.rnn(y.transpose(0, 1))           # (B, T, 5)
        return self.head(y), h, c, g, r


def _kinds(model):
    return [type(model.lstm), type(model.gru), type(model.rnn)]


def _run(model, x, out_grads=None):
    """Forward, then backward with ``out_grads`` (random when None); the outputs, input gradient and
    parameter gradients by name."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    outs = model(x)
    out_grads = out_grads or [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, out_grads)).backward()
    return outs, out_grads, x.grad, {n: p.grad for n, p in model.named_parameters()}


def test_convert_keeps_parameters_state_dict_and_results(seed):
    model = Net().double()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    state = model.state_dict()

    assert rnn_triton.convert(model) is model
    assert _kinds(model) == [rnn_triton.LSTM, rnn_triton.GRU, rnn_triton.RNN]
    assert type(model.head) is nn.Linear and type(model) is Net
    assert list(model.named_parameters()) == list(params.items())  # same names, order, objects
    assert all(model.get_parameter(n) is p for n, p in params.items())
    after = model.state_dict()
    assert list(after) == list(state)
    for k in state:
        assert after[k].data_ptr() == state[k].data_ptr() and torch.equal(after[k], state[k]), k
    # torch.nn's flat weight list (what its forward and flatten_parameters use) still points at them.
    assert all(a is b for a, b in zip(model.gru._flat_weights, model.gru.parameters()))

    x = torch.randn(B, T, I, dtype=torch.float64)
    before = dict(runtime.launches)
    outs, out_grads, x_grad, grads = _run(model, x)
    assert _launched("fwd") > _launched("fwd", before), "no forward kernel ran"
    assert _launched("bwd") > _launched("bwd", before), "no backward kernel ran"
    ref_outs, _, ref_x_grad, ref_grads = _run(ref, x, out_grads)

    bound = TOLERANCE[torch.float64]
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.shape == r.shape and rel_err(o, r) < bound, f"output {i} (seed {seed})"
    assert rel_err(x_grad, ref_x_grad) < bound, f"input gradient (seed {seed})"
    assert list(grads) == list(ref_grads)
    for name in grads:
        assert grads[name] is not None and rel_err(grads[name], ref_grads[name]) < bound, \
            f"grad of {name} (seed {seed})"


def test_optimizer_built_before_conversion_keeps_training(seed):
    """SGD with momentum, one step before converting and two after: its per-parameter state (the
    momentum buffers) is keyed by the Parameter objects themselves."""
    model = Net().double()
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)

    def step():
        x, target = torch.randn(B, T, I, dtype=torch.float64), torch.randn(B, T, 2, dtype=torch.float64)
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x)[0], target).backward()
            o.step()

    step()
    rnn_triton.convert(model)
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], model.parameters()))
    assert all(p in opt.state for p in model.parameters())
    before = _launched("fwd")
    step()
    step()
    assert _launched("fwd") > before
    for (name, p), q, p0 in zip(model.named_parameters(), twin.parameters(), initial.parameters()):
        assert not torch.equal(p, p0), f"{name} did not train"
        assert rel_err(p, q) < TOLERANCE[torch.float64], f"{name} after three steps (seed {seed})"


def test_root_module_hooks_and_training_flag_survive(seed):
    """``model`` itself an nn.GRU, in eval mode with a forward hook registered before converting."""
    gru = nn.GRU(I, 16, batch_first=True).double().eval()
    ref = copy.deepcopy(gru)
    calls = []
    gru.register_forward_hook(lambda module, args, out: calls.append(type(module)))

    assert rnn_triton.convert(gru) is gru and type(gru) is rnn_triton.GRU
    assert not gru.training
    x = torch.randn(B, T, I, dtype=torch.float64)
    before = _launched("fwd")
    with torch.no_grad():
        y, h = gru(x)
        y_ref, h_ref = ref(x)
    assert _launched("fwd") > before
    assert calls == [rnn_triton.GRU]
    assert rel_err(y, y_ref) < TOLERANCE[torch.float64] and rel_err(h, h_ref) < TOLERANCE[torch.float64]


def test_convert_back_restores_exact_torch_classes(seed):
    model = Net().double()
    params = list(model.parameters())
    rnn_triton.convert_back(rnn_triton.convert(model))
    assert _kinds(model) == [nn.LSTM, nn.GRU, nn.RNN]          # exactly, not a subclass of them
    after = list(model.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))

    x = torch.randn(B, T, I, dtype=torch.float64)
    before = dict(runtime.launches)
    with torch.no_grad():
        model(x)  # strict mode is on, yet nothing of ours runs: torch.nn's forward does
    assert runtime.launches == before

    lstm = rnn_triton.LSTM(I, 8)
    assert rnn_triton.convert_back(lstm) is lstm and type(lstm) is nn.LSTM


class MyLSTM(nn.LSTM):
    """A user's subclass that keeps torch.nn's forward (at module level: picklable)."""

    def extra(self):
        return "mine"


class MyGRU(nn.GRU):
    """A user's subclass with its own forward: convert must leave it alone."""

    def forward(self, input, hx=None):
        return super().forward(input * 2, hx)


def test_subclasses_and_shared_modules():
    """A user's subclass keeping torch.nn's forward is converted (its methods stay), one with its own
    forward is left alone with a ConversionWarning naming it; a subclass of ours is left as it is; the
    *Cell modules are converted; a module reachable twice is converted (once)."""

    class MyLSTMCell(nn.LSTMCell):
        pass

    class MyTritonLSTM(rnn_triton.LSTM):
        pass

    shared = nn.RNN(I, 4)
    model = nn.ModuleDict({"mine": MyLSTM(I, 8), "my_cell": MyLSTMCell(I, 8), "cell": nn.LSTMCell(I, 8),
                           "gru_cell": nn.GRUCell(I, 8), "rnn_cell": nn.RNNCell(I, 8), "a": shared,
                           "own_forward": MyGRU(I, 8),
                           "b": nn.Sequential(shared, nn.ModuleList([nn.LSTM(I, 8)]))})
    with pytest.warns(rnn_triton.ConversionWarning, match="own_forward: its class MyGRU overrides forward"):
        rnn_triton.convert(model)
    assert isinstance(model["mine"], MyLSTM) and type(model["mine"]) is not MyLSTM
    assert isinstance(model["mine"], rnn_triton.modules._TritonRecurrent) and model["mine"].extra() == "mine"
    assert isinstance(model["my_cell"], MyLSTMCell) and isinstance(model["my_cell"], rnn_triton.cells._TritonCell)
    assert type(model["own_forward"]) is MyGRU
    assert [type(model[k]) for k in ("cell", "gru_cell", "rnn_cell")] == \
        [rnn_triton.LSTMCell, rnn_triton.GRUCell, rnn_triton.RNNCell]
    assert type(shared) is rnn_triton.RNN and model["b"][0] is shared
    assert type(model["b"][1][0]) is rnn_triton.LSTM
    rnn_triton.convert_back(model)
    assert [type(model[k]) for k in ("cell", "gru_cell", "rnn_cell")] == [nn.LSTMCell, nn.GRUCell, nn.RNNCell]
    assert type(model["mine"]) is MyLSTM and type(model["my_cell"]) is MyLSTMCell

    ours = MyTritonLSTM(I, 8)
    assert type(rnn_triton.convert_back(ours)) is MyTritonLSTM
    assert type(rnn_triton.convert(ours)) is MyTritonLSTM

    with pytest.raises(TypeError, match="torch.nn.Module"):
        rnn_triton.convert({"lstm": nn.LSTM(I, 8)})


class Decoder(nn.Module):
    """Every cell kind, a few autoregressive steps: each step's output is the next step's input."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTMCell(I, 6)
        self.gru = nn.GRUCell(6, 5, bias=False)
        self.rnn = nn.RNNCell(5, I, nonlinearity="relu")

    def forward(self, x, steps=3):                   # x: (B, I)
        state, h, outs = None, None, []
        for _ in range(steps):
            state = self.lstm(x, state)
            h = self.gru(state[0], h)
            x = self.rnn(h)
            outs.append(x)
        return torch.stack(outs), state[1], h


def test_cells_convert_keeps_parameters_and_results(seed):
    model = Decoder().double()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    assert rnn_triton.convert(model) is model
    assert [type(model.lstm), type(model.gru), type(model.rnn)] == \
        [rnn_triton.LSTMCell, rnn_triton.GRUCell, rnn_triton.RNNCell]
    assert all(model.get_parameter(n) is p for n, p in params.items())

    x = torch.randn(B, I, dtype=torch.float64)
    before = dict(runtime.launches)
    outs, out_grads, x_grad, grads = _run(model, x)
    assert runtime.launches["cell_fwd"] - before.get("cell_fwd", 0) == 9, "not every step ran the kernel"
    assert runtime.launches["cell_bwd"] - before.get("cell_bwd", 0) == 9
    ref_outs, _, ref_x_grad, ref_grads = _run(ref, x, out_grads)
    bound = TOLERANCE[torch.float64]
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.shape == r.shape and rel_err(o, r) < bound, f"output {i} (seed {seed})"
    assert rel_err(x_grad, ref_x_grad) < bound, f"input gradient (seed {seed})"
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < bound, f"grad of {name} (seed {seed})"

    rnn_triton.convert_back(model)
    assert [type(model.lstm), type(model.gru), type(model.rnn)] == [nn.LSTMCell, nn.GRUCell, nn.RNNCell]
    assert all(model.get_parameter(n) is p for n, p in params.items())


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (rnn_triton.LSTM, nn.LSTM, {"num_layers": 2}), (rnn_triton.GRU, nn.GRU, {"num_layers": 2}),
    (rnn_triton.RNN, nn.RNN, {"num_layers": 2}), (rnn_triton.LSTMCell, nn.LSTMCell, {}),
    (rnn_triton.GRUCell, nn.GRUCell, {}), (rnn_triton.RNNCell, nn.RNNCell, {"nonlinearity": "relu"})])
def test_our_classes_add_no_state(ours, theirs, kwargs):
    """What makes changing ``__class__`` sound: an instance of ours holds exactly the attributes of
    torch.nn's. A class of ours that grows state of its own must make convert set it up."""
    assert sorted(vars(ours(I, 8, **kwargs))) == sorted(vars(theirs(I, 8, **kwargs)))
    assert all("__init__" not in vars(c) for c in ours.__mro__ if c.__module__.startswith("rnn_triton"))


def test_converted_subclass_computes_torch_nn_results_and_pickles(seed, capsys):
    """A converted user subclass runs the kernels with torch.nn's results, survives pickling and deepcopy
    as a converted module of the user's class, and ``verbose`` names what was converted."""
    import io
    import pickle

    model = nn.Sequential(MyLSTM(I, 6)).double()
    ref = copy.deepcopy(model)
    rnn_triton.convert(model, verbose=True)
    assert "0 (MyLSTM) converted" in capsys.readouterr().out
    x = torch.randn(T, B, I, dtype=torch.float64)
    before = dict(runtime.launches)
    y = model(x)[0]
    assert _launched("fwd") > _launched("fwd", before), "no forward kernel ran"
    assert rel_err(y, ref(x)[0]) < TOLERANCE[torch.float64]
    for again in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(again[0]) is type(model[0]) and again[0].extra() == "mine"
        assert rel_err(again(x)[0], y) < TOLERANCE[torch.float64]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)[0]) is type(model[0])
