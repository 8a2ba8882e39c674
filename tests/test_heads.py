"""Heads (block-diagonal recurrences) and the sLSTM: ``rnn_triton.flashrnn`` and the multi-head modules
against a plain PyTorch loop written here, and against FlashRNN's own ``vanilla`` backend where the
``flashrnn`` package is installed. float64 in the interpreter, fresh random inputs every run; every
output, final state and gradient; strict mode and the launch counter prove the kernels ran."""
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_triton
from rnn_triton import dispatch, runtime
from rnn_triton.flashrnn import FUNCTIONS, flashrnn

from helpers import DEVICE, HALF_TYPES, TOLERANCE, interpreter_only, kernel_launches, rel_err

CELL_OF = {"lstm": "LSTM", "gru": "GRU", "elman": "RNN_TANH", "slstm": "SLSTM"}


def plain_step(function, a, rh, b_hn, state):
    """One step of each cell, written from the equations. a: the input part of the gates [B, G, NH, DH]
    (biases in, gate order per ``function`` in FlashRNN's Wx layout); rh: R h per gate, [B, G_R, NH, DH]
    in FlashRNN's R order; state: the list of states [B, NH, DH]. Returns the new states."""
    if function == "lstm":
        i, f, z, o = (a + rh).unbind(1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(z)
        return [torch.sigmoid(o) * torch.tanh(c), c]
    if function == "gru":  # Wx: r, z, n; R: n, r, z; b_hn: R's n part
        r = torch.sigmoid(a[:, 0] + rh[:, 1])
        z = torch.sigmoid(a[:, 1] + rh[:, 2])
        n = torch.tanh(a[:, 2] + r * (rh[:, 0] + b_hn))
        return [z * state[0] + (1 - z) * n]
    if function == "elman":
        return [torch.tanh(a[:, 0] + rh[:, 0])]
    i, f, z, o = (a + rh).unbind(1)  # slstm
    _, c, n, m = state
    logf_m = m + torch.nn.functional.logsigmoid(f)
    m_new = torch.where(n == 0, i, torch.maximum(i, logf_m))
    ig, fg = torch.exp(i - m_new), torch.exp(logf_m - m_new)
    c_new = fg * c + ig * torch.tanh(z)
    n_new = torch.maximum(fg * n + ig, torch.ones_like(n))
    return [torch.sigmoid(o) * c_new / n_new, c_new, n_new, m_new]


def plain_flashrnn(Wx, R, b, states, function):
    """FlashRNN's function as a loop over the steps: (states over time [S, B, T, NH, DH], final [S, B, 1,
    NH, DH])."""
    B, T, _, NH, DH = Wx.shape
    S = FUNCTIONS[function][4]
    state = [Wx.new_zeros(B, NH, DH) for _ in range(S)] if states is None else list(states[:, :, 0].unbind(0))
    if function == "gru":
        a_all, b_hn = Wx + b[1:][None, None], b[0]
    else:
        a_all, b_hn = Wx + b[None, None], None
    over_time = []
    for t in range(T):
        rh = torch.einsum("gjuv,bjv->bgju", R, state[0])
        state = plain_step(function, a_all[:, t], rh, b_hn, state)
        over_time.append(torch.stack(state))
    return torch.stack(over_time, 2), torch.stack(state)[:, :, None]


def _inputs(function, B, T, NH, DH, dtype, with_states):
    _, G, G_R, G_B, S = FUNCTIONS[function]
    t = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    states = None
    if with_states:
        states = t(S, B, 1, NH, DH)
        if function == "slstm":  # n: a normaliser, at least 1 once a state has seen a step
            states[2] = states[2].abs() + 1
    tensors = [t(B, T, G, NH, DH), t(G_R, NH, DH, DH) / DH ** 0.5, t(G_B, NH, DH), states]
    ref = [None if x is None else x.requires_grad_() for x in tensors]
    ours = [None if x is None else x.detach().to(DEVICE, dtype).requires_grad_() for x in tensors]
    return ours, ref


def _compare(outs, ref_outs, ins, ref_ins, dtype, low=None, h_only=False):
    """Every output and every gradient (for one random weighting of the outputs; ``h_only``: of h's
    alone) within the dtype's tolerance, or (``low``: the same computation by torch in ``dtype``, as
    (outputs, inputs)) within twice torch's own error in that dtype, where that is larger
    (tests/helpers.py's rule)."""
    weights = [torch.randn_like(o, dtype=torch.float64) for o in ref_outs]
    if h_only:
        for w in weights:
            w[1:] = 0

    def values(outs, ins):
        grads = torch.autograd.grad(sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights)),
                                    [x for x in ins if x is not None])
        return list(outs) + list(grads)

    got_all, want_all = values(outs, ins), values(ref_outs, ref_ins)
    torch_errors = [rel_err(t, w) for t, w in zip(values(*low), want_all)] if low else [0.0] * len(want_all)
    for name, got, want, torch_error in zip(["states over time", "final states", "Wx", "R", "b", "states"],
                                            got_all, want_all, torch_errors):
        tol = max(TOLERANCE[dtype], 2 * torch_error)
        assert got.shape == want.shape, name
        assert rel_err(got, want) < tol, f"{name}: relative error {rel_err(got, want):.2e} (tolerance {tol:.1e})"


