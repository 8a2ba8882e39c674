"""rnn_triton.LSTMCell / GRUCell / RNNCell against torch.nn's cells: every output and every gradient.

The reference is torch.nn's cell in float64 on the CPU, fed exactly the numbers ours got (our inputs
cast back to float64). Ours run through the fused single-step kernels (the interpreter on a CPU, in
float64 too; compiled on a GPU), in strict mode, so a fallback to torch is an error.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rnn_triton
from rnn_triton import cell_ops, runtime

from helpers import DEVICE, HALF_TYPES, TOLERANCE, interpreter_only, rel_err

#: cell -> (ours, torch.nn's, constructor arguments)
CELLS = {
    "LSTM": (rnn_triton.LSTMCell, nn.LSTMCell, {}),
    "GRU": (rnn_triton.GRUCell, nn.GRUCell, {}),
    "RNN_TANH": (rnn_triton.RNNCell, nn.RNNCell, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
}
#: The exact-math dtype: float64 in the interpreter, float32 on a GPU (no float64 kernels there).
EXACT = torch.float64 if DEVICE.type == "cpu" else torch.float32


def _pair(cell, I, H, dtype, bias=True):
    """Our cell on DEVICE in ``dtype`` and torch.nn's twin in float64 on the CPU, same weights."""
    ours_cls, ref_cls, extra = CELLS[cell]
    ours = ours_cls(I, H, bias=bias, **extra).to(DEVICE, dtype)
    ref = ref_cls(I, H, bias=bias, **extra).double()
    ref.load_state_dict({k: v.cpu().double() for k, v in ours.state_dict().items()})  # the rounded values
    return ours, ref


def _inputs(cell, B, I, H, dtype, batched, with_state):
    """[x] + states (h, or h and c), random, on DEVICE in ``dtype``; 1-D when not batched."""
    lead = (B,) if batched else ()
    n_states = (2 if cell == "LSTM" else 1) if with_state else 0
    return [torch.randn(*lead, I, device=DEVICE, dtype=dtype)] + \
        [torch.randn(*lead, H, device=DEVICE, dtype=dtype) for _ in range(n_states)]


def _call(module, cell, inputs):
    """Run a cell on [x] + states; its outputs as a list (h', and c' for the LSTM)."""
    hx = None
    if len(inputs) > 1:
        hx = tuple(inputs[1:]) if cell == "LSTM" else inputs[1]
    out = module(inputs[0], hx)
    return list(out) if cell == "LSTM" else [out]


