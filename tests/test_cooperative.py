"""The cooperative kernels (hidden units split over programs that meet at a grid barrier) and their
stepwise mode, against torch.nn; and the capacity model that chooses between them.

The interpreter runs a grid's programs one after another, so a barrier between programs cannot be
passed there: the math is checked in stepwise mode (one launch per step, the same kernel body), and the
barrier itself with one program per batch group (which passes it alone) and with two (which must
time out and raise, not hang).
"""
import pytest
import torch

import rnn_triton
from rnn_triton import dispatch, ops, runtime
from rnn_triton.dispatch import BLOCK_B, BLOCK_U, COOP_CONFIGS, DeviceProps, KernelConfig

from helpers import DEVICE, compare_with_torch, interpreter_only, kernel_launches, rel_err

CELLS = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}
CUDA = torch.device("cuda")


def _reference_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse):
    """torch.nn's single-layer module on the same tensors (float64), for outputs and gradients."""
    ours, ref_cls, extra = CELLS[cell]
    ref = ref_cls(w_ih.shape[1], w_hh.shape[1], **extra).double()
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    xr = x.flip(0) if reverse else x
    hx = None if h0 is None else ((h0[None], c0[None]) if cell == "LSTM" else h0[None])
    y, h = torch.func.functional_call(ref, weights, (xr, hx))  # gradients flow to these very tensors
    hn, cn = (h[0][0], h[1][0]) if cell == "LSTM" else (h[0], None)
    return (y.flip(0) if reverse else y), hn, cn


def _layer_case(cell, H, B, T, config, with_state=True, reverse=False, I=5):
    """One layer through ``config`` in float64 against torch.nn: outputs and every gradient."""
    G = dispatch.CELLS[cell].num_gates
    shapes = [(T, B, I), (G * H, I), (G * H, H), (G * H,), (G * H,)]
    if with_state:
        shapes += [(B, H), (B, H)] if cell == "LSTM" else [(B, H)]
    ours = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    ref = [t.detach().clone().requires_grad_() for t in ours]
    states = lambda a: (a[5], a[6] if cell == "LSTM" else None) if with_state else (None, None)  # noqa: E731
    before = dict(runtime.launches)
    out = ops.recurrent_layer(cell, *ours[:5], *states(ours), config, False, reverse=reverse)
    exp = _reference_layer(cell, *ref[:5], *states(ref), reverse)
    out = [o for o in out if o is not None]
    exp = [e for e in exp if e is not None]
    grads = [torch.randn_like(e) for e in exp]
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    sum((e * g).sum() for e, g in zip(exp, grads)).backward()
    for i, (o, e) in enumerate(zip(out, exp)):
        assert rel_err(o, e) < 1e-10, f"output {i}: {rel_err(o, e):.1e}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a.grad, b.grad) < 1e-10, f"gradient of input {i}: {rel_err(a.grad, b.grad):.1e}"
    assert runtime.launches[f"{config.variant}_fwd"] > before.get(f"{config.variant}_fwd", 0)
    assert runtime.launches[f"{config.variant}_bwd"] > before.get(f"{config.variant}_bwd", 0)


def _config(variant, H, groups=1, w_chunk=0, fwd_chunk=0):
    return KernelConfig(variant, BLOCK_B, dispatch.block_h_for(H), 8, BLOCK_U, groups, w_chunk, fwd_chunk)


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("H", [192, 200, 256, 320])
def test_stepwise_float64(cell, H):
    """Stepwise mode in float64 (to 1e-10): every unit's program, the partial last block of units
    (H = 200) and every gradient. B = 19 makes two batch tiles, the second partial; with groups = 1 one
    program walks both tiles, as a cooperative program does."""
    _layer_case(cell, H, 19, 4, _config("stepwise", H, groups=1), with_state=H != 256, reverse=H == 320)


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
def test_stepwise_float64_weights_from_the_cache(cell):
    """The forward and backward that re-read W_hh and W_hh^T each step, 128 columns at a time (H = 300:
    two full chunks and a partial one), as float32 LSTM H = 1024 runs them."""
    _layer_case(cell, 300, 5, 3, _config("stepwise", 300, groups=1, w_chunk=128, fwd_chunk=128))


