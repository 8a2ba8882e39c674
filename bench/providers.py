"""The implementations a benchmark puts side by side, all built from one torch.nn module's weights.

``build(provider, ref, ...)`` returns a callable ``x -> output sequence`` or raises ``Unavailable``
with the reason (a library not installed, a configuration a provider does not cover).
"""
import importlib
import importlib.util

import torch

import rnn_triton

#: cell -> (ours, torch.nn module, torch.nn single-step cell, constructor extras)
CELLS = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, torch.nn.LSTMCell, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, torch.nn.GRUCell, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, torch.nn.RNNCell, {"nonlinearity": "relu"}),
}

PROVIDERS = ["rnn_triton", "torch.nn", "torch-loop", "torch-loop-compiled", "flashrnn", "haste"]


class Unavailable(Exception):
    """This provider cannot run this configuration; the message says why."""


def make_reference(cell, input_size, hidden_size, num_layers, bidirectional, device, dtype):
    _, nn_cls, _, extra = CELLS[cell]
    return nn_cls(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                  **extra).to(device, dtype)


def ours_from(ref, device, dtype):
    """rnn_triton's module of ``ref``'s kind and shape, holding ``ref``'s weights, on ``device`` in ``dtype``."""
    ours_cls, _, _, extra = CELLS[ref.mode]
    ours = ours_cls(ref.input_size, ref.hidden_size, num_layers=ref.num_layers, bidirectional=ref.bidirectional,
                    **extra)
    ours.load_state_dict(ref.state_dict())
    return ours.to(device, dtype)


class CellLoop(torch.nn.Module):
    """What people write without a fused kernel: a Python loop over T steps of torch.nn.*Cell."""

    def __init__(self, ref):
        super().__init__()
        _, _, cell_cls, extra = CELLS[ref.mode]
        self.cell = cell_cls(ref.input_size, ref.hidden_size, **extra).to(ref.weight_ih_l0)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.cell, name).copy_(getattr(ref, name + "_l0"))
        self.is_lstm = ref.mode == "LSTM"

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        state = (h, h) if self.is_lstm else h
        outputs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outputs.append(state[0] if self.is_lstm else state)
        return torch.stack(outputs)


def build(provider, ref, x, on_gpu):
    """A callable computing ``ref``'s output sequence for inputs like ``x`` ([T, B, I])."""
    if provider == "torch.nn":
        return lambda inp: ref(inp)[0]
    if provider == "rnn_triton":
        ours = ours_from(ref, x.device, x.dtype)
        plan = ours.kernel_plan(x)
        if not plan.uses_triton:
            raise Unavailable(plan.reason)
        return lambda inp: ours(inp)[0]
    if provider in ("torch-loop", "torch-loop-compiled"):
        if ref.num_layers != 1 or ref.bidirectional:
            raise Unavailable("the cell loop covers one layer in one direction")
        loop = CellLoop(ref)
        if provider == "torch-loop":
            return loop
        if not on_gpu:
            raise Unavailable("not run on the CPU: compiling the unrolled loop takes minutes there")
        return torch.compile(loop)
    if provider in ("flashrnn", "haste"):
        module = {"flashrnn": "flashrnn", "haste": "haste_pytorch"}[provider]
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed")
        return (_build_haste if provider == "haste" else _build_flashrnn)(ref, x, on_gpu)
    raise ValueError(f"unknown provider {provider!r}")


# Other libraries, built from the same torch.nn weights. Their layouts are taken from their sources, cited
# as repository:path; tests/test_bench_adapters.py re-implements one step of each library's equations in
# torch and checks the mappings below against torch.nn's cells, so they are tested without the libraries.

