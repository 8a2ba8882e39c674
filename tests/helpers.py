"""Shared checks: run a module of ours and its torch.nn twin in float64 on the same data, compare all."""
import copy

import pytest
import torch

from rnn_triton import runtime

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
#: Gradient bound of ReLU cells in float16/bfloat16. ReLU's derivative jumps at 0: a pre-activation
#: within rounding of 0 takes the other side and a whole gradient entry flips, and the flip changes
#: every later step. A handful of flips puts 1e-2 to 5e-2 on torch.nn's own half-precision gradients
#: and, by the luck of the draw, up to about 0.11 on ours (seen once in some 500 runs).
RELU_HALF_GRAD_TOLERANCE = 0.25


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

    before = dict(runtime.launches)
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
        if getattr(ours, "mode", "") == "RNN_RELU":
            bounds = bounds[: len(outs)] + [max(b, RELU_HALF_GRAD_TOLERANCE) for b in bounds[len(outs):]]

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
