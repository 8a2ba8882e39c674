"""Gradients of gradients (``create_graph=True``) through the modules and the cells, in float64.

The first-order forward and backward run the kernels (each test checks they launched, and that the
first-order gradients are the very values a plain backward gives); the second-order pass
differentiates torch's recomputation of the same recurrence (``rnn_triton.reference``). Checked with
``gradgradcheck`` and against torch.nn's own second derivatives.
"""
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from rnn_triton import runtime

from helpers import interpreter_only, kernel_launches, rel_err, twin
from test_cells import CELLS as CELL_MODULES
from test_modules import CELLS, _make

pytestmark = interpreter_only  # float64 through the kernels: the interpreter only

F64 = torch.float64
#: float64 against float64: both are exact to rounding (torch.nn's loop and ours sum in other orders).
BOUND = 1e-10


def _states(cell, n, B, H, P=None):
    """Random initial states [n, B, H] (LSTM: h of width P when projecting, and c), requiring grad."""
    widths = [P or H, H] if cell == "LSTM" else [H]
    return [torch.randn(n, B, w, dtype=F64, requires_grad=True) for w in widths]


def _hx(cell, states):
    return None if not states else (tuple(states) if cell == "LSTM" else states[0])


def _outputs(cell, out):
    """A module's or cell's outputs as a flat list of tensors (packed output: its data)."""
    y, h = out
    y = getattr(y, "data", y)
    return [y] + (list(h) if cell == "LSTM" else [h])


def _launched(before):
    assert kernel_launches("fwd") > kernel_launches("fwd", before), "no forward kernel ran"
    assert kernel_launches("bwd") > kernel_launches("bwd", before), "no backward kernel ran"


def _second_order(cell, ours, make_input, states, seed, call=lambda module, x, hx: module(x, hx)):
    """Gradients of the outputs (weighted by random v) w.r.t. the input, the states and every parameter,
    with create_graph=True; then a random combination of those gradients as the loss, backward. Ours
    and torch.nn's twin (same weights, same numbers): every first- and second-order gradient agrees.
    Ours: the first-order gradients equal those of a plain backward bit for bit (the kernels' values).
    ``make_input()``: (what the module takes, the leaf tensor behind it); ``call``: how to run it."""
    ref = twin(ours, CELLS[cell][1])
    results = []
    before = dict(runtime.launches)
    for module in (ours, ref):
        x = make_input()
        sts = [s.detach().clone().requires_grad_() for s in states]
        outs = _outputs(cell, call(module, x[0], _hx(cell, sts)))
        if module is ours:
            vs = [torch.randn_like(o) for o in outs]
        wrt = [x[1]] + sts + list(module.parameters())
        loss = sum((o * v).sum() for o, v in zip(outs, vs))
        grads = torch.autograd.grad(loss, wrt, create_graph=True)
        if module is ours:
            plain = torch.autograd.grad(loss, wrt, retain_graph=True)
            assert all(torch.equal(g, p) for g, p in zip(grads, plain)), "create_graph changed the values"
            ws = [torch.randn_like(g) for g in grads]
        sum((g * w).sum() for g, w in zip(grads, ws)).backward()
        results.append((grads, [t.grad for t in wrt]))
    _launched(before)
    names = ["input"] + [f"state {i}" for i in range(len(states))] + [n for n, _ in ours.named_parameters()]
    for kind, got, want in (("first", results[0][0], results[1][0]), ("second", results[0][1], results[1][1])):
        for name, g, w in zip(names, got, want):
            assert g is not None and w is not None, f"{kind}-order gradient of {name} missing"
            err = rel_err(g, w)
            assert err < BOUND, f"{kind}-order gradient of {name}: rel err {err:.1e} (seed {seed})"


def _padded(T, B, I, batch_first=False):
    """``make_input`` for a random padded batch: the leaf is what the module takes."""
    x = torch.randn(*((B, T) if batch_first else (T, B)), I, dtype=F64)

    def make_input():
        leaf = x.clone().requires_grad_()
        return leaf, leaf

    return make_input


# 1. gradgradcheck: modules (input, states and every parameter) and cells. --------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_gradgradcheck_module(cell, seed):
    """T=3, B=2, H=4, I=3, with initial states. ``fast_mode`` (a random projection of the Jacobian of the
    gradient), which lets all 100-odd parameters be inputs within seconds; the exact comparisons with
    torch.nn below check every entry."""
    module = _make(cell, 3, 4).double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    states = _states(cell, 1, 2, 4)

    def f(x, *rest):
        sts, ps = rest[:len(states)], rest[len(states):]
        return tuple(_outputs(cell, functional_call(module, dict(zip(names, ps)), (x, _hx(cell, list(sts))))))

    before = dict(runtime.launches)
    assert torch.autograd.gradgradcheck(f, (x, *states, *params), fast_mode=True), f"seed {seed}"
    _launched(before)


