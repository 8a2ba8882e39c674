"""The haste and FlashRNN adapters of bench/providers.py, without either library: one step of each library's
equations, re-implemented here in torch from its source, on the weights the adapter maps from a torch.nn
module, must equal torch.nn's cell in float64; and the adapters' plumbing (layouts, output slicing) runs
end to end on stand-ins of the two libraries written to the same equations and layouts.

The equations and layouts, from the libraries' repositories:
* haste (lmnt-com/haste): frameworks/pytorch/lstm.py (LSTMScript), frameworks/pytorch/gru.py (GRUScript),
  the CUDA kernels lib/lstm_forward_gpu.cu.cc and lib/gru_forward_gpu.cu.cc.
* FlashRNN (NX-AI/flashrnn): flashrnn/flashrnn/vanilla/__init__.py (flashrnn_forward: R from "GHDP" to
  "HPGD", Ry = y @ R per head), vanilla/lstm.py, vanilla/gru.py, vanilla/elman.py (the pointwise
  functions), flashrnn/flashrnn/flashrnn.py (flashrnn(): Wx "BTGHD", states "SBTHD").
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from providers import (CELLS, FlashRNNLayer, Unavailable, build, flashrnn_weights_from_torch,  # noqa: E402
                       haste_layer, haste_weights_from_torch, make_reference)

B, I, H = 3, 5, 4  # H != I, so a transposed weight cannot pass by shape


def reference(cell, bias=True, num_layers=1, bidirectional=False):
    """A float64 torch.nn module with weights far from zero, so any swapped block changes the result."""
    _, nn_cls, _, extra = CELLS[cell]
    ref = nn_cls(I, H, num_layers=num_layers, bias=bias, bidirectional=bidirectional, **extra).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.7)
    return ref


def torch_cell(ref):
    _, _, cell_cls, extra = CELLS[ref.mode]
    cell = cell_cls(I, H, bias=ref.bias, **extra).double()
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
    return cell


# --- haste's equations (frameworks/pytorch/lstm.py LSTMScript, gru.py GRUScript) ---

def haste_lstm_step(x, h, c, w):
    v = h @ w["recurrent_kernel"] + x @ w["kernel"] + w["bias"]
    i, g, f, o = torch.chunk(v, 4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def haste_gru_step(x, h, w):
    vx = torch.chunk(x @ w["kernel"] + w["bias"], 3, 1)
    vh = torch.chunk(h @ w["recurrent_kernel"] + w["recurrent_bias"], 3, 1)
    z = torch.sigmoid(vx[0] + vh[0])
    r = torch.sigmoid(vx[1] + vh[1])
    g = torch.tanh(vx[2] + r * vh[2])
    return z * h + (1 - z) * g


# --- FlashRNN's equations (vanilla/__init__.py flashrnn_forward, vanilla/{lstm,gru,elman}.py) ---

def flashrnn_step(function, wx, states, R, b):
    """wx [B, gates_w, heads, D]; states [B, S, heads, D]; R "GHDP"; b "GHD" -> new states."""
    G, NH, D, _ = R.shape
    R_internal = R.permute(1, 3, 0, 2).reshape(1, NH, D, G * D)  # "HPGD", reshaped as flashrnn_forward does
    Ry = states[:, 0].reshape(-1, NH, 1, D).matmul(R_internal).reshape(-1, NH, G, D).transpose(1, 2)
    if function == "lstm":
        i, f, z, o = torch.unbind(wx + Ry + b[None], dim=1)
        c = torch.sigmoid(f) * states[:, 1] + torch.sigmoid(i) * torch.tanh(z)
        return torch.stack((torch.sigmoid(o) * torch.tanh(c), c), dim=1)
    if function == "gru":
        g = Ry[:, 0] + b[None, 0]
        r = torch.sigmoid(wx[:, 0] + Ry[:, 1] + b[None, 1])
        z = torch.sigmoid(wx[:, 1] + Ry[:, 2] + b[None, 2])
        n = wx[:, 2] + b[None, 3]
        y = states[:, 0]
        return torch.stack((z * y + (1 - z) * torch.tanh(n + r * g),), dim=1)
    assert function == "elman"
    return torch.tanh(wx + Ry + b[None])


NUM_STATES = {"lstm": 2, "gru": 1, "elman": 1}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_haste_mapping_one_step(cell, bias):
    ref = reference(cell, bias)
    w = haste_weights_from_torch(ref)
    G = 4 if cell == "LSTM" else 3  # haste's shapes: kernel [I, G*H], recurrent_kernel [H, G*H], biases [G*H]
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "kernel": (I, G * H), "recurrent_kernel": (H, G * H), "bias": (G * H,),
        **({} if cell == "LSTM" else {"recurrent_bias": (G * H,)})}
    x, h, c = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64), \
        torch.randn(B, H, dtype=torch.float64)
    with torch.no_grad():
        if cell == "LSTM":
            torch.testing.assert_close(haste_lstm_step(x, h, c, w), torch_cell(ref)(x, (h, c)), rtol=1e-12,
                                       atol=1e-12)
        else:
            torch.testing.assert_close(haste_gru_step(x, h, w), torch_cell(ref)(x, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_flashrnn_mapping_one_step(cell, bias):
    ref = reference(cell, bias)
    function, W, R, b = flashrnn_weights_from_torch(ref)
    assert (W.shape[0] // H, R.shape[0], b.shape[0]) == {"lstm": (4, 4, 4), "gru": (3, 3, 4),
                                                         "elman": (1, 1, 1)}[function]
    assert R.shape[1:] == (1, H, H) and b.shape[1:] == (1, H)
    x, h, c = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64), \
        torch.randn(B, H, dtype=torch.float64)
    states = torch.stack((h, c) if function == "lstm" else (h,), dim=1)[:, :, None]  # [B, S, 1, H]
    wx = (x @ W.t()).reshape(B, -1, 1, H)
    with torch.no_grad():
        got = flashrnn_step(function, wx, states, R, b)[:, :, 0]
        want = torch_cell(ref)(x, (h, c) if cell == "LSTM" else h)
    want = torch.stack(want if cell == "LSTM" else (want,), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- the adapters end to end, on stand-ins written to the libraries' equations and layouts ---

class _FakeHasteRNN(torch.nn.Module):
    """haste's LSTM/GRU interface: the constructor, the parameter names and shapes, forward(input) on
    [T, B, I] returning (h[1:], state)."""

    def __init__(self, input_size, hidden_size, batch_first=False, **_):
        super().__init__()
        assert not batch_first
        gates = 4 if self.is_lstm else 3
        self.kernel = torch.nn.Parameter(torch.empty(input_size, hidden_size * gates))
        self.recurrent_kernel = torch.nn.Parameter(torch.empty(hidden_size, hidden_size * gates))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size * gates))
        if not self.is_lstm:
            self.recurrent_bias = torch.nn.Parameter(torch.empty(hidden_size * gates))

    def forward(self, input):
        w = dict(self.named_parameters())
        h = input.new_zeros(input.shape[1], self.recurrent_kernel.shape[0])
        c, hs = h, []
        for x in input:
            if self.is_lstm:
                h, c = haste_lstm_step(x, h, c, w)
            else:
                h = haste_gru_step(x, h, w)
            hs.append(h)
        return torch.stack(hs), h[None]


FAKE_HASTE = types.SimpleNamespace(LSTM=type("LSTM", (_FakeHasteRNN,), {"is_lstm": True}),
                                   GRU=type("GRU", (_FakeHasteRNN,), {"is_lstm": False}))


def fake_flashrnn(Wx, R, b, states=None, function="lstm", config=None, backend="cuda_fused", dtype="bfloat16"):
    """flashrnn()'s interface: Wx "BTGHD", R "GHDP", b "GHD" -> (states "SBTHD", last states)."""
    assert states is None and config is None and dtype == str(Wx.dtype).removeprefix("torch.")
    Bsz, T, _, NH, D = Wx.shape
    s = Wx.new_zeros(Bsz, NUM_STATES[function], NH, D)
    out = []
    for t in range(T):
        s = flashrnn_step(function, Wx[:, t], s, R, b)
        out.append(s)
    out = torch.stack(out).permute(2, 1, 0, 3, 4)  # [T, B, S, NH, D] -> "SBTHD"
    return out, out[:, :, -1:]


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_haste_adapter_on_a_stand_in(cell):
    ref = reference(cell)
    layer = haste_layer(ref, FAKE_HASTE)
    x = torch.randn(6, B, I, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_flashrnn_adapter_on_a_stand_in(cell):
    ref = reference(cell)
    layer = FlashRNNLayer(ref, fake_flashrnn)
    x = torch.randn(6, B, I, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, ref(x)[0], rtol=1e-12, atol=1e-12)
    y.sum().backward()  # gradients reach the input and the weights
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_configurations_the_libraries_do_not_cover():
    for cell, kwargs in [("RNN_TANH", {}), ("RNN_RELU", {}), ("LSTM", {"num_layers": 2}),
                         ("GRU", {"bidirectional": True})]:
        with pytest.raises(Unavailable):
            haste_weights_from_torch(reference(cell, **kwargs))
    for cell, kwargs in [("RNN_RELU", {}), ("GRU", {"num_layers": 2}), ("LSTM", {"bidirectional": True})]:
        with pytest.raises(Unavailable):
            flashrnn_weights_from_torch(reference(cell, **kwargs))


@pytest.mark.parametrize("provider,module", [("haste", "haste_pytorch"), ("flashrnn", "flashrnn")])
def test_build_without_the_library(provider, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    ref = make_reference("LSTM", I, H, 1, False, "cpu", torch.float32)
    with pytest.raises(Unavailable, match="not installed"):
        build(provider, ref, torch.randn(4, B, I), on_gpu=False)


@pytest.mark.parametrize("provider", ["haste", "flashrnn"])
def test_build_with_the_library_but_no_gpu(provider, monkeypatch):
    """Installed (as far as find_spec says), on the CPU: Unavailable before anything is imported."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("haste_pytorch", "flashrnn") else real(name, *a))
    ref = make_reference("GRU", I, H, 1, False, "cpu", torch.float32)
    with pytest.raises(Unavailable, match="CUDA"):
        build(provider, ref, torch.randn(4, B, I), on_gpu=False)