def _layer0_weights(ref, library):
    """``ref``'s (weight_ih, weight_hh, bias_ih, bias_hh), detached; Unavailable beyond one layer, one way."""
    if ref.num_layers != 1 or ref.bidirectional:
        raise Unavailable(f"{library} runs one layer in one direction per module")
    if getattr(ref, "proj_size", 0):
        raise Unavailable(f"{library} has no LSTM projection")
    w_ih, w_hh = ref.weight_ih_l0.detach(), ref.weight_hh_l0.detach()
    if ref.bias:
        b_ih, b_hh = ref.bias_ih_l0.detach(), ref.bias_hh_l0.detach()
    else:
        b_ih = b_hh = w_ih.new_zeros(w_ih.shape[0])
    return w_ih, w_hh, b_ih, b_hh


def _regate(w, order, new_order):
    """``w``'s gate blocks (along dim 0) from ``order`` to ``new_order``, e.g. "ifgo" -> "igfo"."""
    blocks = dict(zip(order, w.chunk(len(order), dim=0)))
    return torch.cat([blocks[g] for g in new_order], dim=0)


def _probe(fn, x, params, library):
    """One forward and backward before anything is timed: a JIT build happens here, and a configuration the
    library rejects (dtype, size, GPU) becomes Unavailable instead of stopping the whole run."""
    params = list(params)
    probe_x = x.detach().clone().requires_grad_(True)
    try:
        fn(probe_x).float().sum().backward()
        if probe_x.is_cuda:
            torch.cuda.synchronize(probe_x.device)
    except Unavailable:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the library raises, this configuration is out
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise Unavailable(f"{library} failed here: {type(error).__name__}: {first_line}") from error
    finally:
        for p in params:
            p.grad = None


# --- haste (github.com/lmnt-com/haste, python package haste_pytorch) ---
#
# Facts used, all from lmnt-com/haste:
# * frameworks/pytorch/lstm.py: LSTM(input_size, hidden_size, batch_first=False, forget_bias=1.0,
#   dropout=0.0, zoneout=0.0); parameters kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H] (one bias),
#   gate order i,g,f,o; v = h @ recurrent_kernel + x @ kernel + bias (LSTMScript, and the CUDA kernel in
#   lib/lstm_forward_gpu.cu.cc: i,g,f,o at offsets 0..3 H); its from_native_weights transposes torch's
#   weights, reorders i,f,g,o -> i,g,f,o and adds bias_ih + bias_hh.
# * frameworks/pytorch/gru.py: GRU(input_size, hidden_size, batch_first=False, dropout=0.0, zoneout=0.0);
#   kernel [I, 3H], recurrent_kernel [H, 3H], bias [3H], recurrent_bias [3H], gate order z,r,h;
#   z = sigmoid(Wx_z + Rh_z + b_z + rb_z), r likewise, g = tanh(Wx_g + b_g + r * (Rh_g + rb_g)) (reset
#   after the matmul, as cuDNN and torch.nn; lib/gru_forward_gpu.cu.cc), h' = z * h + (1 - z) * g;
#   from_native_weights reorders r,z,n -> z,r,n and keeps the two biases apart.
# * forward(input, state=None, lengths=None) -> (output, state), input [T, B, I] unless batch_first,
#   output = h[1:] [T, B, H] (LSTM.forward / GRU.forward; older releases: forward(input), same output).
# * frameworks/pytorch/lstm.cc, gru.cc: AT_DISPATCH_FLOATING_TYPES, so float32/float64 only; the module
#   runs its CUDA op only when its parameters are on a GPU (BaseRNN._is_cuda in base_rnn.py).
# * No Elman RNN (IndRNN's recurrence is diagonal: frameworks/pytorch/indrnn.py), no layer stacks, no
#   bidirectional module.

HASTE_GATES = {"LSTM": ("ifgo", "igfo"), "GRU": ("rzn", "zrn")}