@pytest.mark.parametrize("cell", CELL_MODULES)
@pytest.mark.parametrize("with_state", [True, False])
def test_gradgradcheck_cell(cell, with_state, seed):
    """H=4, I=3: every entry for the input and the state of one batch row (parameters held), then
    ``fast_mode`` with two rows and every parameter as an input too."""
    ours_cls, _, extra = CELL_MODULES[cell]
    module = ours_cls(3, 4, **extra).double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    states = [torch.randn(2, 4, dtype=F64, requires_grad=True) for _ in range(2 if cell == "LSTM" else 1)] \
        if with_state else []
    row = [t[:1].detach().requires_grad_() for t in [x] + states]

    def f(x, *rest):
        sts, ps = rest[:len(states)], rest[len(states):] or params
        out = functional_call(module, dict(zip(names, ps)), (x, _hx(cell, list(sts))))
        return tuple(out) if cell == "LSTM" else out

    before = dict(runtime.launches)
    assert torch.autograd.gradgradcheck(f, tuple(row)), f"seed {seed}"
    assert torch.autograd.gradgradcheck(f, (x, *states, *params), fast_mode=True), f"seed {seed}"
    assert runtime.launches["cell_fwd"] > before.get("cell_fwd", 0)
    assert runtime.launches["cell_bwd"] > before.get("cell_bwd", 0)