@interpreter_only
@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("NH,DH,with_states", [(1, 16, True), (3, 12, False), (2, 20, True), (4, 8, True)])
def test_flashrnn_matches_a_plain_loop(function, NH, DH, with_states, seed):
    """Head sizes not powers of two (12, 20) and not multiples of 16 run padded (ops.padded_units)."""
    ours, ref = _inputs(function, 3, 5, NH, DH, torch.float64, with_states)
    before = dict(runtime.launches)
    outs = flashrnn(*ours, function=function)
    _compare(outs, plain_flashrnn(*ref, function), ours, ref, torch.float64)
    assert kernel_launches("fwd") > kernel_launches("fwd", before), "no forward kernel ran"
    assert kernel_launches("bwd") > kernel_launches("bwd", before), "no backward kernel ran"


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES])
def test_flashrnn_in_storage_dtypes(function, dtype, seed):
    """Against float64 from the same rounded inputs. The sLSTM in half precision: the gradients of a
    loss on h (what xLSTM trains); a loss on the states c, n, m at every step is ill-conditioned there
    (the stabiliser m is a log scale, and the max that picks it flips with rounding: torch's own loop in
    bfloat16 is then up to 40% off float64), so that is checked in float32 and float64."""
    ours, ref = _inputs(function, 4, 6, 2, 16, dtype, True)
    ref = [None if x is None else x.detach().to(dtype).double().requires_grad_() for x in ref]
    low = None
    if dtype in HALF_TYPES:
        low_ins = [None if x is None else x.detach().to(dtype).requires_grad_() for x in ref]
        low = (plain_flashrnn(*low_ins, function), low_ins)
    _compare(flashrnn(*ours, function=function), plain_flashrnn(*ref, function), ours, ref, dtype, low,
             h_only=function == "slstm" and dtype in HALF_TYPES)


