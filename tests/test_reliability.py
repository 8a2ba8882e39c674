"""Bad input, unusual but valid input, numerical robustness, hidden costs, masking at awkward sizes."""
import copy

import pytest
import torch
import triton
import triton.language as tl
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_triton
from rnn_triton import ops, runtime
from rnn_triton.kernels.tiles import row_offsets, step_offsets

from helpers import DEVICE, compare_with_torch, interpreter_only, rel_err
from test_cells import CELLS as CELL_MODULES
from test_modules import CELLS, _make, _supported


def _state(cell, B, H, dtype=torch.float32, layers=1):
    h = torch.randn(layers, B, H, dtype=dtype, device=DEVICE)
    return (h, torch.randn(layers, B, H, dtype=dtype, device=DEVICE)) if cell == "LSTM" else h


def _pair(cell, I=8, H=16, **kwargs):
    """Our module and torch.nn's with the same weights, both on DEVICE in float32."""
    ours = _make(cell, I, H, **kwargs).to(DEVICE)
    ref = CELLS[cell][1](I, H, **CELLS[cell][2], **kwargs).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


# 1. Bad input: torch.nn's exception type, a message that says what is wrong. ----------------------

def _bad_inputs(cell):
    x = torch.randn(5, 3, 8, device=DEVICE)
    flat = torch.randn(3, 16, device=DEVICE)  # a 2-D state for a batched input
    return {
        "rank": (torch.randn(2, 5, 3, 8, device=DEVICE), None, "2D or 3D"),
        "feature size": (torch.randn(5, 3, 7, device=DEVICE), None, "input_size"),
        "state shape": (x, _state(cell, 2, 16), "hidden"),
        "state rank": (x, (flat, flat) if cell == "LSTM" else flat, "3-D"),
        "state dtype": (x, _state(cell, 3, 16, torch.float64), "dtype"),
        "input dtype": (x.double(), None, "dtype"),
        "empty sequence": (torch.randn(0, 3, 8, device=DEVICE), None, "sequence length"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("LSTM")))
@pytest.mark.parametrize("cell", CELLS)
def test_bad_input_raises_what_torch_raises(cell, case):
    x, hx, words = _bad_inputs(cell)[case]
    ours, ref = _pair(cell)
    with pytest.raises(Exception) as torch_error:
        ref(x, hx)
    with pytest.raises(type(torch_error.value), match=words):
        ours(x, hx)


def _refused_size(cell):
    """A float32 hidden size above every kernel's limit for ``cell`` (the LSTM and GRU: 128, RNN: 2048)."""
    H = 2 * rnn_triton.dispatch.max_hidden(cell, torch.float32)
    assert not _supported(cell, H, torch.float32)
    return H


@pytest.mark.parametrize("case", list(_bad_inputs("LSTM")))
@pytest.mark.parametrize("cell", CELLS)
def test_torch_errors_come_before_our_refusals(cell, case):
    """At a size the kernels refuse (strict mode: NotImplementedError for good input), bad input still
    gets the error torch.nn raises (its exception type; a message that says what is wrong)."""
    H = _refused_size(cell)
    ours, ref = _pair(cell, H=H)
    x, hx, words = _bad_inputs(cell)[case]
    if hx is not None:  # the same defect at this H: states [layers, B, H]
        hx = tuple(h.new_zeros(h.shape[:-1] + (H,)) for h in hx) if cell == "LSTM" else hx.new_zeros(hx.shape[:-1] + (H,))
    with pytest.raises(Exception) as torch_error:
        ref(x, hx)
    with pytest.raises(type(torch_error.value), match=words):
        ours(x, hx)
    with pytest.raises(NotImplementedError, match="above the kernels' limit"):
        ours(torch.randn(5, 3, 8, device=DEVICE))