def compare(cell, dtype, B, I, H, seed, batched=True, with_state=True, bias=True, grad_inputs=True):
    """One step through ours and the float64 reference, random output gradients; assert every output and
    every gradient (input, states, parameters) agree within TOLERANCE[dtype] (or, in float16/bfloat16,
    twice torch.nn's own error in that dtype, whichever is larger) and that both kernels ran."""
    ours, ref = _pair(cell, I, H, dtype, bias)
    inputs = [t.requires_grad_(grad_inputs) for t in _inputs(cell, B, I, H, dtype, batched, with_state)]
    ref_inputs = [t.detach().cpu().double().requires_grad_(grad_inputs) for t in inputs]
    before = dict(runtime.launches)
    outs = _call(ours, cell, inputs)
    refs = _call(ref, cell, ref_inputs)
    grads = [torch.randn_like(r) for r in refs]
    sum((o.cpu().double() * g).sum() for o, g in zip(outs, grads)).backward()
    sum((r * g).sum() for r, g in zip(refs, grads)).backward()
    assert runtime.launches["cell_fwd"] == before.get("cell_fwd", 0) + 1, "the forward kernel did not run once"
    assert runtime.launches["cell_bwd"] == before.get("cell_bwd", 0) + 1, "the backward kernel did not run once"

    names = ["h'", "c'"][: len(outs)]
    got, want = list(outs), list(refs)
    if grad_inputs:
        names += ["grad of x", "grad of h", "grad of c"][: len(inputs)]
        got += [t.grad for t in inputs]
        want += [t.grad for t in ref_inputs]
    else:
        assert all(t.grad is None for t in inputs)
    names += [f"grad of {n}" for n, _ in ours.named_parameters()]
    got += [p.grad for p in ours.parameters()]
    want += [p.grad for p in ref.parameters()]
    bounds = [TOLERANCE[dtype]] * len(names)
    if dtype in HALF_TYPES:
        own = _torch_errors_in(dtype, cell, ref, ref_inputs, grads, want, grad_inputs)
        bounds = [max(b, 2 * e) for b, e in zip(bounds, own)]
    if cell == "RNN_RELU" and dtype in HALF_TYPES:
        # A pre-activation within rounding of 0 takes the other side of ReLU than in float64 and flips
        # its gradient entry: the gradients are checked on our forward's pattern (helpers.py says more).
        pattern = (outs[0].detach().cpu() > 0).double()
        on_pattern = copy.deepcopy(ref)
        on_pattern.zero_grad(set_to_none=True)
        pattern_inputs = [t.detach().cpu().double().requires_grad_(grad_inputs) for t in inputs]
        x, h = pattern_inputs[0], (pattern_inputs[1] if with_state else torch.zeros_like(refs[0]))
        pre = F.linear(x, on_pattern.weight_ih, on_pattern.bias_ih) + F.linear(h, on_pattern.weight_hh,
                                                                                on_pattern.bias_hh)
        ((pre * pattern) * grads[0]).sum().backward()
        want = want[: len(outs)] + ([t.grad for t in pattern_inputs] if grad_inputs else []) \
            + [p.grad for p in on_pattern.parameters()]
        bounds = bounds[: len(outs)] + [TOLERANCE[dtype]] * (len(bounds) - len(outs))
    for name, o, r, bound in zip(names, got, want, bounds):
        assert o is not None, f"{name} missing"
        assert o.dtype == dtype and o.shape == r.shape, f"{name}: {o.dtype} {tuple(o.shape)} vs {tuple(r.shape)}"
        err = rel_err(o, r)
        assert err < bound, f"{name}: rel err {err:.2e} >= {bound:.1e} (seed {seed}, {cell}, {dtype})"


def _torch_errors_in(dtype, cell, ref, ref_inputs, grads, exact, grad_inputs):
    """torch.nn's own relative errors when its cell runs the same step in ``dtype`` on the CPU."""
    low = copy.deepcopy(ref).to(dtype)
    low.zero_grad(set_to_none=True)
    inputs = [t.detach().to(dtype).requires_grad_(grad_inputs) for t in ref_inputs]
    outs = _call(low, cell, inputs)
    sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
    got = outs + ([t.grad for t in inputs] if grad_inputs else []) + [p.grad for p in low.parameters()]
    return [rel_err(a, b) for a, b in zip(got, exact)]


# 1. Every output and gradient, in the exact dtype: sizes, bias, state, batched or not. ----------------

SIZES = [  # (B, I, H)
    (3, 5, 7),        # nothing a power of two, below one block
    (1, 16, 16),      # a single row, exact blocks
    (2, 1, 1),        # one feature, one unit
    (17, 40, 33),     # two batch tiles; H just past a power of two
    (5, 300, 200),    # I and H span several K chunks of either kernel
]


@pytest.mark.parametrize("B,I,H", SIZES)
@pytest.mark.parametrize("cell", CELLS)
def test_sizes(cell, B, I, H, seed):
    compare(cell, EXACT, B, I, H, seed)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_flags(cell, batched, with_state, bias, seed):
    """1-D (unbatched) input, hx omitted (zeros: W_hh still gets its zero gradient), no biases."""
    compare(cell, EXACT, 4, 6, 10, seed, batched=batched, with_state=with_state, bias=bias)


@pytest.mark.parametrize("cell", CELLS)
def test_only_parameter_gradients(cell, seed):
    """Input and state without requires_grad (the backward skips dx and dh): the parameters' gradients
    alone."""
    compare(cell, EXACT, 3, 20, 24, seed, grad_inputs=False)


