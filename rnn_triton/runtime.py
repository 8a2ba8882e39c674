"""Process-wide switches read from the environment, and the kernel launch counter."""
import os
import warnings
import weakref
from collections import Counter

#: How many times each Triton kernel was launched in this process; tests read it to prove a kernel ran.
launches: Counter = Counter()


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def strict() -> bool:
    """True when RNN_TRITON_STRICT=1: a fallback to torch raises instead of running silently."""
    return os.environ.get("RNN_TRITON_STRICT", "0") not in ("", "0")


def interpreter_ready() -> bool:
    """False when TRITON_INTERPRET=1 was set only after triton was imported (rnn_triton imports it):
    ``@triton.jit`` decides at decoration whether a function runs in the interpreter, so triton's own
    functions and ours were then built for a GPU, and no kernel can run on the CPU."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import cells
    return all(isinstance(f, InterpretedFunction) for f in (tl.standard.sigmoid, cells._sigmoid))


def round_bfloat16_to_nearest_even() -> None:
    """Make the interpreter's float32 -> bfloat16 cast round to nearest even, as the GPU's does
    (``cvt.rn.bf16.f32``; torch's too). Triton 3.9's interpreter drops the low 16 bits (rounds toward
    zero): every stored bfloat16 h then shrinks by half an ulp on average, a bias a recurrence
    compounds step after step; through a ReLU RNN's backward that made our bfloat16 gradients 3-6x
    torch's own error, an artifact of the interpreter, not of the kernels."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_to_nearest_even", False):
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return truncating(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # ties to even; may carry to inf
        nan = np.isnan(src.data)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a NaN stays a (quiet) NaN
        return interpreter.TensorHandle(rounded.reshape(np.shape(src.data)), tl.bfloat16)

    cast_impl.rounds_to_nearest_even = True
    builder.cast_impl = cast_impl


class FallbackWarning(UserWarning):
    """A module of ours ran torch.nn's own code for a call, not a Triton kernel (``kernel_plan``'s
    reason says why). Filter it like any warning: ``warnings.simplefilter("ignore",
    rnn_triton.FallbackWarning)``; ``RNN_TRITON_STRICT=1`` makes the fallback an error instead."""


#: The fallback reasons each module has been warned of (weakly keyed: no state on the module itself).
_warned = weakref.WeakKeyDictionary()


def warn_fallback(module, reason: str) -> None:
    """Warn that ``module`` runs torch.nn's code, once per module and reason. Not while torch.compile
    traces the call: Dynamo cannot trace ``warnings.warn`` (a graph break; ``fullgraph=True`` would
    fail), so a compiled fallback is silent: ``kernel_plan`` or strict mode tells."""
    import torch
    if torch.compiler.is_compiling():
        return
    seen = _warned.setdefault(module, set())
    if reason in seen:
        return
    seen.add(reason)
    warnings.warn(f"rnn_triton.{type(module).__name__} runs torch.nn's own implementation for this call "
                  f"(shown once per module and reason): {reason}", FallbackWarning, stacklevel=_user_level())


def _user_level() -> int:
    """The ``stacklevel`` of the first frame outside rnn_triton and torch.nn's module machinery, as
    seen from ``warn_fallback``'s ``warnings.warn``: the user's call of the module."""
    import sys

    import torch.nn
    inside = (os.path.dirname(__file__), os.path.dirname(torch.nn.__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