@pytest.mark.parametrize("cell", CELLS)
def test_torch_errors_come_before_our_refusals_packed(cell):
    H = _refused_size(cell)
    ours, ref = _pair(cell, H=H)
    packed = pack_padded_sequence(torch.randn(4, 3, 8, device=DEVICE), torch.tensor([4, 2, 3]), enforce_sorted=False)
    for hx in (_state(cell, 2, H), _state(cell, 3, H + 1)):  # the wrong batch, the wrong hidden size
        with pytest.raises(Exception) as torch_error:
            ref(packed, hx)
        # (torch.nn's message for the wrong batch is its permutation's "INDICES element is out of DATA
        # bounds"; ours is its check_forward_args message)
        with pytest.raises(type(torch_error.value), match="Expected hidden"):
            ours(packed, hx)
    with pytest.raises(NotImplementedError, match="above the kernels' limit"):
        ours(packed)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_errors_come_before_our_refusals(cell):
    """The cells take every size; what they refuse is CPU autocast (it casts only some of the GEMMs in
    torch's cells). A wrong state under it: torch.nn's error first, in strict mode."""
    ours, _, extra = CELL_MODULES[cell]
    ours = ours(8, 16, **extra).to(DEVICE)
    ref = CELL_MODULES[cell][1](8, 16, **extra).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8, device=DEVICE)
    states = [torch.randn(2, 16, device=DEVICE) for _ in range(2 if cell == "LSTM" else 1)]  # batch 2, not 3
    hx = tuple(states) if cell == "LSTM" else states[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in ours.kernel_plan(x).reason
        with pytest.raises(Exception) as torch_error:
            ref(x, hx)
        with pytest.raises(type(torch_error.value)) as our_error:
            ours(x, hx)
        assert str(our_error.value) == str(torch_error.value)
        with pytest.raises(NotImplementedError, match="autocast"):
            ours(x)


def _wrong_state_types(cell, h):
    """{case: (hx of a wrong type built from the state h, words of the type got)}."""
    if cell == "LSTM":
        return {"a bare Tensor": (h, "Tensor"), "one state": ((h,), r"tuple of 1 \(Tensor\)"),
                "three states": ((h, h, h), "tuple of 3"), "a str for c": ((h, "c"), r"\(Tensor, str\)"),
                "a str": ("h", "str")}
    return {"an (h, c) pair": ((h, h), r"tuple of 2 \(Tensor, Tensor\)"), "a list": ([h], "list of 1"),
            "a str": ("h", "str")}


@pytest.mark.parametrize("cell,case", [(cell, case) for cell in CELLS for case in _wrong_state_types(cell, None)])
def test_wrong_state_type_is_a_type_error(cell, case):
    """An LSTM given a bare Tensor, a GRU or RNN given an (h, c) pair, and the like: a TypeError that
    names the type expected (torch.nn lets an IndexError or AttributeError out), from the modules, on
    padded and packed input, and from the cells; no kernel runs."""
    want = r"a tuple \(h, c\) of two Tensors" if cell == "LSTM" else "a Tensor"
    module = _make(cell, 8, 16).to(DEVICE)
    cell_module = CELL_MODULES[cell][0](8, 16, **CELL_MODULES[cell][2]).to(DEVICE)
    x = torch.randn(5, 3, 8, device=DEVICE)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
    module_hx, words = _wrong_state_types(cell, torch.randn(1, 3, 16, device=DEVICE))[case]
    cell_hx, _ = _wrong_state_types(cell, torch.randn(3, 16, device=DEVICE))[case]
    before = dict(runtime.launches)
    for owner, call in (("", lambda: module(x, module_hx)), ("", lambda: module(packed, module_hx)),
                        ("Cell", lambda: cell_module(x[0], cell_hx))):
        with pytest.raises(TypeError, match=f"{type(module).__name__}{owner}: hx must be {want} or None, "
                                            f"got .*{words}"):
            call()
    assert runtime.launches == before


# Zero sizes: as torch.nn, in strict mode, with no kernel launch. -------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_zero_hidden_size_module_is_torchs_value_error(cell):
    with pytest.raises(ValueError) as torch_error:
        CELLS[cell][1](8, 0, **CELLS[cell][2])
    with pytest.raises(ValueError, match=str(torch_error.value)):
        _make(cell, 8, 0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("bidirectional,batch_first", [(False, False), (True, True)])
def test_zero_batch_module(cell, with_state, bidirectional, batch_first, seed):
    """Batch 0: torch.nn's shapes and (zero, empty) gradients, create_graph too, and no kernel runs."""
    kwargs = dict(num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    ours, ref = _pair(cell, **kwargs)
    D = 2 if bidirectional else 1
    results = []
    before = dict(runtime.launches)
    for module in (ours, ref):
        x = torch.randn(0, 5, 8, device=DEVICE) if batch_first else torch.randn(5, 0, 8, device=DEVICE)
        x.requires_grad_()
        states = [] if not with_state else \
            [torch.randn(2 * D, 0, 16, device=DEVICE, requires_grad=True) for _ in range(2 if cell == "LSTM" else 1)]
        y, h = module(x, None if not states else (tuple(states) if cell == "LSTM" else states[0]))
        outs = [y] + (list(h) if cell == "LSTM" else [h])
        grads = torch.autograd.grad(sum(o.sum() for o in outs), [x, *states, *module.parameters()],
                                    create_graph=True)
        results.append(outs + list(grads))
    assert runtime.launches == before
    for got, want in zip(*results):
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("I,H,B", [(10, 0, 3), (0, 4, 3), (3, 4, 0), (0, 0, 0)])
def test_zero_sizes_cell(cell, I, H, B, seed):
    """Hidden size 0, input size 0, batch 0: torch.nn's outputs and gradients, in strict mode. Only
    input size 0 with rows and units has anything to compute (the biases and the state): the kernels
    run it; else nothing is launched."""
    ours_cls, ref_cls, extra = CELL_MODULES[cell]
    ours, ref = ours_cls(I, H, **extra).double(), ref_cls(I, H, **extra).double()
    ref.load_state_dict(ours.state_dict())
    assert ours.kernel_plan(torch.randn(B, I, dtype=torch.float64)).uses_triton
    x, h, c = (torch.randn(B, n, dtype=torch.float64) for n in (I, H, H))
    results = []
    before = dict(runtime.launches)
    for module in (ours, ref):
        inputs = [t.clone().requires_grad_() for t in ([x, h, c] if cell == "LSTM" else [x, h])]
        out = module(inputs[0], tuple(inputs[1:]) if cell == "LSTM" else inputs[1])
        outs = list(out) if cell == "LSTM" else [out]
        grads = torch.autograd.grad(sum((o * o).sum() for o in outs), inputs + list(module.parameters()))
        results.append(outs + list(grads))
    launched = runtime.launches["cell_fwd"] - before.get("cell_fwd", 0)
    assert launched == (1 if I == 0 and H > 0 and B > 0 else 0)
    for got, want in zip(*results):
        assert got.shape == want.shape
        assert want.numel() == 0 or rel_err(got, want) < 1e-12


# 2. Unusual but valid input gives torch's answer. ---------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_input_and_states(cell, seed):
    x = torch.randn(3, 9, 8, dtype=torch.float64).transpose(0, 1)  # [T, B, I] with B-major strides
    h = torch.randn(3, 16, 2, dtype=torch.float64).permute(2, 0, 1)[:1]  # [1, B, H], transposed
    hx = (h, torch.randn(1, 3, 32, dtype=torch.float64)[..., ::2]) if cell == "LSTM" else h
    assert not x.is_contiguous() and not h.is_contiguous()
    compare_with_torch(_make(cell, 8, 16), CELLS[cell][1], x, hx, seed)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (4, 1)])
def test_batch_of_one_and_single_step(cell, B, T, seed):
    compare_with_torch(_make(cell, 8, 16), CELLS[cell][1], torch.randn(T, B, 8, dtype=torch.float64),
                       None, seed)


@pytest.mark.parametrize("cell", CELLS)
def test_zero_length_batch(cell):
    ours, ref = _pair(cell)
    x = torch.randn(5, 0, 8, device=DEVICE, requires_grad=True)
    y, h = ours(x)
    y_ref, h_ref = ref(x)
    assert y.shape == y_ref.shape
    for a, b in zip(h if cell == "LSTM" else [h], h_ref if cell == "LSTM" else [h_ref]):
        assert a.shape == b.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("cell", CELLS)
def test_weights_tied_across_modules(cell):
    """Two modules sharing W_hh: the gradients of both uses add up in the one Parameter."""
    a, a_ref = _pair(cell)
    b, b_ref = _pair(cell, I=16)
    b.weight_hh_l0 = a.weight_hh_l0
    b_ref.weight_hh_l0 = a_ref.weight_hh_l0
    x = torch.randn(6, 2, 8, device=DEVICE)
    for first, second in ((a, b), (a_ref, b_ref)):
        second(first(x)[0])[0].sum().backward()
    assert rel_err(a.weight_hh_l0.grad, a_ref.weight_hh_l0.grad) < 1e-4


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("convert", ["half", "bfloat16", "to_float64_and_back"])
def test_modules_moved_between_dtypes(cell, convert, seed):
    module = _make(cell, 8, 16)
    if convert == "to_float64_and_back":
        module = module.to(torch.float64).to(torch.float32)
    else:
        module = getattr(module, convert)()
    compare_with_torch(module, CELLS[cell][1], torch.randn(7, 3, 8, dtype=torch.float64), None, seed)


# 3. Numerical robustness. --------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_huge_pre_activations_stay_finite(cell):
    ours, ref = _pair(cell)
    with torch.no_grad():
        for module in (ours, ref):
            for p in module.parameters():
                p.mul_(300.0)  # pre-activations in the hundreds and thousands
    x = torch.randn(9, 4, 8, device=DEVICE)
    y, _ = ours(x)
    assert torch.isfinite(y).all()
    # Weights x300 make the recurrence ill-conditioned: float32 rounding grows step to step, so two
    # float32 implementations differ by chance. Over 200 draws torch.nn's own float32 result was up
    # to 3.6e-3 off float64 (GRU; LSTM 5e-4), ours 3.5e-3 (LSTM 6e-4). Both against float64.
    y64, _ = copy.deepcopy(ref).cpu().double()(x.cpu().double())
    assert rel_err(ref(x)[0], y64) < 2e-2 and rel_err(y, y64) < 2e-2


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_where_torchs_do(cell, bad):
    ours, ref = _pair(cell)
    x = torch.randn(6, 4, 8, device=DEVICE)
    x[2, 1, 3] = bad  # one step of one sequence
    y, _ = ours(x)
    y_ref, _ = ref(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))
    assert torch.isfinite(y[:, [0, 2, 3]]).all()  # the other sequences are untouched
    finite = torch.isfinite(y_ref)
    assert rel_err(y[finite], y_ref[finite]) < 1e-4


