"""Bad input, unusual but valid input, numerical robustness, hidden costs, masking at awkward sizes."""
import copy

import pytest
import torch
import triton
import triton.language as tl

import rnn_triton
from rnn_triton import ops, runtime
from rnn_triton.kernels.tiles import row_offsets, step_offsets

from helpers import DEVICE, compare_with_torch, interpreter_only, rel_err
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
    wrong_type = torch.randn(2, 3, 16, device=DEVICE) if cell == "LSTM" else (torch.randn(1, 3, 16, device=DEVICE),) * 2
    return {
        "rank": (torch.randn(2, 5, 3, 8, device=DEVICE), None, "2D or 3D"),
        "feature size": (torch.randn(5, 3, 7, device=DEVICE), None, "input_size"),
        "state shape": (x, _state(cell, 2, 16), "hidden"),
        "state rank": (x, (flat, flat) if cell == "LSTM" else flat, "3-D"),
        "state dtype": (x, _state(cell, 3, 16, torch.float64), "dtype"),
        "input dtype": (x.double(), None, "dtype"),
        "state type": (x, wrong_type, None),  # torch.nn's forward itself raises: the same error
        "empty sequence": (torch.randn(0, 3, 8, device=DEVICE), None, "sequence length"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("LSTM")))
@pytest.mark.parametrize("cell", CELLS)
def test_bad_input_raises_what_torch_raises(cell, case):
    x, hx, words = _bad_inputs(cell)[case]
    ours, ref = _pair(cell)
    with pytest.raises(Exception) as torch_error:
        ref(x, hx)
    with pytest.raises(type(torch_error.value), match=words) as our_error:
        ours(x, hx)
    if words is None:
        assert str(our_error.value) == str(torch_error.value)


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


def test_very_long_sequence_gives_torchs_answer():
    """T = 100,000 steps. The interpreter runs the RNN in float64 (about a minute per pass): exact
    to rounding. On a GPU every cell runs, in float32."""
    T, B, H = 100_000, 2, 16
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
                                               config.num_warps)
        out, _ = module(torch.randn(9, 3, 4, device=DEVICE))
    assert saved.numel() == 0 and cs.numel() == 0
    assert out.grad_fn is None


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward_raises(cell):
    module = _make(cell, 4, 16).to(DEVICE)
    x = torch.randn(5, 2, 4, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(module(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


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
    """In the widest dtype the kernel takes at that H. The LSTM takes no H = 100 (not a multiple of 16
    above 64): there the fallback's plan and strict error are what is checked."""
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
