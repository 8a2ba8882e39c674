"""Which kernel serves a call, with which configuration, or why none does.

Plain Python, no kernels: ``choose`` looks at the cell, H, B, dtype and device and returns a ``Plan``.
The configurations per (cell, dtype) are ``TILE_CONFIGS``; they come from the sm_90 compile check
(``python -m rnn_triton.compile_check``): every configuration ``choose`` can return compiles there with
no spills and within the shared-memory limit, and the next size up does not.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import runtime


@dataclass(frozen=True)
class Cell:
    """Static facts about a cell kind, as the kernels see it."""
    name: str
    kernel_id: int    # kernels.cells: LSTM=0, GRU=1, RNN_TANH=2, RNN_RELU=3
    num_gates: int    # gate blocks in W_ih / W_hh
    num_saved: int    # fp32 slots per step saved for backward


CELLS = {
    "LSTM": Cell("LSTM", 0, 4, 4),
    "GRU": Cell("GRU", 1, 3, 4),
    "RNN_TANH": Cell("RNN_TANH", 2, 1, 1),
    "RNN_RELU": Cell("RNN_RELU", 3, 1, 1),
}

#: The tile-persistent kernel's configurations, per cell and storage dtype: {BLOCK_H: (num_warps,
#: any_h)}, read off the sm_90 compile check (``python -m rnn_triton.compile_check``). H pads to
#: BLOCK_H, the next power of two. any_h False: only for H a multiple of 16, where Triton specialises
#: every size and stride as 16-divisible and the weight loads vectorise; other H at that BLOCK_H spill.
_LSTM_HALF = {16: (4, True), 32: (8, True), 64: (8, True), 128: (8, False)}
_GRU_HALF = {16: (4, True), 32: (8, True), 64: (8, True), 128: (8, True)}
_RNN_HALF = {16: (4, True), 32: (4, True), 64: (8, True), 128: (8, True), 256: (8, False)}
_RNN_FP32 = {16: (4, True), 32: (4, True), 64: (8, True)}
TILE_CONFIGS = {
    ("LSTM", torch.float16): _LSTM_HALF,
    ("LSTM", torch.bfloat16): _LSTM_HALF,
    ("LSTM", torch.float32): {16: (4, True), 32: (16, False), 64: (8, False)},
    ("GRU", torch.float16): _GRU_HALF,
    ("GRU", torch.bfloat16): _GRU_HALF,
    ("GRU", torch.float32): {16: (4, True), 32: (8, True), 64: (8, False)},
    ("RNN_TANH", torch.float16): _RNN_HALF,
    ("RNN_TANH", torch.bfloat16): _RNN_HALF,
    ("RNN_TANH", torch.float32): _RNN_FP32,
    ("RNN_RELU", torch.float16): _RNN_HALF,
    ("RNN_RELU", torch.bfloat16): _RNN_HALF,
    ("RNN_RELU", torch.float32): _RNN_FP32,
}

#: The batch rows one program owns. 16 is the smallest N of a tensor-core dot.
BLOCK_B = 16

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    variant: str      # "tile-persistent"
    block_b: int
    block_h: int
    num_warps: int


@dataclass(frozen=True)
class Plan:
    """The kernel that will run, or ``reason`` why torch's implementation runs instead."""
    config: Optional[KernelConfig]
    reason: Optional[str] = None

    @property
    def uses_triton(self) -> bool:
        return self.config is not None


def block_h_for(hidden_size: int) -> int:
    """Hidden units padded to a power of two, at least 16 (the smallest K and N of a dot)."""
    return max(16, 1 << (hidden_size - 1).bit_length())


def max_hidden(cell: str, dtype: torch.dtype, multiple_of_16: bool = True) -> int:
    """Largest hidden size the tile-persistent kernel takes (for H a multiple of 16, or any H)."""
    configs = TILE_CONFIGS.get((cell, torch.float32 if dtype == torch.float64 else dtype), {})
    return max((bh for bh, (_, any_h) in configs.items() if any_h or multiple_of_16), default=0)


def choose(cell: str, hidden_size: int, dtype: torch.dtype, device: torch.device) -> Plan:
    """The plan for one layer of ``cell`` with ``hidden_size`` units on ``device`` in ``dtype``."""
    if device.type == "cpu":
        if not runtime.interpreting():
            return Plan(None, "CPU tensors run through Triton only under TRITON_INTERPRET=1")
    elif device.type != "cuda":
        return Plan(None, f"device type {device.type!r} is not supported by the Triton kernels")
    if dtype == torch.float64 and not runtime.interpreting():
        return Plan(None, "float64 runs through the Triton kernels only in the interpreter")
    if dtype not in GPU_DTYPES + (torch.float64,):
        return Plan(None, f"dtype {dtype} is not supported (float16, bfloat16, float32)")
    # float64 runs only in the interpreter; it takes float32's sizes, as the GPU would.
    configs = TILE_CONFIGS.get((cell, torch.float32 if dtype == torch.float64 else dtype), {})
    block_h = block_h_for(hidden_size)
    if block_h not in configs or not (configs[block_h][1] or hidden_size % 16 == 0):
        return Plan(None, f"hidden_size={hidden_size} is above the tile-persistent kernel's limit for "
                          f"{cell} in {dtype}: {max_hidden(cell, dtype, False)}, or "
                          f"{max_hidden(cell, dtype, True)} for multiples of 16")
    return Plan(KernelConfig("tile-persistent", BLOCK_B, block_h, configs[block_h][0]))