@pytest.mark.long
def test_very_long_sequence_gives_torchs_answer():
    """T = 100,000 steps on a GPU, every cell, in float32. The interpreter runs the RNN in float64,
    exact to rounding, over T = 25,000 (about 2 minutes a pass; 100,000 took 16 minutes of CI's 30:
    offsets past 2^31 are test_step_offsets_are_64_bit's)."""
    T, B, H = (25_000 if DEVICE.type == "cpu" else 100_000), 2, 16
    cells, dtype = (["RNN_TANH"], torch.float64) if DEVICE.type == "cpu" else (list(CELLS), torch.float32)
    for cell in cells:
        ours, ref = _make(cell, 4, H).to(DEVICE, dtype), CELLS[cell][1](4, H, **CELLS[cell][2]).double()
        ref.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
        x = torch.randn(T, B, 4, dtype=dtype, device=DEVICE, requires_grad=True)
        x_ref = x.detach().cpu().double().requires_grad_()
        y, _ = ours(x)
        y_ref, _ = ref(x_ref)
        y[-100:].sum().backward()
        y_ref[-100:].sum().backward()
        assert torch.isfinite(y).all()
        assert rel_err(y, y_ref) < (1e-10 if dtype == torch.float64 else 1e-4), cell
        assert rel_err(x.grad, x_ref.grad) < (1e-10 if dtype == torch.float64 else 1e-4), cell


