"""float32, PyTorch's default dtype, through the kernels at every hidden size to 1024 (the RNN to 2048),
small awkward sizes included; and what a user sees when a call does run torch.nn's code instead.

On the CPU the interpreter runs float32 in IEEE precision (float64 takes float32's configurations);
the sm_90 compile check proves the GPU builds (TF32 and IEEE) that the dispatcher table names.
"""
import warnings

import pytest
import torch
from torch import nn

import rnn_triton
from rnn_triton import dispatch

from helpers import DEVICE, compare_with_torch, interpreter_only, kernel_launches

CELLS = {
    "LSTM": (rnn_triton.LSTM, nn.LSTM, {}),
    "GRU": (rnn_triton.GRU, nn.GRU, {}),
    "RNN_TANH": (rnn_triton.RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, nn.RNN, {"nonlinearity": "relu"}),
}
CUDA = torch.device("cuda")


@pytest.mark.parametrize("allow_tf32", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_every_float32_hidden_size_has_a_kernel_on_an_h200(cell, allow_tf32, monkeypatch):
    """H = 1 .. 1024 (the RNN: 2048), any H, padded or packed, TF32 or IEEE: never torch's code."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    top = 2048 if cell.startswith("RNN") else 1024
    for H in range(1, top + 1):
        for packed in (False, True):
            plan = dispatch.choose(cell, H, torch.float32, CUDA, 16, dispatch.H200, packed=packed)
            assert plan.uses_triton, f"H={H} packed={packed}: {plan.reason}"
    assert not dispatch.choose(cell, top + 1, torch.float32, CUDA, 16, dispatch.H200).uses_triton


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_every_half_precision_hidden_size_to_1024_has_a_kernel_on_an_h200(cell, dtype):
    """Awkward sizes in half precision too: any H to 1024, padded or packed."""
    for H in range(1, 1025):
        for packed in (False, True):
            plan = dispatch.choose(cell, H, dtype, CUDA, 16, dispatch.H200, packed=packed)
            assert plan.uses_triton, f"H={H} packed={packed}: {plan.reason}"


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("H,B", [(17, 5), (33, 1), (100, 31)])
@pytest.mark.parametrize("cell", CELLS)
def test_awkward_sizes(cell, H, B, dtype, seed):
    """H = 17, 33, 100 with B = 5, 1, 31 (a partial batch tile; two tiles): outputs and every gradient
    against torch.nn in float64, the kernels proven to run (strict mode: no fallback)."""
    ours, theirs, extra = CELLS[cell]
    module = ours(3, H, **extra).to(dtype)
    x = torch.randn(4, B, 3, dtype=torch.float64)
    hx = torch.randn(1, B, H, dtype=torch.float64)
    compare_with_torch(module, theirs, x, (hx, torch.randn_like(hx)) if cell == "LSTM" else hx, seed)


class Tagger(nn.Module):
    """A BiLSTM tagger at a size people use (float32 LSTM, H = 200), as ``torch.nn`` builds it."""

    def __init__(self, hidden=200):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, 5)

    def forward(self, tokens):
        return self.out(self.lstm(self.embed(tokens))[0])


@interpreter_only
@pytest.mark.parametrize("hidden", [200, 256])
def test_a_float32_model_converted_runs_the_kernels(hidden, monkeypatch, seed):
    """An fp32 nn.LSTM of H = 200 or 256 inside a model, converted, runs the kernels in strict mode
    (forward and backward) and gives torch.nn's loss and gradients."""
    monkeypatch.setenv("RNN_TRITON_STRICT", "1")
    model = Tagger(hidden)
    ref = Tagger(hidden).double()
    ref.load_state_dict(model.state_dict())
    rnn_triton.convert(model)
    tokens = torch.randint(0, 50, (2, 3))
    before = {d: kernel_launches(d) for d in ("fwd", "bwd")}
    loss = model(tokens).square().mean()
    loss.backward()
    assert kernel_launches("fwd") > before["fwd"] and kernel_launches("bwd") > before["bwd"]
    ref_loss = ref(tokens).square().mean()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err = ((p.grad.double() - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"grad of {name}: {err:.1e} (seed {seed})"


def test_a_fallback_warns_once_per_module_and_reason(monkeypatch):
    """Outside strict mode a call no kernel serves runs torch.nn's code with a FallbackWarning naming
    kernel_plan's reason: once per module and reason, so a training loop is not flooded."""
    monkeypatch.setenv("RNN_TRITON_STRICT", "0")
    H = dispatch.max_hidden("LSTM", torch.float32) + 1  # above every kernel
    a, b = rnn_triton.LSTM(2, H).to(DEVICE), rnn_triton.LSTM(2, H).to(DEVICE)
    x = torch.randn(2, 1, 2, device=DEVICE)
    reason = a.kernel_plan(x).reason
    assert reason and not a.kernel_plan(x).uses_triton
    with pytest.warns(rnn_triton.FallbackWarning) as record:
        a(x)
    assert len(record) == 1 and reason in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller's line, not torch's or ours
    with warnings.catch_warnings():
        warnings.simplefilter("error", rnn_triton.FallbackWarning)
        a(x)  # the same module and reason again: no warning
    with pytest.warns(rnn_triton.FallbackWarning):
        b(x)  # another module: its own
    cell, x = rnn_triton.GRUCell(2, 4), torch.randn(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast: cells refuse it (kernel_plan)
        assert not cell.kernel_plan(x).uses_triton
        with pytest.warns(rnn_triton.FallbackWarning, match="autocast"):
            cell(x)


def test_strict_mode_raises_instead_of_warning(monkeypatch):
    monkeypatch.setenv("RNN_TRITON_STRICT", "1")
    H = dispatch.max_hidden("GRU", torch.float32) + 1
    with pytest.raises(NotImplementedError, match="limit"):
        rnn_triton.GRU(2, H).to(DEVICE)(torch.randn(2, 1, 2, device=DEVICE))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="TF32 and the GPU's IEEE builds run on a GPU only")
@pytest.mark.parametrize("allow_tf32", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_error_on_a_gpu_is_cudnns(cell, allow_tf32, monkeypatch, seed):
    """On a GPU, float32 at H = 256 and 768 against torch.nn in float64: with allow_tf32 (TF32 dots)
    the output and input gradient within twice cuDNN's own TF32 error on the same inputs; without it
    (IEEE fp32) within 1e-4."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    ours_cls, torch_cls, extra = CELLS[cell]
    for H in (256, 768):
        ours = ours_cls(64, H, **extra).cuda()
        assert ours.kernel_plan(torch.randn(50, 16, 64, device="cuda")).uses_triton
        cudnn = torch_cls(64, H, **extra).cuda()
        cudnn.load_state_dict(ours.state_dict())
        ref = torch_cls(64, H, **extra).double()
        ref.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
        x = torch.randn(50, 16, 64, dtype=torch.float64)
        dy = torch.randn(50, 16, H, dtype=torch.float64)
        results = []
        for module, dtype, device in ((ours, torch.float32, "cuda"), (cudnn, torch.float32, "cuda"),
                                      (ref, torch.float64, "cpu")):
            xi = x.to(device, dtype).requires_grad_()
            y = module(xi)[0]
            (y * dy.to(device, dtype)).sum().backward()
            results.append((y.double().cpu(), xi.grad.double().cpu()))
        (y, dx), (y_cudnn, dx_cudnn), (y_ref, dx_ref) = results
        for name, a, b, r in (("output", y, y_cudnn, y_ref), ("input gradient", dx, dx_cudnn, dx_ref)):
            err = ((a - r).norm() / r.norm()).item()
            bound = 2 * ((b - r).norm() / r.norm()).item() + 1e-6 if allow_tf32 else 1e-4
            assert err < bound, f"H={H} {name}: {err:.2e} >= {bound:.2e} (seed {seed})"


def test_a_compiled_fallback_does_not_break_the_graph(monkeypatch):
    """Dynamo cannot trace warnings.warn: under torch.compile(fullgraph=True) a fallback stays one graph
    (and silent; kernel_plan or strict mode tells)."""
    monkeypatch.setenv("RNN_TRITON_STRICT", "0")
    torch._dynamo.reset()
    H = dispatch.max_hidden("GRU", torch.float32) + 1
    module = rnn_triton.GRU(2, H).to(DEVICE)
    x = torch.randn(2, 1, 2, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rnn_triton.FallbackWarning)
        y, _ = torch.compile(module, fullgraph=True, backend="eager")(x)
    assert torch.allclose(y, torch.nn.GRU.forward(module, x)[0])