# 2. Storage dtypes against the float64 reference. ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cell", CELLS)
def test_dtypes(cell, dtype, seed):
    compare(cell, dtype, 5, 70, 40, seed)


# 3. Autoregressive decoding: each step's output is the next step's input. -----------------------------

@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_autoregressive_loop(cell, batched, seed):
    """Four steps from no state, h' fed back as the next input; a loss on every step's output. Outputs,
    the first input's gradient and every parameter's gradient match torch.nn's; one forward and one
    backward launch per step."""
    steps, B, H = 4, 3, 12
    ours, ref = _pair(cell, H, H, EXACT)
    x0 = torch.randn(*((B,) if batched else ()), H, device=DEVICE, dtype=EXACT)
    out_grads = [torch.randn(x0.shape, dtype=torch.float64) for _ in range(steps)]

    def decode(module, x):
        state, outs = None, []
        for _ in range(steps):
            state = module(x, state)
            x = state[0] if cell == "LSTM" else state
            outs.append(x)
        return outs

    before = dict(runtime.launches)
    results = []
    for module, x in ((ours, x0), (ref, x0.detach().cpu().double())):
        x = x.detach().clone().requires_grad_()
        outs = decode(module, x)
        sum((o.cpu().double() * g).sum() for o, g in zip(outs, out_grads)).backward()
        results.append((outs, x.grad, [p.grad for p in module.parameters()]))
    assert runtime.launches["cell_fwd"] == before.get("cell_fwd", 0) + steps
    assert runtime.launches["cell_bwd"] == before.get("cell_bwd", 0) + steps
    (outs, x_grad, grads), (ref_outs, ref_x_grad, ref_grads) = results
    bound = TOLERANCE[EXACT]
    for t, (o, r) in enumerate(zip(outs, ref_outs)):
        assert rel_err(o, r) < bound, f"output of step {t} (seed {seed})"
    assert rel_err(x_grad, ref_x_grad) < bound, f"grad of the first input (seed {seed})"
    for (name, _), g, r in zip(ours.named_parameters(), grads, ref_grads):
        assert rel_err(g, r) < bound, f"grad of {name} (seed {seed})"


def test_compiled_decoding_loop_has_no_graph_break(seed):
    """torch.compile(fullgraph=True) through the custom ops, forward and backward."""
    torch._dynamo.reset()
    cell = rnn_triton.LSTMCell(8, 8).to(DEVICE)

    def decode(x):
        h = c = None
        outs = []
        for _ in range(3):
            h, c = cell(x, None if h is None else (h, c))
            x = h
            outs.append(h)
        return torch.stack(outs)

    x = torch.randn(2, 8, device=DEVICE)
    before = runtime.launches["cell_fwd"]
    xc = x.clone().requires_grad_()
    got = torch.compile(decode, fullgraph=True, backend="aot_eager")(xc)
    got.sum().backward()
    assert runtime.launches["cell_fwd"] > before
    xe = x.clone().requires_grad_()
    want = decode(xe)
    want.sum().backward()
    assert rel_err(got, want) < 1e-6 and rel_err(xc.grad, xe.grad) < 1e-6


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_opcheck(cell):
    """torch.library.opcheck on both ops: schema, fake implementations, autograd registration."""
    spec = cell_ops.CELLS[cell]
    B, I, H = 3, 5, 16
    G = spec.num_gates
    t = lambda *s: torch.randn(*s, device=DEVICE, requires_grad=True)  # noqa: E731
    config = cell_ops.choose(cell, I, H, torch.float32, DEVICE).config.args()
    x, w_ih, w_hh, b_ih, b_hh, h = t(B, I), t(G * H, I), t(G * H, H), t(G * H), t(G * H), t(B, H)
    c = t(B, H) if cell == "LSTM" else None
    args = (x, w_ih, w_hh, b_ih, b_hh, h, c, spec.kernel_id, True, *config)
    torch.library.opcheck(cell_ops.cell_fwd, args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]  # no autograd through cell_bwd
    hy, cy, saved, cs = cell_ops.cell_fwd(*plain)
    x, w_ih, w_hh, _, _, h, c = plain[:7]
    bwd_config = (config[0], config[4], config[5], config[6])
    torch.library.opcheck(cell_ops.cell_bwd, (torch.randn_like(hy), torch.randn_like(hy), x, w_ih, w_hh, h, c,
                                              saved, cs, spec.kernel_id, True, True, True, True, *bwd_config))