@triton.jit
def _offsets_kernel(out_ptr, t, stride_t, b0, stride_b, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    rows = row_offsets(b0 + offs, stride_b, offs)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], step_offsets(t, stride_t, rows))


@interpreter_only
def test_step_offsets_are_64_bit():
    """The kernels' offset arithmetic past 2^31 (T*B*G*H of a long, wide run) without allocating it."""
    t, stride_t, b0, stride_b, block = 70_000, 4 * 4096 * 16, 40_000, 4 * 4096, 16
    out = torch.empty(block, block, dtype=torch.int64)
    _offsets_kernel[(1,)](out, t, stride_t, b0, stride_b, BLOCK=block)
    h = torch.arange(block)[:, None]
    b = b0 + torch.arange(block)[None, :]
    want = t * stride_t + b * stride_b + h
    assert want.max() > 2**32 and torch.equal(out, want)


# 4. No hidden cost. ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_inference_saves_nothing_for_backward(cell):
    module = _make(cell, 4, 16).to(DEVICE).eval()
    G = rnn_triton.dispatch.CELLS[cell].num_gates
    config = module.kernel_plan(torch.randn(9, 3, 4, device=DEVICE)).config
    xp = torch.randn(9, 3, G * 16, device=DEVICE)
    with torch.no_grad():
        y, _, _, saved, cs = ops.recurrent_fwd(xp, module.weight_hh_l0, None, None, None, None,
                                               rnn_triton.dispatch.CELLS[cell].kernel_id, False, False,
                                               False, config.variant, config.block_b, config.block_h,
                                               config.block_u, config.groups, config.w_chunk,
                                               config.num_warps, config.fwd_chunk, 1)
        out, _ = module(torch.randn(9, 3, 4, device=DEVICE))
    assert saved.numel() == 0 and cs.numel() == 0
    assert out.grad_fn is None


