"""Which kernel serves a call, with which configuration, or why none does.

Plain Python, no kernels: ``choose`` looks at the cell, H, B, dtype and device and returns a ``Plan``.
The largest hidden size per (cell, dtype) is ``MAX_HIDDEN``; those numbers come from the sm_90
compile check (``python -m rnn_triton.compile_check``): every configuration ``choose`` can return
compiles there with no spills and within the shared-memory limit, and the next size up does not.
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

#: Largest hidden size of the tile-persistent kernels, per cell and storage dtype (forward and backward
#: both fit), read off the sm_90 compile check. H pads to the next power of two on chip.
MAX_HIDDEN = {
    ("LSTM", torch.float16): 128,
    ("LSTM", torch.bfloat16): 128,
    ("LSTM", torch.float32): 64,
}

#: The batch rows one program owns. 16 is the smallest M of a tensor-core dot.
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


def num_warps_for(block_h: int) -> int:
    # From the compile check: 4 warps spill at BLOCK_H = 128; 8 warps never spill up to the limit.
    return 4 if block_h <= 32 else 8


def max_hidden(cell: str, dtype: torch.dtype) -> int:
    key_dtype = torch.float32 if dtype == torch.float64 else dtype  # float64: interpreter only
    return MAX_HIDDEN.get((cell, key_dtype), 0)


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
    limit = max_hidden(cell, dtype)
    if hidden_size > limit:
        return Plan(None, f"hidden_size={hidden_size} is above the tile-persistent kernel's limit "
                          f"{limit} for {cell} in {dtype}")
    block_h = block_h_for(hidden_size)
    return Plan(KernelConfig("tile-persistent", BLOCK_B, block_h, num_warps_for(block_h)))
