"""rnn_triton.LSTM against torch.nn.LSTM in float64: outputs, final states, every gradient."""
import itertools

import pytest
import torch

import rnn_triton
from rnn_triton import dispatch, ops, runtime

from helpers import DEVICE, compare_with_torch, interpreter_only

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = list(itertools.product([16, 48, 64, 128], [1, 3, 16, 17], [1, 2, 37]))  # H, B, T


def _supported(H, dtype):
    return dispatch.choose("LSTM", H, dtype, DEVICE).uses_triton


def _case(H, B, T, dtype, bias, batch_first, with_state, seed, I=None):
    I = I or max(1, H // 3 + 1)
    lstm = rnn_triton.LSTM(I, H, bias=bias, batch_first=batch_first).to(dtype)
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(T, B, I, dtype=torch.float64)
    hx = (torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)) \
        if with_state else None
    compare_with_torch(lstm, torch.nn.LSTM, x, hx, seed)


@pytest.mark.parametrize("H,B,T", SIZES)
def test_sizes(H, B, T, seed):
    """Every (H, B, T) of the grid, in the widest dtype the kernel takes at that H; bias, batch_first
    and initial state cycle through their values across the grid."""
    dtype = torch.float32 if _supported(H, torch.float32) else torch.bfloat16
    i = SIZES.index((H, B, T))
    _case(H, B, T, dtype, bias=i % 2 == 0, batch_first=(i // 2) % 2 == 0, with_state=(i // 4) % 2 == 0,
          seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,batch_first,with_state", list(itertools.product([True, False], repeat=3)))
def test_flags(dtype, bias, batch_first, with_state, seed):
    """Every combination of bias, batch_first and (h0, c0) in every dtype."""
    _case(48, 17, 37, dtype, bias, batch_first, with_state, seed)


@pytest.mark.parametrize("dtype,H", [(d, h) for d in DTYPES for h in [16, 48, 64, 128] if _supported(h, d)],
                         ids=str)
def test_dtypes_per_hidden_size(dtype, H, seed):
    """Every hidden size of the grid in every dtype whose kernel takes it (float32 stops at 64:
    test_unsupported_size_* covers what happens beyond)."""
    _case(H, 3, 37, dtype, True, False, True, seed)


def test_unsupported_size_raises_in_strict_mode():
    lstm = rnn_triton.LSTM(8, 128).to(DEVICE)  # float32 H=128 does not fit on chip (compile check)
    with pytest.raises(NotImplementedError, match="hidden_size=128"):
        lstm(torch.randn(5, 2, 8, device=DEVICE))


def test_unsupported_size_falls_back_to_torch(monkeypatch, seed):
    monkeypatch.setenv("RNN_TRITON_STRICT", "0")
    lstm = rnn_triton.LSTM(8, 128)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    before = runtime.launches["persistent_fwd"]
    compare_with_torch(lstm, torch.nn.LSTM, x, None, seed, expect_kernels=False)
    assert runtime.launches["persistent_fwd"] == before


@pytest.mark.parametrize("kwargs,reason", [
    ({"num_layers": 2}, "num_layers"),
    ({"bidirectional": True}, "bidirectional"),
    ({"proj_size": 4}, "proj_size"),
])
def test_unsupported_options_raise_in_strict_mode(kwargs, reason):
    lstm = rnn_triton.LSTM(8, 16, **kwargs).to(DEVICE)
    with pytest.raises(NotImplementedError, match=reason):
        lstm(torch.randn(5, 2, 8, device=DEVICE))


def test_packed_sequence_raises_in_strict_mode():
    lstm = rnn_triton.LSTM(8, 16).to(DEVICE)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 8, device=DEVICE), [5, 3])
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        lstm(packed)


@interpreter_only
def test_gradcheck_float64():
    """torch.autograd.gradcheck through the kernels (the interpreter runs them in float64)."""
    T, B, I, H = 3, 2, 3, 16
    config = dispatch.choose("LSTM", H, torch.float64, torch.device("cpu")).config
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True)
            for s in [(T, B, I), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,), (B, H), (B, H)]]

    def layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
        return ops.recurrent_layer("LSTM", x, w_ih, w_hh, b_ih, b_hh, h0, c0, config, False)

    assert torch.autograd.gradcheck(layer, args, eps=1e-6, atol=1e-6)


def test_unbatched_input(seed):
    lstm = rnn_triton.LSTM(5, 16)
    x = torch.randn(7, 5, dtype=torch.float64)
    hx = (torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64))
    compare_with_torch(lstm, torch.nn.LSTM, x, hx, seed)


def test_module_is_a_torch_lstm_with_the_same_state_dict():
    ours, ref = rnn_triton.LSTM(6, 16, bias=False), torch.nn.LSTM(6, 16, bias=False)
    assert isinstance(ours, torch.nn.LSTM)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())


def test_no_grad_saves_nothing_for_backward():
    lstm = rnn_triton.LSTM(4, 16).to(DEVICE)
    x = torch.randn(9, 3, 4, device=DEVICE)
    config = lstm.kernel_plan(x).config
    with torch.no_grad():
        xp = torch.randn(9, 3, 64, device=DEVICE)
        _, _, _, saved, cs = ops.recurrent_fwd(xp, lstm.weight_hh_l0, None, None, None,
                                               0, False, False, False, config.block_b, config.block_h,
                                               config.num_warps)
        y, _ = lstm(x)
    assert saved.numel() == 0 and cs.numel() == 0
    assert y.grad_fn is None


def test_kernel_plan_says_what_runs():
    lstm = rnn_triton.LSTM(4, 48)
    plan = lstm.kernel_plan(torch.randn(3, 2, 4))
    assert plan.uses_triton and plan.config.variant == "tile-persistent" and plan.config.block_h == 64
    plan = rnn_triton.LSTM(4, 48, num_layers=2).kernel_plan(torch.randn(3, 2, 4))
    assert not plan.uses_triton and "num_layers" in plan.reason
