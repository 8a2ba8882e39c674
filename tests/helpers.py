"""Shared checks: run a module of ours and its torch.nn twin in float64 on the same data, compare all."""
import copy
from contextlib import contextmanager, nullcontext

import pytest
import torch

from rnn_triton import modules, runtime

#: Where our modules run: the GPU in compiled mode (the GPU check script), else the CPU interpreter.
#: The float64 torch.nn reference always runs on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not runtime.interpreting() else "cpu")

#: float64 goes through the kernels only in the interpreter (gradcheck and exact-math tests).
interpreter_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="float64 kernels run only in the interpreter")

#: Relative error bounds, ||ours - torch_fp64|| / ||torch_fp64|| per tensor, by storage dtype.
#: In float16/bfloat16 a tensor may also be off by up to twice torch.nn's own error in that dtype:
#: through a long ReLU chain even torch's bfloat16 input gradient is 2-4e-2 off float64.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
HALF_TYPES = (torch.float16, torch.bfloat16)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.cpu().double(), ref.cpu().double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def twin(ours: torch.nn.Module, ref_cls) -> torch.nn.Module:
    """The torch.nn module with our module's constructor arguments and weights, in float64."""
    ref = ref_cls(ours.input_size, ours.hidden_size, num_layers=ours.num_layers, bias=ours.bias,
                  batch_first=ours.batch_first, dropout=ours.dropout,
                  bidirectional=ours.bidirectional, **_extra_args(ours)).double()
    ref.load_state_dict({k: v.cpu().double() for k, v in ours.state_dict().items()})
    return ref.train(ours.training)


def _extra_args(module):
    if isinstance(module, torch.nn.LSTM):
        return {"proj_size": module.proj_size}
    if isinstance(module, torch.nn.RNN):
        return {"nonlinearity": module.nonlinearity}
    return {}


def compare_with_torch(ours: torch.nn.Module, ref_cls, x: torch.Tensor, hx, seed: int,
                       expect_kernels: bool = True):
    """Forward and backward through ``ours`` (in its dtype) and its float64 torch.nn twin, with random
    output gradients; assert every output and every gradient (input, states, parameters) agree.

    ``x`` and ``hx`` are float64; ours gets them cast to its dtype, torch the cast values back in
    float64, so both see exactly the same numbers.
    """
    dtype = next(ours.parameters()).dtype
    ref = twin(ours, ref_cls)
    is_lstm = isinstance(ours, torch.nn.LSTM)
    states = [] if hx is None else (list(hx) if is_lstm else [hx])
    ours.to(DEVICE)
    ours_in = [t.to(DEVICE, dtype).detach().requires_grad_() for t in [x] + states]
    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours_in]

    def call(module, inputs):
        hx_arg = None if hx is None else (tuple(inputs[1:]) if is_lstm else inputs[1])
        y, h = module(inputs[0], hx_arg)
        return [y] + (list(h) if is_lstm else [h])

    relu_half = getattr(ours, "mode", "") == "RNN_RELU" and dtype in HALF_TYPES
    on_pattern = copy.deepcopy(ref) if relu_half else None
    before = dict(runtime.launches)
    with recorded_layer_outputs() if relu_half else nullcontext([]) as layer_outputs:  # only ReLU needs them
        outs = call(ours, ours_in)
    refs = call(ref, ref_in)
    grads = [torch.randn_like(r) for r in refs]
    sum((o.cpu().double() * g).sum() for o, g in zip(outs, grads)).backward()
    sum((r * g).sum() for r, g in zip(refs, grads)).backward()
    ours_grads = [t.grad for t in ours_in] + [p.grad for p in ours.parameters()]
    ref_grads = [t.grad for t in ref_in] + [p.grad for p in ref.parameters()]
    names = ["output", "h_n", "c_n"][: len(outs)] + [f"grad of input {i}" for i in range(len(ours_in))] \
        + [f"grad of {n}" for n, _ in ours.named_parameters()]
    bounds = [TOLERANCE[dtype]] * len(names)
    if dtype in HALF_TYPES:
        torch_errs = _torch_errors_in(dtype, ref, ref_in, call, grads, refs + ref_grads)
        bounds = [max(b, 2 * e) for b, e in zip(bounds, torch_errs)]
    if relu_half:
        # ReLU's derivative jumps at 0: in half precision a few pre-activations within rounding of 0
        # land on the other side than in float64 (torch's own half-precision run too), and each flip
        # moves the gradient of every earlier step, by up to 0.25 relative. So the gradients are
        # checked against float64 on ReLU's on/off pattern as our forward computed it, at the dtype's
        # own bound; the outputs, continuous in the flips, still against torch.nn.
        pattern_in = [t.detach().cpu().double().requires_grad_() for t in ours_in]
        got = relu_rnn_on_pattern(on_pattern, pattern_in[0], pattern_in[1] if len(pattern_in) > 1 else None,
                                  [(y.cpu() > 0).double() for y in layer_outputs])
        sum((r * g).sum() for r, g in zip(got, grads)).backward()
        ref_grads = [t.grad for t in pattern_in] + [p.grad for p in on_pattern.parameters()]
        bounds = bounds[: len(outs)] + [TOLERANCE[dtype]] * len(ref_grads)

    for name, o, r in zip(names, outs, refs):
        assert o.dtype == dtype and o.shape == r.shape, f"{name}: {o.dtype} {o.shape} vs {r.shape}"
    for name, o, r, bound in zip(names, outs + ours_grads, refs + ref_grads, bounds):
        assert o is not None and o.dtype == dtype, f"{name} missing or not {dtype}"
        err = rel_err(o, r)
        assert err < bound, f"{name}: rel err {err:.2e} >= {bound:.1e} (seed {seed}, dtype {dtype})"
    for p in ours.parameters():
        p.grad = None
    if expect_kernels:
        assert kernel_launches("fwd") > kernel_launches("fwd", before), "no forward kernel ran"
        assert kernel_launches("bwd") > kernel_launches("bwd", before), "no backward kernel ran"
    return outs