@interpreter_only
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("groups", [1, 2])
def test_cooperative_barrier_with_one_program_per_group(cell, groups):
    """The cooperative launch itself (barrier arrivals and waits each step) where it can run in the
    interpreter: H <= 16, one program per batch group, so each group's barrier needs only itself."""
    _layer_case(cell, 16, 35, 5, _config("cooperative", 16, groups))


@interpreter_only
def test_barrier_timeout_is_an_error_not_a_hang(monkeypatch):
    """Two programs per group in the interpreter never meet (they run one after another): the bounded
    spin must give up, flag the error and the host must raise."""
    monkeypatch.setattr(ops, "BARRIER_MAX_SPINS", 50)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    w_ih, w_hh = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="barrier timed out"):
        ops.recurrent_layer("RNN_TANH", x, w_ih, w_hh, None, None, None, None, _config("cooperative", 32),
                            False)


@pytest.mark.parametrize("cell,H,dtype", [
    ("LSTM", 192, torch.bfloat16), ("LSTM", 200, torch.float16), ("GRU", 320, torch.bfloat16),
    ("RNN_TANH", 400, torch.bfloat16), ("RNN_RELU", 320, torch.float16), ("RNN_TANH", 100, torch.float32),
    ("RNN_RELU", 272, torch.float32), ("LSTM", 300, torch.bfloat16), ("GRU", 200, torch.bfloat16),
    ("LSTM", 600, torch.bfloat16)], ids=str)