# 4. What is not served, and bad input. ----------------------------------------------------------------

def test_kernel_plan_says_what_runs():
    cell = rnn_triton.GRUCell(5, 300)
    plan = cell.kernel_plan(torch.randn(2, 5))
    assert plan.uses_triton and plan.config.variant == "fused-step"
    plan = cell.kernel_plan(torch.randn(2, 3, 5))
    assert not plan.uses_triton and "3-D" in plan.reason


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_unserved_raises_in_strict_mode_and_falls_back_otherwise(cell, monkeypatch, seed):
    """A state dtype torch.nn's LSTMCell accepts (c in another dtype), and (on the CPU) autocast, which
    casts only some of the GEMMs inside torch's cells: NotImplementedError in strict mode; torch.nn's
    answer, and no kernel, without it."""
    ours, ref = _pair(cell, 6, 8, torch.float32)
    ref.float()
    x = torch.randn(3, 6, device=DEVICE)
    cases = []
    if cell == "LSTM":
        cases.append(((x, (torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE).double())),
                      None, "hx is torch.float64"))
    if DEVICE.type == "cpu":
        cases.append(((x, None), "cpu", "autocast"))
    for args, autocast, words in cases:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        monkeypatch.setenv("RNN_TRITON_STRICT", "1")
        with context, pytest.raises(NotImplementedError, match=words):
            ours(*args)
        monkeypatch.setenv("RNN_TRITON_STRICT", "0")
        before = dict(runtime.launches)
        with context:
            got = ours(*args)
            want = ref.to(DEVICE)(*args)
        assert runtime.launches == before
        got, want = (list(got), list(want)) if cell == "LSTM" else ([got], [want])
        assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


def _bad_inputs(cell):
    x = torch.randn(3, 6, device=DEVICE)
    state = lambda *s, **kw: torch.randn(*s, device=DEVICE, **kw)  # noqa: E731
    pair = lambda *s, **kw: (state(*s, **kw), state(*s, **kw)) if cell == "LSTM" else state(*s, **kw)  # noqa: E731
    cases = {
        "input rank": (torch.randn(2, 3, 6, device=DEVICE), None),
        "empty rank": (torch.tensor(1.0, device=DEVICE), None),
        "feature size": (torch.randn(3, 7, device=DEVICE), None),
        "state batch": (x, pair(2, 8)),
        "state size": (x, pair(3, 9)),
        "state rank": (x, pair(1, 3, 8)),
        "unbatched input, batched state": (torch.randn(6, device=DEVICE), pair(3, 8)),
        "batched input, unbatched state": (x, pair(8)),
        "input dtype": (x.double(), None),
        "state dtype": (x, pair(3, 8, dtype=torch.float64)),
        "integer input": (torch.ones(3, 6, dtype=torch.long, device=DEVICE), None),
        "input type": ([[1.0] * 6] * 3, None),
    }
    return cases  # an hx of the wrong type: test_reliability.test_wrong_state_type_is_a_type_error


@pytest.mark.parametrize("case", list(_bad_inputs("LSTM")))
@pytest.mark.parametrize("cell", CELLS)
def test_bad_input_raises_what_torch_raises(cell, case):
    x, hx = _bad_inputs(cell)[case]
    ours, ref = _pair(cell, 6, 8, torch.float32)
    ref.float().to(DEVICE)
    with pytest.raises(Exception) as torch_error:
        ref(x, hx)
    before = dict(runtime.launches)
    with pytest.raises(type(torch_error.value)) as our_error:
        ours(x, hx)
    assert str(our_error.value) == str(torch_error.value)
    assert runtime.launches == before