def kernel_launches(direction: str, counts=None) -> int:
    """Launches of any variant's ``direction`` ("fwd" or "bwd") kernel, now or in a saved copy."""
    counts = runtime.launches if counts is None else counts
    return sum(n for name, n in counts.items() if name.endswith("_" + direction))


def _torch_errors_in(dtype, ref, ref_in, call, grads, exact):
    """torch.nn's own relative errors when it runs the same computation in ``dtype`` on the CPU."""
    low = copy.deepcopy(ref)
    low.zero_grad(set_to_none=True)
    low.to(dtype)
    inputs = [t.detach().to(dtype).requires_grad_() for t in ref_in]
    outs = call(low, inputs)
    sum((o.double() * g).sum() for o, g in zip(outs, grads)).backward()
    got = outs + [t.grad for t in inputs] + [p.grad for p in low.parameters()]
    return [rel_err(a, b) for a, b in zip(got, exact)]


@contextmanager
def recorded_layer_outputs():
    """Collects each layer's output (all its directions) as our modules compute it, in the order run."""
    seen = []
    original = modules.recurrent_directions

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0].detach())
        return out

    modules.recurrent_directions = recording
    try:
        yield seen
    finally:
        modules.recurrent_directions = original


def relu_rnn_on_pattern(ref: torch.nn.RNN, x: torch.Tensor, hx, patterns, lengths=None):
    """torch.nn.RNN(nonlinearity="relu")'s forward in float64 with ReLU's on/off pattern given:

        h_t = m_t * (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),   m_t = 1 where the given h_t > 0, else 0

    ``patterns``: per layer, that layer's output ([T, B, D*H], or [B, T, D*H] when batch_first) whose
    signs set m. Away from the flips this is torch.nn's function; its gradient is the exact gradient
    of the piecewise-linear function our half-precision forward selected. ``lengths`` (a list, padded
    ``x``): row b steps only for t < lengths[b], as a PackedSequence does (the reverse direction starts
    at its own last element; h_n is its last state; the output past its end is 0). Returns (output, h_n)."""
    unbatched = x.dim() == 2
    if unbatched:
        x, hx = x.unsqueeze(1), (None if hx is None else hx.unsqueeze(1))
    if ref.batch_first:
        x, patterns = x.transpose(0, 1), [m.transpose(0, 1) for m in patterns]
    T, B, H = x.shape[0], x.shape[1], ref.hidden_size
    D = 2 if ref.bidirectional else 1
    steps = torch.full((B,), T) if lengths is None else torch.tensor(lengths)
    live = (torch.arange(T)[:, None, None] < steps[None, :, None]).to(x.dtype)  # [T, B, 1]: row b has step t
    hn = []
    for layer in range(ref.num_layers):
        outputs = []
        for d in range(D):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(ref, "weight_ih" + suffix), getattr(ref, "weight_hh" + suffix)
            bias = getattr(ref, "bias_ih" + suffix) + getattr(ref, "bias_hh" + suffix) if ref.bias else 0
            h = hx[layer * D + d] if hx is not None else x.new_zeros(B, H)
            ys = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                step = (x[t] @ w_ih.T + bias + h @ w_hh.T) * patterns[layer][t, :, d * H:(d + 1) * H]
                h = live[t] * step + (1 - live[t]) * h
                ys[t] = live[t] * step
            outputs.append(torch.stack(ys))
            hn.append(h)
        x = torch.cat(outputs, -1)
    y, hn = (x.transpose(0, 1) if ref.batch_first else x), torch.stack(hn)
    return [y.squeeze(1), hn.squeeze(1)] if unbatched else [y, hn]