@interpreter_only
@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_flashrnn_matches_flashrnn_vanilla(function, seed):
    """FlashRNN's own pure-PyTorch backend, where the package is installed (a test-only dependency)."""
    theirs = pytest.importorskip("flashrnn", reason="the flashrnn package (FlashRNN's vanilla backend) is "
                                 "not installed").flashrnn
    ours, ref = _inputs(function, 3, 7, 3, 24, torch.float64, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its CUDA extension loader warns on a machine without CUDA
        ref_outs = theirs(*ref, function=function, backend="vanilla", dtype="float64")
    _compare(flashrnn(*ours, function=function), ref_outs, ours, ref, torch.float64)


MODULES = {"LSTM": rnn_triton.MultiHeadLSTM, "GRU": rnn_triton.MultiHeadGRU, "RNN_TANH": rnn_triton.MultiHeadRNN,
           "SLSTM": rnn_triton.SLSTM}
FUNCTION_OF = {cell: function for function, cell in CELL_OF.items()}


def plain_module(module, x, hx):
    """A module of ours computed by ``plain_flashrnn`` layer by layer, from its parameters (float64)."""
    function = FUNCTION_OF[module.mode]
    NH, DH, H = module.num_heads, module.head_size, module.hidden_size
    x = x if module.batch_first else x.transpose(0, 1)
    B, T, _ = x.shape
    finals = []
    for k in range(module.num_layers):
        p = {name: getattr(module, f"{name}_l{k}", None) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        p = {name: None if w is None else w.detach().double().requires_grad_() for name, w in p.items()}
        plain_module.params += [w for w in p.values() if w is not None]
        G = p["weight_ih"].shape[0] // H
        Wx = (x @ p["weight_ih"].t()).view(B, T, G, NH, DH)
        R, b = p["weight_hh"], torch.zeros(G, NH, DH, dtype=torch.float64)
        if p["bias_ih"] is not None:
            b = (p["bias_ih"] + p["bias_hh"]).view(G, NH, DH)
        if function == "gru":  # to FlashRNN's GRU: R and b as n, r, z; b_n of the input apart
            R = torch.cat([R[2:], R[:2]])
            bias_hn = p["bias_hh"][2 * H:].view(1, NH, DH) if p["bias_hh"] is not None else b[2:] * 0
            b = torch.cat([bias_hn, b[:2], b[2:] - bias_hn])
        states = None if hx is None else torch.stack([s[k] for s in hx]).unflatten(-1, (NH, DH))[:, :, None]
        over_time, last = plain_flashrnn(Wx, R, b, states, function)
        x = over_time[0].flatten(-2)
        finals.append(last[:, :, 0].flatten(-2))
    y = x if module.batch_first else x.transpose(0, 1)
    return y, [torch.stack([f[i] for f in finals]) for i in range(len(finals[0]))]


@interpreter_only
@pytest.mark.parametrize("cell", list(MODULES))
@pytest.mark.parametrize("num_heads,hidden_size,batch_first,bias,with_state",
                         [(2, 24, False, True, True), (3, 48, True, False, False), (1, 16, False, True, False)])
def test_module_matches_a_plain_loop(cell, num_heads, hidden_size, batch_first, bias, with_state, seed):
    """Two layers; outputs, final states and the gradients of the input, the initial states and every
    parameter."""
    module = MODULES[cell](5, hidden_size, num_heads, num_layers=2, bias=bias, batch_first=batch_first,
                           dtype=torch.float64)
    S = len(module.state_names)
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_state:
        hx = [torch.randn(2, 4 if batch_first else 6, hidden_size, dtype=torch.float64) for _ in range(S)]
        if cell == "SLSTM":
            hx[2] = hx[2].abs() + 1
        hx = [h.requires_grad_() for h in hx]
    before = dict(runtime.launches)
    y, finals = module(x, None if hx is None else (hx[0] if S == 1 else tuple(hx)))
    finals = [finals] if S == 1 else list(finals)
    plain_module.params = []
    x_ref = x.detach().requires_grad_()
    hx_ref = None if hx is None else [h.detach().requires_grad_() for h in hx]
    y_ref, finals_ref = plain_module(module, x_ref, hx_ref)
    outs, ref_outs = [y] + finals, [y_ref] + finals_ref
    weights = [torch.randn_like(o) for o in ref_outs]
    ins = [x] + (hx or []) + list(module.parameters())
    ref_ins = [x_ref] + (hx_ref or []) + plain_module.params
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), ins)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref_outs, weights)), ref_ins)
    for i, (got, want) in enumerate(zip(outs + list(grads), ref_outs + list(ref_grads))):
        assert got.shape == want.shape and rel_err(got, want) < 1e-10, i
    assert kernel_launches("fwd") > kernel_launches("fwd", before), "no forward kernel ran"
    assert kernel_launches("bwd") > kernel_launches("bwd", before), "no backward kernel ran"


@interpreter_only
@pytest.mark.parametrize("cell", ["LSTM", "SLSTM"])
def test_module_takes_a_packed_sequence(cell, seed):
    """Each row stops at its own length inside the kernel: the same as running it alone, unpadded."""
    module = MODULES[cell](3, 24, 2, dtype=torch.float64)
    lengths = [5, 2, 4]
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, finals = module(packed)
    y, _ = pad_packed_sequence(out)
    for b, n in enumerate(lengths):
        y_b, finals_b = module(x[:n, b:b + 1])
        assert rel_err(y[:n, b:b + 1], y_b) < 1e-12 and (y[n:, b] == 0).all()
        for f, f_b in zip(finals, finals_b):
            assert rel_err(f[:, b:b + 1], f_b) < 1e-12


def test_unbatched_input_and_module_basics():
    module = rnn_triton.SLSTM(4, 32, num_heads=2)
    y, (h, c, n, m) = module(torch.randn(6, 4))
    assert y.shape == (6, 32) and h.shape == c.shape == n.shape == m.shape == (1, 32)
    assert dict(module.named_parameters())["weight_hh_l0"].shape == (4, 2, 16, 16)
    assert "num_heads=2" in repr(module)
    assert set(rnn_triton.SLSTM(4, 32, 2).state_dict()) == set(module.state_dict())