# 5. The rest of the drop-in contract. -----------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_is_its_torch_class_with_the_same_state_dict(cell):
    ours_cls, ref_cls, extra = CELLS[cell]
    for bias in (True, False):
        ours, ref = ours_cls(6, 8, bias=bias, **extra), ref_cls(6, 8, bias=bias, **extra)
        assert isinstance(ours, ref_cls) and repr(ours) == repr(ref)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        assert sorted(vars(ours)) == sorted(vars(ref))


@pytest.mark.parametrize("cell", ["LSTM", "RNN_TANH"])
def test_empty_batch_and_no_grad(cell):
    """A batch of 0 rows gives torch's empty outputs; under no_grad nothing is saved (no graph)."""
    ours, ref = _pair(cell, 6, 8, EXACT)
    outs = _call(ours, cell, _inputs(cell, 0, 6, 8, EXACT, True, True))
    assert all(o.shape == (0, 8) for o in outs)
    with torch.no_grad():
        outs = _call(ours, cell, _inputs(cell, 2, 6, 8, EXACT, True, True))
    assert all(o.grad_fn is None for o in outs)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_strided_inputs_frozen_weights_and_a_plain_sum(cell, seed):
    """x and the states as strided views, parameters without requires_grad (the backward skips the
    weight GEMMs), and loss = sum(outputs), whose gradient reaches backward expanded (stride 0)."""
    B, I, H = 3, 10, 12
    ours, ref = _pair(cell, I, H, EXACT)
    for module in (ours, ref):
        module.requires_grad_(False)
    wide = [torch.randn(B, 2 * n, device=DEVICE, dtype=EXACT) for n in (I, H, H)][: 3 if cell == "LSTM" else 2]
    results = []
    for module, device, dtype in ((ours, DEVICE, EXACT), (ref, "cpu", torch.float64)):
        inputs = [w.to(device, dtype)[:, ::2].requires_grad_() for w in wide]
        assert not inputs[0].is_contiguous()
        outs = _call(module, cell, [inputs[0], *inputs[1:]])
        sum(o.sum() for o in outs).backward()
        results.append(outs + [t.grad for t in inputs])
    for o, r in zip(*results):
        assert rel_err(o, r) < TOLERANCE[EXACT], f"seed {seed}"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA autocast: on a GPU only")
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_autocast_matches_torch(cell):
    """Under autocast torch casts the whole cell op to autocast's dtype; ours does the same."""
    ours, ref = _pair(cell, 8, 16, torch.float32)
    ref.float().to(DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    results = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = _call(module, cell, [xi])
        sum(o.float().sum() for o in outs).backward()
        results.append((outs, [xi.grad] + [p.grad for p in module.parameters()]))
    (outs, grads), (ref_outs, ref_grads) = results
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and rel_err(o, r) < 3e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and rel_err(g, r) < 5e-2


@interpreter_only
def test_heaviest_builds_compile_for_sm90_without_spills():
    """The LSTM builds with a state for sizes not divisible by 16 (the most registers of any cell_ops
    launches; ``python -m rnn_triton.cell_compile_check`` checks them all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, torch; from rnn_triton.cell_ops import STEP_CONFIGS as S; "
            "from rnn_triton.cell_compile_check import compile_step\n"
            "bad = []\n"
            "for d in (torch.float16, torch.float32):\n"
            "    c = S[d]\n"
            "    for r in (compile_step('fwd', 'LSTM', d, c.block_u, c.block_k, c.num_warps, c.num_stages),\n"
            "              compile_step('bwd', 'LSTM', d, c.bwd_block_u, c.bwd_block_n, c.bwd_num_warps)):\n"
            "        print(r)\n"
            "        bad += [] if r.ok else [r]\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