def haste_weights_from_torch(ref):
    """The parameters haste's LSTM/GRU holds for torch.nn module ``ref``: {name: tensor}."""
    if ref.mode not in HASTE_GATES:
        raise Unavailable("haste has no plain tanh/relu RNN (its IndRNN has a diagonal recurrence)")
    w_ih, w_hh, b_ih, b_hh = _layer0_weights(ref, "haste")
    order, haste_order = HASTE_GATES[ref.mode]
    weights = {"kernel": _regate(w_ih, order, haste_order).t().contiguous(),
               "recurrent_kernel": _regate(w_hh, order, haste_order).t().contiguous()}
    if ref.mode == "LSTM":
        weights["bias"] = _regate(b_ih + b_hh, order, haste_order).contiguous()
    else:
        weights["bias"] = _regate(b_ih, order, haste_order).contiguous()
        weights["recurrent_bias"] = _regate(b_hh, order, haste_order).contiguous()
    return weights


def haste_layer(ref, haste):
    """haste's LSTM or GRU (``haste``: the haste_pytorch module) computing ``ref``, on ``ref``'s device."""
    weights = haste_weights_from_torch(ref)
    layer = getattr(haste, ref.mode)(ref.input_size, ref.hidden_size, batch_first=False)
    layer.to(ref.weight_ih_l0.device, ref.weight_ih_l0.dtype)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(layer, name).copy_(w)
    return layer  # training mode (its backward requires it); dropout and zoneout are 0


def _build_haste(ref, x, on_gpu):
    haste_weights_from_torch(ref)  # the cells and layouts haste covers
    if x.dtype not in (torch.float32, torch.float64):
        raise Unavailable("haste's kernels take float32/float64 only")
    if not (on_gpu and x.is_cuda):
        raise Unavailable("haste's kernels are CUDA-only (on the CPU it falls back to a Python loop)")
    try:
        import haste_pytorch
    except Exception as error:  # noqa: BLE001 - a CUDA extension built for another torch, say
        raise Unavailable(f"haste_pytorch does not import: {type(error).__name__}: {error}") from error
    layer = haste_layer(ref, haste_pytorch)

    def fn(inp):
        return layer(inp)[0]
    _probe(fn, x, layer.parameters(), "haste")
    return fn


# --- FlashRNN (github.com/NX-AI/flashrnn, python package flashrnn) ---
#
# Facts used, all from NX-AI/flashrnn:
# * flashrnn/flashrnn/flashrnn.py: flashrnn(Wx, R, b, states=None, function="lstm", config=None,
#   backend="cuda_fused", dtype="bfloat16") -> (states, last_states), a function with no parameters of its
#   own; default layouts (FlashRNNConfig): Wx "BTGHD" [B, T, gates, heads, head_dim] (the input projection
#   W x, computed outside), R "GHDP" [gates, heads, head_dim, head_dim], b "GHD", states "SBTHD" with
#   state 0 the hidden state y (README.md: "hidden_state = states[0]"); backends "vanilla",
#   "vanilla_fwbw", "cuda", "cuda_fused", "triton_fused"; functions "lstm", "gru", "elman", "slstm";
#   "gru" on cuda_fused is switched to "cuda" by the library itself; dtype is the kernel's dtype.
# * flashrnn/flashrnn/vanilla/__init__.py (flashrnn_forward): R goes to "HPGD" and Ry = y @ R per head,
#   so Ry[g, d] = sum_p R[g, h, d, p] y[p]: R[g, 0] is torch's [out, in] block of gate g.
# * flashrnn/flashrnn/vanilla/lstm.py and fused/lstm_fused_pointwise.cuh: gates i,f,z,o (torch's i,f,g,o),
#   raw = Wx + Ry + b, states (y, c).
# * flashrnn/flashrnn/vanilla/gru.py and alternating/gru_pointwise.cu: 3 input gates r,z,n; 3 recurrent
#   gates g,r,z (g: the recurrent part of n); 4 biases g,r,z,n; y' = z * y + (1 - z) * tanh(n_x + b_n +
#   r * (Ry_g + b_g)) -- torch's reset-after GRU with b_g = b_hn, b_n = b_in.
# * flashrnn/flashrnn/vanilla/elman.py and fused/elman_fused_pointwise.cuh: y' = tanh(Wx + Ry + b), no ReLU.
# * README.md: from flashrnn import flashrnn (the repository's own scripts import flashrnn.flashrnn);
#   CUDA compute capability 8.0 or later; triton_fused only for head_dim <= 64; heads split the hidden
#   state (a block-diagonal R), so torch.nn's dense W_hh is one head of head_dim = hidden_size.