@pytest.mark.parametrize("cell", CELLS)
def test_deterministic(cell):
    module = _make(cell, 8, 48).to(DEVICE)
    x = torch.randn(11, 5, 8, device=DEVICE, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = None
        module.zero_grad()
        y, _ = module(x)
        y.square().sum().backward()
        runs.append([y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# 5. Masking: sizes that are not multiples of the tile, for every cell. ------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("H,B", [(17, 5), (33, 31), (100, 5)])
def test_awkward_sizes(cell, H, B, seed):
    """In the widest dtype the kernel takes at that H (where none did, the fallback's plan and strict
    error would be what is checked)."""
    dtype = next((d for d in (torch.float32, torch.bfloat16) if _supported(cell, H, d)), None)
    if dtype is None:
        module = _make(cell, 8, H).to(DEVICE, torch.bfloat16)
        x = torch.randn(7, B, 8, device=DEVICE, dtype=torch.bfloat16)
        assert "hidden_size=100" in module.kernel_plan(x).reason
        with pytest.raises(NotImplementedError, match="hidden_size=100"):
            module(x)
        return
    hx = torch.randn(1, B, H, dtype=torch.float64)
    hx = (hx, torch.randn(1, B, H, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(_make(cell, 8, H).to(dtype), CELLS[cell][1], torch.randn(7, B, 8, dtype=torch.float64),
                       hx, seed)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_saturated_gates_keep_their_gradients_in_bfloat16(cell, seed):
    """Every gate saturated (biases of size 3 to 5, small weights): the backward recomputes the gates
    from the pre-activations saved in bfloat16, so sigma' = sigma (1 - sigma) stays accurate. Saved
    activations rounded to bfloat16 would lose 1 - sigma (sigma(5) is one bfloat16 step from 1), and
    tens of percent of every gradient with it. A fixed bound: torch.nn's own bfloat16 error is no bar
    here. (Our bfloat16 module against its float64 twin, as everywhere.)"""
    ours = _make(cell, 8, 32).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("bias_ih"):
                p.copy_((3 + 2 * torch.rand_like(p)) * torch.sign(torch.randn_like(p)))
            elif name.startswith("bias_hh"):
                p.zero_()
            else:
                p.mul_(0.1)
    ref = CELLS[cell][1](8, 32, **CELLS[cell][2]).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    ours.to(DEVICE)
    x = torch.randn(6, 3, 8, dtype=torch.float64).to(torch.bfloat16)
    xs = [x.to(DEVICE).detach().clone().requires_grad_(), x.double().requires_grad_()]
    grad = torch.randn(6, 3, 32, dtype=torch.float64)
    before = dict(runtime.launches)
    for module, xi in zip((ours, ref), xs):
        (module(xi)[0].cpu().double() * grad).sum().backward()
    assert runtime.launches["persistent_bwd"] > before.get("persistent_bwd", 0)
    # ~2e-2 at most (the pre-activations' own bfloat16 rounding); gates saved in bf16 (simulated): 7e-2
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 4e-2, f"grad of {name}: {rel_err(p.grad, q.grad):.2e} (seed {seed})"
    assert rel_err(xs[0].grad, xs[1].grad) < 4e-2, f"grad of input: {rel_err(xs[0].grad, xs[1].grad):.2e}"
