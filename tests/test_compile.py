"""torch.compile without graph breaks, torch.library opcheck, autocast, export, CUDA graphs."""
import copy

import pytest
import torch

import rnn_triton
from rnn_triton import dispatch, ops, runtime

from helpers import DEVICE, rel_err


class TwoLayer(torch.nn.Module):
    """Two rnn_triton.LSTM layers and a Linear head."""

    def __init__(self):
        super().__init__()
        self.lower = rnn_triton.LSTM(6, 16, batch_first=True)
        self.upper = rnn_triton.LSTM(16, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        y, _ = self.lower(x)
        y, (h, _) = self.upper(y)
        return self.head(y[:, -1] + h[0])


def _train(model, steps, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, target in data[:steps]:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_matches_eager(backend):
    """fullgraph=True: any graph break is an error. Three SGD steps compiled vs eager, same results."""
    torch._dynamo.reset()
    eager = TwoLayer().to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    data = [(torch.randn(4, 9, 6, device=DEVICE), torch.randint(0, 3, (4,), device=DEVICE)) for _ in range(3)]
    before = runtime.launches["persistent_fwd"]
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    got = _train(compiled, 3, data)
    assert runtime.launches["persistent_fwd"] > before, "the compiled model did not run our kernels"
    want = _train(eager, 3, data)
    assert rel_err(got, want) < 1e-5
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert rel_err(p, q) < 1e-5, name


def _fwd_args(cell, with_grad, H=16, D=1, heads=1):
    """recurrent_fwd's arguments for a small case of D directions of ``heads`` heads: H = 16 runs
    tile-persistent, H = 100 (RNN, float32) cooperative (stepwise in the interpreter)."""
    spec = dispatch.CELLS[cell]
    T, B, GH, K = 5, 3, spec.num_gates * H, D * heads
    c = dispatch.choose(cell, H, torch.float32, DEVICE, B, heads=heads).config
    t = lambda *s: torch.randn(*s, device=DEVICE, requires_grad=with_grad)  # noqa: E731
    c0 = None
    if spec.num_c:
        c0 = torch.rand(K, B, spec.num_c * H, device=DEVICE) + 1  # (the sLSTM's n: at least 1)
        c0.requires_grad_(with_grad)
    return (t(T, B, K * GH), t(K * GH, H), t(K * H) if cell == "GRU" else None,
            t(K, B, H), c0, None, spec.kernel_id, False, False, with_grad,
            c.variant, c.block_b, c.block_h, c.block_u, c.groups, c.w_chunk, c.num_warps, c.fwd_chunk, heads)


CASES = [("LSTM", 16, 1, 1), ("GRU", 16, 1, 1), ("RNN_TANH", 16, 1, 1), ("RNN_TANH", 100, 1, 1), ("GRU", 16, 2, 1),
         ("RNN_TANH", 100, 2, 1), ("LSTM", 16, 1, 3), ("SLSTM", 16, 1, 2), ("SLSTM", 16, 2, 1)]


@pytest.mark.parametrize("cell,H,D,heads", CASES)
def test_opcheck_forward_op(cell, H, D, heads):
    torch.library.opcheck(ops.recurrent_fwd, _fwd_args(cell, True, H, D, heads))
    torch.library.opcheck(ops.recurrent_fwd, _fwd_args(cell, False, H, D, heads))


@pytest.mark.parametrize("cell,H,D,heads,state_grads", [
    ("LSTM", 16, 1, 1, False), ("GRU", 16, 1, 1, False), ("RNN_TANH", 100, 1, 1, False), ("LSTM", 16, 2, 1, False),
    ("GRU", 16, 2, 1, False), ("RNN_TANH", 100, 2, 1, False), ("LSTM", 16, 1, 2, True), ("SLSTM", 16, 2, 2, True),
    ("SLSTM", 16, 1, 1, False)])
def test_opcheck_backward_op(cell, H, D, heads, state_grads):
    args = _fwd_args(cell, False, H, D, heads)
    xp, w_hh, b_hn, h0, c0, lengths, cell_id, reverse, batch_first, _, *config = args
    y, hn, cn, saved, cs = ops.recurrent_fwd(xp, w_hh, b_hn, h0, c0, lengths, cell_id, reverse, batch_first,
                                             True, *config)
    dcn = torch.randn_like(cn) if cn.numel() else torch.randn_like(hn)
    torch.library.opcheck(ops.recurrent_bwd, (torch.randn_like(y), torch.randn_like(hn), dcn,
                                              w_hh, saved, cs, h0, c0, lengths, y, cell_id, reverse,
                                              batch_first, *config[:7], heads,
                                              torch.randn_like(cs) if state_grads else None))


def _under_bf16_autocast(module, x, reference):
    """``module(x)`` under bf16 autocast. torch.nn's LSTM there runs oneDNN's bf16 LSTM on the CPU, which
    some CPUs lack ("could not create a primitive descriptor"): the reference then computes what that
    path computes, the module with its weights and input cast to bf16 (differentiably, as autocast casts
    them), through torch's own bf16 LSTM."""
    try:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return module(x)
    except RuntimeError as exc:
        if not (reference and DEVICE.type == "cpu" and "primitive descriptor" in str(exc)):
            raise
    params = {n: p.to(torch.bfloat16) for n, p in module.named_parameters()}
    with torch.backends.mkldnn.flags(enabled=False):
        return torch.func.functional_call(module, params, (x.to(torch.bfloat16),))


@pytest.mark.parametrize("cell,cls,ref_cls", [("LSTM", rnn_triton.LSTM, torch.nn.LSTM),
                                               ("GRU", rnn_triton.GRU, torch.nn.GRU),
                                               ("RNN_TANH", rnn_triton.RNN, torch.nn.RNN)])
def test_autocast_matches_torch(cell, cls, ref_cls):
    """Under bf16 autocast: the output and state dtypes torch.nn gives on this device, gradients in
    the parameters' and input's dtypes, values close to torch.nn's under the same autocast."""
    ours = cls(8, 16).to(DEVICE)
    ref = ref_cls(8, 16).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 8, device=DEVICE)
    results = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        y, h = _under_bf16_autocast(module, xi, reference=module is ref)
        states = list(h) if isinstance(h, tuple) else [h]
        (y.float().sum() + sum(s.float().sum() for s in states)).backward()
        results.append(([y] + states, [xi.grad] + [p.grad for p in module.parameters()]))
    (outs, grads), (ref_outs, ref_grads) = results
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and rel_err(o, r) < 3e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and rel_err(g, r) < 5e-2


def test_export_of_an_inference_model():
    model = TwoLayer().to(DEVICE).eval()
    x = torch.randn(2, 5, 6, device=DEVICE)
    exported = torch.export.export(model, (x,))
    assert any("rnn_triton" in str(node.target) for node in exported.graph.nodes)
    with torch.no_grad():
        assert rel_err(exported.module()(x), model(x)) < 1e-6


class Bidirectional(torch.nn.Module):
    """A bidirectional LSTM at a cooperative size (on a GPU its two directions run on two streams)."""

    def __init__(self):
        super().__init__()
        self.rnn = rnn_triton.LSTM(6, 512, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(1024, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU: run by bench/gpu_check.sh")
@pytest.mark.parametrize("make,dtype,bound", [(TwoLayer, torch.float32, 1e-5),
                                              (Bidirectional, torch.bfloat16, 1e-2)])
def test_cuda_graph_capture_of_a_training_step(make, dtype, bound):
    model = make().to(DEVICE, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 9, 6, device=DEVICE, dtype=dtype)
    target = torch.randint(0, 3, (4,), device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compile the kernels, allocate .grad
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = torch.nn.functional.cross_entropy(model(x), target)
    assert rel_err(loss, want) < bound


@pytest.mark.parametrize("cell,cls,ref_cls", [("LSTM", rnn_triton.LSTM, torch.nn.LSTM),
                                               ("RNN_TANH", rnn_triton.RNN, torch.nn.RNN)])
def test_autocast_leaves_float64_alone(cell, cls, ref_cls):
    if DEVICE.type != "cpu":
        pytest.skip("float64 kernels run only in the interpreter")
    ours = cls(8, 16).double()
    ref = ref_cls(8, 16).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = ours(x)
        y_ref, _ = ref(x)
    assert y.dtype == y_ref.dtype == torch.float64 and rel_err(y, y_ref) < 1e-10