#: Which FlashRNN kernel the benchmark runs (its default and fastest; GRU runs "cuda", see above).
FLASHRNN_BACKEND = "cuda_fused"
FLASHRNN_FUNCTIONS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "elman"}
FLASHRNN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def flashrnn_weights_from_torch(ref):
    """(function, W, R, b) for torch.nn module ``ref``: Wx = x @ W.T is FlashRNN's input ("BTGHD" once
    reshaped), R [gates, 1, H, H] ("GHDP", one head) and b [gates, 1, H] ("GHD")."""
    if ref.mode not in FLASHRNN_FUNCTIONS:
        raise Unavailable("FlashRNN's Elman cell is tanh only")
    w_ih, w_hh, b_ih, b_hh = _layer0_weights(ref, "flashrnn")
    H = ref.hidden_size
    if ref.mode == "GRU":
        R = _regate(w_hh, "rzn", "nrz")
        b_ir, b_iz, b_in = b_ih.chunk(3)
        b_hr, b_hz, b_hn = b_hh.chunk(3)
        b = torch.cat([b_hn, b_ir + b_hr, b_iz + b_hz, b_in])
    else:  # LSTM: FlashRNN's i,f,z,o is torch's i,f,g,o; Elman: one gate
        R, b = w_hh, b_ih + b_hh
    return (FLASHRNN_FUNCTIONS[ref.mode], w_ih.clone(), R.reshape(-1, 1, H, H).clone(),
            b.reshape(-1, 1, H).clone())


class FlashRNNLayer(torch.nn.Module):
    """torch.nn module ``ref`` as a call of FlashRNN's function ``flashrnn_fn``: [T, B, I] -> [T, B, H]."""

    def __init__(self, ref, flashrnn_fn, backend=FLASHRNN_BACKEND):
        super().__init__()
        self.function, W, R, b = flashrnn_weights_from_torch(ref)
        self.weight, self.R, self.b = (torch.nn.Parameter(t) for t in (W, R, b))
        self.flashrnn_fn, self.backend = flashrnn_fn, backend

    def forward(self, x):
        T, B, _ = x.shape
        H = self.R.shape[-1]
        wx = torch.matmul(x.transpose(0, 1), self.weight.t()).reshape(B, T, -1, 1, H)  # "BTGHD", one head
        states, _ = self.flashrnn_fn(wx, self.R, self.b, function=self.function, backend=self.backend,
                                     dtype=str(x.dtype).removeprefix("torch."))
        return states[0, :, :, 0].transpose(0, 1)  # "SBTHD": state 0 is the hidden state


def _build_flashrnn(ref, x, on_gpu):
    flashrnn_weights_from_torch(ref)  # the cells and layouts FlashRNN covers
    if x.dtype not in FLASHRNN_DTYPES:
        raise Unavailable("FlashRNN's kernels take float32, float16 and bfloat16")
    if not (on_gpu and x.is_cuda):
        raise Unavailable("FlashRNN's kernels need CUDA")
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        raise Unavailable("FlashRNN needs CUDA compute capability 8.0 or later")
    try:  # flashrnn.flashrnn is the function's module (pip layout) or its package (the repository's layout)
        flashrnn_fn = importlib.import_module("flashrnn.flashrnn").flashrnn
    except Exception as error:  # noqa: BLE001
        raise Unavailable(f"flashrnn does not import: {type(error).__name__}: {error}") from error
    layer = FlashRNNLayer(ref, flashrnn_fn).to(x.device)
    _probe(layer, x, layer.parameters(), "flashrnn")
    return layer