# 2. Second derivatives against torch.nn's: every path the kernels serve. -----------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_two_layers_bidirectional_batch_first(cell, seed):
    module = _make(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    _second_order(cell, module, _padded(3, 2, 3, batch_first=True), _states(cell, 4, 2, 4), seed)


@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_between_calls(cell, seed):
    """A second call starts from the first one's final state (truncated backpropagation through time):
    the second op's state input is the first op's output, computed from the same weights."""
    module = _make(cell, 3, 4).double()
    _second_order(cell, module, _padded(6, 2, 3), _states(cell, 1, 2, 4), seed,
                  call=lambda m, x, hx: m(x[3:], m(x[:3], hx)[1]))


@pytest.mark.parametrize("cell", ["GRU", "RNN_RELU"])
def test_without_bias_or_state(cell, seed):
    _second_order(cell, _make(cell, 3, 4, bias=False).double(), _padded(4, 3, 3), [], seed)


def test_cooperative_size(seed):
    """H = 80: past the tile kernel's float32 (and so float64) sizes, the cooperative kernels (stepwise
    in the interpreter)."""
    module = _make("RNN_TANH", 3, 80, bidirectional=True).double()
    assert module.kernel_plan(torch.randn(3, 2, 3, dtype=F64)).config.variant == "stepwise"
    _second_order("RNN_TANH", module, _padded(3, 2, 3), _states("RNN_TANH", 2, 2, 80), seed)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_sequence(cell, seed):
    """Variable lengths, unsorted, two layers, both directions: the reverse direction starts at each
    row's own end."""
    module = _make(cell, 3, 4, num_layers=2, bidirectional=True).double()
    lengths = torch.tensor([2, 4, 1])
    x = torch.randn(4, 3, 3, dtype=F64)

    def make_input():
        leaf = x.clone().requires_grad_()
        return pack_padded_sequence(leaf, lengths, enforce_sorted=False), leaf

    _second_order(cell, module, make_input, _states(cell, 4, 3, 4), seed)


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_proj_size(packed, seed):
    module = _make("LSTM", 3, 5, proj_size=2, bidirectional=True).double()
    x = torch.randn(4, 3, 3, dtype=F64)

    def make_input():
        leaf = x.clone().requires_grad_()
        return (pack_padded_sequence(leaf, torch.tensor([4, 2, 3]), enforce_sorted=False) if packed else leaf), leaf

    _second_order("LSTM", module, make_input, _states("LSTM", 2, 3, 5, P=2), seed)


def test_wgan_gp_gradient_penalty(seed):
    """A recurrent critic: a 2-layer bidirectional LSTM and a linear head. Loss = critic(x) + 10 *
    (||d critic(x) / dx|| - 1)^2 per sample, as WGAN-GP; its backward needs the gradient of the input
    gradient w.r.t. every parameter. Ours and torch.nn's parameter gradients agree."""
    T, B, I, H = 5, 3, 4, 6
    lstm = _make("LSTM", I, H, num_layers=2, bidirectional=True, batch_first=True).double()
    head = torch.nn.Linear(2 * H, 1).double()
    x = torch.randn(B, T, I, dtype=F64)
    results = []
    before = dict(runtime.launches)
    for rnn in (lstm, twin(lstm, torch.nn.LSTM)):
        head.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = rnn(xi)
        critic = head(y[:, -1]).squeeze(-1)
        (dx,) = torch.autograd.grad(critic.sum(), xi, create_graph=True)
        penalty = (dx.flatten(1).norm(dim=1) - 1).square()
        (critic + 10 * penalty).mean().backward()
        results.append([p.grad.clone() for p in rnn.parameters()] + [p.grad.clone() for p in head.parameters()])
    _launched(before)
    names = [n for n, _ in lstm.named_parameters()] + ["head.weight", "head.bias"]
    for name, got, want in zip(names, *results):
        assert rel_err(got, want) < BOUND, f"{name}: rel err {rel_err(got, want):.1e} (seed {seed})"


@pytest.mark.parametrize("cell", CELL_MODULES)
def test_cells_against_torch(cell, seed):
    """Three decoding steps of a cell, each fed the last output; second derivatives of every parameter."""
    ours_cls, ref_cls, extra = CELL_MODULES[cell]
    ours = ours_cls(4, 4, **extra).double()
    ref = ref_cls(4, 4, **extra).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, dtype=F64)
    results = []
    before = dict(runtime.launches)
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        h, state = xi, None
        for _ in range(3):
            state = module(h, state)
            h = state[0] if cell == "LSTM" else state
        wrt = [xi] + list(module.parameters())
        grads = torch.autograd.grad(h.sin().sum(), wrt, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        results.append(list(grads) + [p.grad for p in module.parameters()])
    assert runtime.launches["cell_fwd"] >= before.get("cell_fwd", 0) + 3
    assert runtime.launches["cell_bwd"] >= before.get("cell_bwd", 0) + 3
    for i, (got, want) in enumerate(zip(*results)):
        assert rel_err(got, want) < BOUND, f"gradient {i}: rel err {rel_err(got, want):.1e} (seed {seed})"


def test_kernel_plan_says_what_runs_for_second_order():
    for module, x in ((_make("GRU", 3, 4), torch.randn(2, 3, 3)), (CELL_MODULES["LSTM"][0](3, 4), torch.randn(2, 3))):
        plan = module.kernel_plan(x)
        assert plan.uses_triton and "rnn_triton.reference" in plan.second_order
    refused = _make("LSTM", 3, 1025).kernel_plan(torch.randn(2, 3, 3))  # above every kernel's limit
    assert not refused.uses_triton and "torch.nn's own" in refused.second_order


def test_under_torch_compile(seed):
    """A model compiled whole (fullgraph=True: our ops do not break the graph), then a gradient penalty
    through it: the same second-order gradients as eager. (backend="eager": AOTAutograd's compiled
    backward refuses any double backward, torch.nn's modules' too, so it is left out.)"""
    torch._dynamo.reset()
    module = _make("GRU", 3, 4, num_layers=2).double()
    x = torch.randn(4, 2, 3, dtype=F64)
    results = []
    before = dict(runtime.launches)
    for run in (torch.compile(module, fullgraph=True, backend="eager"), module):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y, h = run(xi)
        (dx,) = torch.autograd.grad((y.sin().sum() + h.sum()), xi, create_graph=True)
        dx.square().sum().backward()
        results.append([p.grad.clone() for p in module.parameters()])
    _launched(before)
    for got, want in zip(*results):
        assert rel_err(got, want) < BOUND, f"seed {seed}"


def test_third_order(seed):
    """Any order works (the recomputation is plain torch): a third derivative, against torch.nn's."""
    ours = _make("LSTM", 3, 4).double()
    x = torch.randn(3, 2, 3, dtype=F64)
    results = []
    before = dict(runtime.launches)
    for module in (ours, twin(ours, torch.nn.LSTM)):
        xi = x.clone().requires_grad_()
        y, _ = module(xi)
        (g,) = torch.autograd.grad(y.sin().sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), xi, create_graph=True)
        results.append(torch.autograd.grad(gg.sum(), list(module.parameters())))
    _launched(before)
    for got, want in zip(*results):
        assert rel_err(got, want) < BOUND, f"seed {seed}"