def test_modules_beyond_the_tile_kernel(cell, H, dtype, seed):
    """The modules take hidden sizes past the tile-persistent kernel through the cooperative kernels
    (stepwise in the interpreter), against torch.nn in float64, every gradient. (LSTM 300, GRU 200 and
    LSTM 600 in bf16: H not a multiple of 16, padded to one, with W_hh and W_hh^T on chip.)"""
    module = CELLS[cell][0](7, H, **CELLS[cell][2]).to(dtype)
    plan = module.kernel_plan(torch.randn(3, 2, 7, device=DEVICE, dtype=dtype))
    assert plan.uses_triton and plan.config.variant in ("stepwise", "cooperative"), plan
    assert (plan.config.fwd_chunk, plan.config.w_chunk) == (0, 0), plan
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    hx = torch.randn(1, 2, H, dtype=torch.float64)
    hx = (hx, torch.randn(1, 2, H, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(module, CELLS[cell][1], x, hx, seed)
    assert kernel_launches("fwd") > 0


@pytest.mark.parametrize("cell,H", [("LSTM", 720), ("GRU", 700), ("RNN_TANH", 768)], ids=str)
def test_k_is_two_tiles_past_512(cell, H, seed):
    """H in (512, 768] pads K to 768 = 512 + 256, not 1024: the kernels' second K tile (BLOCK_K2) and
    its share of h and of the weights, forward and backward, against torch.nn in float64."""
    assert dispatch.k_tiles(768) == {"BLOCK_K": 512, "BLOCK_K2": 256}
    assert dispatch.choose(cell, H, torch.bfloat16, torch.device("cuda"), props=H200).config.block_h == 768
    module = CELLS[cell][0](7, H, **CELLS[cell][2]).to(torch.bfloat16)
    plan = module.kernel_plan(torch.randn(3, 2, 7, device=DEVICE, dtype=torch.bfloat16))
    assert plan.config.block_h == 768 and (plan.config.fwd_chunk, plan.config.w_chunk) == (0, 0), plan
    hx = torch.randn(1, 2, H, dtype=torch.float64)
    hx = (hx, torch.randn(1, 2, H, dtype=torch.float64)) if cell == "LSTM" else hx
    compare_with_torch(module, CELLS[cell][1], torch.randn(3, 2, 7, dtype=torch.float64), hx, seed)


# The capacity model, on made-up GPUs. Resource numbers are the compile check's (COOP_CONFIGS).
H200 = dispatch.H200
SMALL_GPU = DeviceProps("80 SMs", sm_count=80, shared_per_sm=164 * 1024, shared_per_block=163 * 1024)
LITTLE_SHARED = DeviceProps("little shared memory", sm_count=132, shared_per_sm=100 * 1024,
                            shared_per_block=99 * 1024)


def test_resident_blocks_takes_the_tightest_limit():
    assert dispatch.resident_blocks(H200, 4, 32, 32 * 1024) == 7        # shared: 228 // 32
    assert dispatch.resident_blocks(H200, 8, 128, 0) == 2               # registers: 65536 // (8*32*128)
    assert dispatch.resident_blocks(H200, 4, 32, 0) == 16               # threads: 2048 // 128
    assert dispatch.resident_blocks(H200, 8, 64, 228 * 1024) == 0       # over one block's limit
    assert dispatch.resident_blocks(LITTLE_SHARED, 8, 64, 128 * 1024) == 0


def _expected(props, cell, dtype, H, B, packed=False, directions=1):
    coop = COOP_CONFIGS[(cell, dtype)][min(k for k in COOP_CONFIGS[(cell, dtype)] if k >= H)]  # its K
    capacity = props.sm_count * dispatch.resident_blocks(props, coop.num_warps, coop.registers_for(packed),
                                                         coop.shared_bytes)
    units, tiles = -(-H // BLOCK_U), -(-B // BLOCK_B)
    if units > capacity:
        return "stepwise", tiles
    both = units * directions <= capacity  # a bidirectional layer's grids side by side, if they fit
    return "cooperative", min(tiles, capacity // (units * directions if both else units))


@pytest.mark.parametrize("props", [H200, SMALL_GPU, LITTLE_SHARED], ids=lambda p: p.name)
@pytest.mark.parametrize("cell,dtype,H", [(c, d, h) for (c, d), table in COOP_CONFIGS.items() for h in sorted(table)
                                          if h > dispatch.max_hidden(c, d, variant="tile-persistent")])
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("packed,directions", [(False, 1), (True, 1), (False, 2)])
def test_dispatcher_capacity_model(props, cell, dtype, H, B, packed, directions, monkeypatch):
    """Packed input (per-row lengths) takes the same variants, counted with its builds' registers; a
    bidirectional layer's two grids share the GPU where both fit. (float32 with TF32, cuDNN's default:
    IEEE float32 stops at dispatch.COOP_IEEE_FP32_MAX.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    plan = dispatch.choose(cell, H, dtype, CUDA, batch=B, props=props, packed=packed, directions=directions)
    assert plan.uses_triton, plan.reason
    variant, groups = _expected(props, cell, dtype, H, B, packed, directions)
    assert (plan.config.variant, plan.config.groups, plan.config.block_u) == (variant, groups, BLOCK_U)
    if variant == "cooperative":  # never more programs than the GPU holds at once
        coop = COOP_CONFIGS[(cell, dtype)][plan.config.block_h]
        per_sm = dispatch.resident_blocks(props, coop.num_warps, coop.registers_for(packed), coop.shared_bytes)
        assert -(-H // BLOCK_U) * plan.config.groups <= props.sm_count * per_sm


def test_bidirectional_grids_side_by_side_on_an_h200():
    """At small batch a bidirectional LSTM of H = 1024 puts both 64-program grids on the 132 SMs at
    once; an RNN of H = 2048 (128 programs, one per SM) cannot, and keeps the whole GPU per direction."""
    choose = lambda cell, H, B: dispatch.choose(cell, H, torch.bfloat16, CUDA, B, H200, directions=2).config  # noqa
    assert choose("LSTM", 1024, 1).groups == 1 and 2 * 64 <= H200.sm_count
    assert choose("LSTM", 256, 256).groups == 132 // (2 * 16)  # one 208-register program per SM
    assert choose("RNN_TANH", 2048, 256).groups == 1


@pytest.mark.parametrize("cell,H,dtype", [("GRU", 256, torch.float16), ("RNN_TANH", 100, torch.float64)], ids=str)
def test_bidirectional_modules_beyond_the_tile_kernel(cell, H, dtype, seed):
    """Two layers, both directions, at cooperative sizes (stepwise in the interpreter, the directions
    concurrent on a GPU where both grids fit): every output and gradient."""
    if dtype == torch.float64 and DEVICE.type != "cpu":
        pytest.skip("float64 kernels run only in the interpreter")
    module = CELLS[cell][0](5, H, num_layers=2, bidirectional=True, **CELLS[cell][2]).to(dtype)
    assert module.kernel_plan(torch.randn(3, 2, 5, device=DEVICE, dtype=dtype)).config.variant != "tile-persistent"
    hx = torch.randn(4, 2, H, dtype=torch.float64)
    compare_with_torch(module, CELLS[cell][1], torch.randn(3, 2, 5, dtype=torch.float64), hx, seed)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="concurrent directions need a GPU (two CUDA streams)")
def test_bidirectional_directions_go_on_two_streams_on_gpu(seed):
    """Both directions' grids fit together, so they are launched on two streams (that they overlap in
    time is the GPU's doing: a benchmark shows it, not this test); the results are torch.nn's."""
    module = CELLS["LSTM"][0](16, 512, bidirectional=True).to(torch.bfloat16)
    before = dict(runtime.launches)
    compare_with_torch(module, CELLS["LSTM"][1], torch.randn(20, 3, 16, dtype=torch.float64), None, seed)
    for direction in ("fwd", "bwd"):
        key = f"{direction}_directions_concurrent"
        assert runtime.launches[key] > before.get(key, 0), f"{direction}: the directions ran one after the other"


def test_dispatcher_targets_on_an_h200():
    """The on-chip targets for bfloat16 on a 132-SM GPU: what runs cooperatively, and where the
    tile-persistent kernel still serves."""
    choose = lambda cell, H, B=16: dispatch.choose(cell, H, torch.bfloat16, CUDA, B, H200).config  # noqa
    assert choose("LSTM", 128).variant == "tile-persistent"
    assert choose("LSTM", 512).variant == "cooperative"
    assert choose("LSTM", 768).variant == "cooperative" and choose("LSTM", 768).w_chunk == 0  # W_hh^T on chip
    assert choose("GRU", 512).variant == "cooperative"
    assert choose("RNN_TANH", 2048).variant == "cooperative"
    assert choose("RNN_TANH", 2048, B=1).groups == 1
    assert dispatch.choose("RNN_TANH", 2048, torch.bfloat16, CUDA, 16, SMALL_GPU).config.variant == "stepwise"
    assert not dispatch.choose("LSTM", 2048, torch.bfloat16, CUDA, 16, H200).uses_triton


def test_interpreter_plans_stepwise():
    plan = dispatch.choose("LSTM", 320, torch.bfloat16, torch.device("cpu"), batch=40)
    if DEVICE.type == "cpu":
        assert plan.config.variant == "stepwise" and plan.config.groups == 3


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the cooperative launch needs a GPU (all programs resident)")
@pytest.mark.parametrize("cell,H", [("LSTM", 512), ("LSTM", 768), ("GRU", 512), ("GRU", 1024),
                                    ("RNN_TANH", 2048), ("RNN_RELU", 1024)])
def test_cooperative_on_gpu_is_right_and_bitwise_repeatable(cell, H, seed):
    """Compiled, on the GPU, with the grid barrier: against torch.nn in float64, then 20 runs of forward
    and backward bitwise identical (a result that moves between runs is a race at the barrier)."""
    module = CELLS[cell][0](32, H, **CELLS[cell][2]).to(torch.bfloat16)
    x = torch.randn(64, 24, 32, dtype=torch.float64)
    before = runtime.launches["cooperative_fwd"]
    compare_with_torch(module, CELLS[cell][1], x, None, seed)
    assert runtime.launches["cooperative_fwd"] > before, "did not run cooperatively"
    xg = x.to(DEVICE, torch.bfloat16).requires_grad_()
    runs = []
    for _ in range(20):
        y, _ = module(xg)
        y.float().square().sum().backward()
        runs.append([y.detach().clone(), xg.grad.clone()] + [p.grad.clone() for p in module.parameters()])
        xg.grad = None
        module.zero_grad(set_to_none=True)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