def test_heads_past_the_tile_kernel_are_refused_in_strict_mode_and_fall_back_otherwise(monkeypatch):
    """A head size past the tile kernel's limit (heads never run cooperative): strict mode raises with
    the reason; otherwise torch's loop runs, with a FallbackWarning, and gives the same numbers."""
    limit = dispatch.max_hidden("LSTM", torch.float32, "tile-persistent")
    module = rnn_triton.MultiHeadLSTM(3, 4 * limit, num_heads=2).to(DEVICE)
    x = torch.randn(3, 2, 3, device=DEVICE)
    assert not module.kernel_plan(x).uses_triton and "head size" in module.kernel_plan(x).reason
    with pytest.raises(NotImplementedError, match="head size"):
        module(x)
    monkeypatch.setenv("RNN_TRITON_STRICT", "0")
    with pytest.warns(rnn_triton.FallbackWarning, match="head size"):
        y, _ = module(x)
    assert y.shape == (3, 2, 4 * limit) and torch.isfinite(y).all()


def test_bad_input_gets_clear_errors():
    Wx, R, b = torch.randn(2, 3, 4, 2, 8), torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="function"):
        flashrnn(Wx, R, b, function="mamba")
    with pytest.raises(ValueError, match="R must be"):
        flashrnn(Wx, R[:, :1], b)
    with pytest.raises(ValueError, match="states must be"):
        flashrnn(Wx, R, b, torch.zeros(1, 2, 1, 2, 8))
    with pytest.raises(ValueError, match="dtype"):
        flashrnn(Wx, R.double(), b)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        rnn_triton.MultiHeadGRU(3, 10, num_heads=4)
    with pytest.raises(ValueError, match="positive"):
        rnn_triton.SLSTM(3, 0)
    module = rnn_triton.MultiHeadLSTM(3, 16, num_heads=2)
    with pytest.raises(RuntimeError, match="input_size"):
        module(torch.randn(4, 2, 5))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        module(torch.randn(4, 2, 3), (torch.zeros(1, 3, 16), torch.zeros(1, 3, 16)))
    with pytest.raises(TypeError, match="hx must be"):
        module(torch.randn(4, 2, 3), torch.zeros(1, 2, 16))


def test_module_compiles_without_a_graph_break(seed):
    """torch.compile(fullgraph=True): any graph break is an error; outputs and gradients as eager."""
    torch._dynamo.reset()
    module = rnn_triton.SLSTM(5, 32, num_heads=2).to(DEVICE)
    x = torch.randn(6, 3, 5, device=DEVICE)
    results = []
    for fn in (module, torch.compile(module, fullgraph=True, backend="aot_eager")):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y, states = fn(xi)
        (y.sum() + sum((s * (i + 2)).sum() for i, s in enumerate(states))).backward()
        results.append([y, *states, xi.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-6


@interpreter_only
@pytest.mark.parametrize("cell", ["SLSTM", "GRU"])
def test_double_backward_through_a_module(cell, seed):
    """create_graph=True: a gradient penalty's gradient as the plain loop's (the kernels give the first
    order; its graph is torch's recomputation, ops._backward)."""
    module = MODULES[cell](3, 24, 2, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    y, _ = module(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    grads = torch.autograd.grad(gx.pow(2).sum(), [x] + list(module.parameters()))
    plain_module.params = []
    x_ref = x.detach().requires_grad_()
    y_ref, _ = plain_module(module, x_ref, None)
    (gx_ref,) = torch.autograd.grad(y_ref.pow(2).sum(), x_ref, create_graph=True)
    ref = torch.autograd.grad(gx_ref.pow(2).sum(), [x_ref] + plain_module.params)
    for got, want in zip(grads, ref):
        assert rel_err(got, want) < 1e-10


def test_double_backward_through_per_step_states_raises():
    Wx, R, b = (torch.randn(2, 3, 4, 1, 16, device=DEVICE, requires_grad=True),
                torch.randn(4, 1, 16, 16, device=DEVICE), torch.randn(4, 1, 16, device=DEVICE))
    states, _ = flashrnn(Wx, R, b, function="lstm")
    with pytest.raises(RuntimeError, match="per-step cell states"):
        torch.autograd.grad(states[1].sum(), Wx, create_graph=True)
