"""FlashRNN's function, on this project's kernels: switch with one import.

    from flashrnn import flashrnn          # before: a C++/CUDA extension compiled per size and dtype
    from rnn_triton.flashrnn import flashrnn   # after: the same call, the same tensors, Triton kernels

``flashrnn(Wx, R, b, states=None, function="lstm")`` takes FlashRNN's default layouts and returns what
it returns (its ``vanilla`` backend's equations, gate orders and state layouts; see ``heads``):

    Wx      [B, T, G, NH, DH]  the input part of each gate's pre-activation, per head
    R       [G_R, NH, DH, DH]  the recurrent weights, per gate and head (R[g, j] @ h_j)
    b       [G_B, NH, DH]      the biases
    states  [S, B, 1, NH, DH]  the initial states (None: zeros)
    returns (states over time [S, B, T, NH, DH], final states [S, B, 1, NH, DH])

function  G  G_R  G_B  S  states
lstm      4   4    4   2  h, c             gates i, f, z, o (torch.nn's i, f, g, o)
gru       3   3    4   1  h                Wx: r, z, n; R: n, r, z; b: R's n part, r, z, Wx's n part
elman     1   1    1   1  h                h' = tanh(Wx + R h + b)
slstm     4   4    4   4  h, c, n, m       gates i, f, z, o (kernels/cells.py slstm_forward)

Every output and every gradient (of Wx, R, b and states, through the states over time too) comes from
the kernels. ``backend`` and ``dtype`` are accepted and ignored: the kernels run in the tensors' dtype
(float16, bfloat16, float32; float64 in the interpreter). A ``config`` is read for its ``function``;
layouts other than FlashRNN's defaults are refused. Head sizes up to the tile-persistent kernel's limit
run the kernels (``dispatch.TILE_CONFIGS``); past it, torch's loop over the steps (a FallbackWarning;
RNN_TRITON_STRICT=1: NotImplementedError).
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, runtime
from .heads import headed_layer

#: FlashRNN's functions: (our cell, gates of Wx, of R, of b, states)
FUNCTIONS = {"lstm": ("LSTM", 4, 4, 4, 2), "gru": ("GRU", 3, 3, 4, 1), "elman": ("RNN_TANH", 1, 1, 1, 1),
             "slstm": ("SLSTM", 4, 4, 4, 4)}
_DEFAULT_SHAPES = {"input_shape": "BTGHD", "output_shape": "SBTHD", "recurrent_shape": "GHDP", "bias_shape": "GHD"}


def flashrnn(Wx: Tensor, R: Tensor, b: Tensor, states: Optional[Tensor] = None, function: str = "lstm",
             config=None, backend: str = "cuda_fused", dtype: str = "bfloat16"):
    """FlashRNN's ``flashrnn`` (see the module docstring): (states over time, final states)."""
    if config is not None:
        function = config.function
        for name, default in _DEFAULT_SHAPES.items():
            if getattr(config, name, default) != default:
                raise ValueError(f"rnn_triton.flashrnn takes FlashRNN's default layouts only: {name} "
                                 f"{getattr(config, name)!r} (want {default!r})")
    if function not in FUNCTIONS:
        raise ValueError(f"function must be one of {', '.join(FUNCTIONS)}, got {function!r}")
    cell, G, G_R, G_B, S = FUNCTIONS[function]
    for name, t, rank in (("Wx", Wx, 5), ("R", R, 4), ("b", b, 3)):
        if not isinstance(t, Tensor) or t.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    B, T, _, NH, DH = Wx.shape
    want = {"Wx": (B, T, G, NH, DH), "R": (G_R, NH, DH, DH), "b": (G_B, NH, DH), "states": (S, B, 1, NH, DH)}
    for name, t in (("Wx", Wx), ("R", R), ("b", b), ("states", states)):
        if t is not None and tuple(t.shape) != want[name]:
            raise ValueError(f"{function}: {name} must be {list(want[name])} (from Wx [B, T, G, NH, DH]), got "
                             f"{list(t.shape)}")
        if t is not None and (t.dtype != Wx.dtype or t.device != Wx.device):
            raise ValueError(f"{name} ({t.dtype} on {t.device}) must have Wx's dtype and device "
                             f"({Wx.dtype} on {Wx.device})")
    if T == 0:
        raise ValueError("Wx has no time steps (T = 0)")
    H = NH * DH
    b_hn = None
    if function == "gru":  # to torch.nn's GRU: gates r, z, n; b_hn (R's n part) inside r * (...)
        xp = Wx + b[1:][None, None]
        R = torch.cat([R[1:], R[:1]])
        b_hn = b[0].flatten()
    else:
        xp = Wx + b[None, None]
    h0 = c0 = None
    if states is not None:
        h0 = states[0, :, 0].flatten(-2)
        c0 = states[1:, :, 0].flatten(-2) if S > 1 else None
    plan = dispatch.choose(cell, DH, Wx.dtype, Wx.device, B, heads=NH)
    if not plan.uses_triton:
        if runtime.strict():
            raise NotImplementedError(f"rnn_triton.flashrnn: {plan.reason}")
        warnings.warn(f"rnn_triton.flashrnn runs torch's loop over the steps for this call: {plan.reason}",
                      runtime.FallbackWarning, stacklevel=2)
    y, hn, cn, cs = headed_layer(cell, xp.flatten(2), R, b_hn, h0, c0, plan, batch_first=True, states=True)
    over_time = [y] + ([] if cs is None else list(cs.transpose(1, 2).unbind(0)))
    final = [hn] + ([] if cn is None else list(cn.unbind(0)))
    return (torch.stack(over_time).unflatten(-1, (NH, DH)),
            torch.stack(final)[:, :, None].unflatten(-1, (NH, DH)))
