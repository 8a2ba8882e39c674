"""Which kernel serves a call, with which configuration, or why none does.

Plain Python, no kernels: ``choose`` looks at the cell, H, B, dtype and device and returns a ``Plan``.
Three variants, by on-chip capacity:

- tile-persistent: one program per 16 batch rows holds all of W_hh (``TILE_CONFIGS``), small H;
- cooperative: programs split the hidden units 16 at a time and meet at a grid barrier each step
  (``COOP_CONFIGS``); only when every program is resident at once, which the capacity model
  (``resident_blocks``) works out from the device's SMs, registers and shared memory and the kernel's
  measured use of them;
- stepwise: the cooperative kernel launched once per step, where the grid would not be resident, and
  in the interpreter (which runs programs one after another, so a barrier between them cannot work).

The configurations come from the sm_90 compile check (``python -m rnn_triton.compile_check``): every
configuration ``choose`` can return compiles there with no spills and within the shared-memory limit,
its registers and shared memory are at most what the tables say, and the next size up does not fit.
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
    num_saved: int    # slots per step saved for backward (storage dtype: kernels/cells.py)


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
_GRU_HALF = {16: (4, True), 32: (8, True), 64: (8, True), 128: (8, False)}
_RNN_HALF = {16: (4, True), 32: (4, True), 64: (8, True), 128: (8, True), 256: (8, False)}
_RNN_FP32 = {16: (4, True), 32: (4, True), 64: (8, True)}
_RNN_TANH_FP32 = {16: (4, True), 32: (4, True), 64: (8, False)}  # (IEEE fp32: H = 64 unaligned spills)
TILE_CONFIGS = {
    ("LSTM", torch.float16): _LSTM_HALF,
    ("LSTM", torch.bfloat16): _LSTM_HALF,
    ("LSTM", torch.float32): {16: (4, True), 32: (16, False), 64: (8, False)},
    ("GRU", torch.float16): _GRU_HALF,
    ("GRU", torch.bfloat16): _GRU_HALF,
    ("GRU", torch.float32): {16: (4, True), 32: (8, True), 64: (8, False)},
    ("RNN_TANH", torch.float16): _RNN_HALF,
    ("RNN_TANH", torch.bfloat16): _RNN_HALF,
    ("RNN_TANH", torch.float32): _RNN_TANH_FP32,
    ("RNN_RELU", torch.float16): _RNN_HALF,
    ("RNN_RELU", torch.bfloat16): _RNN_HALF,
    ("RNN_RELU", torch.float32): _RNN_FP32,
}

#: Tile configurations that take any H, but with per-row lengths (PackedSequence input) only H a
#: multiple of 16: the backward's extra state spills otherwise (compile check, kernels "*_packed").
PACKED_MULTIPLES_OF_16 = {("RNN_RELU", torch.float32, 64)}

#: Tile configurations whose two-direction build (both directions of a layer in one launch,
#: ``DIRECTIONS=2``) spills at any H: there, H not a multiple of 16 runs its directions one after the
#: other (compile check, kernels "*_bidir").
BIDIR_MULTIPLES_OF_16 = set()  # none at present (the GRU's half-precision 128 takes multiples of 16 only)


def directions_in_one_launch(cell: str, dtype: torch.dtype, block_h: int, hidden_size: int) -> bool:
    """Whether a bidirectional tile-persistent layer runs both directions in one launch. (The
    cooperative kernels run one launch per direction, on two streams at once where both grids fit:
    ops._run_cooperative.)"""
    key = (cell, torch.float32 if dtype == torch.float64 else dtype, block_h)
    return hidden_size % 16 == 0 or key not in BIDIR_MULTIPLES_OF_16


#: The batch rows one program owns. 16 is the smallest N of a tensor-core dot.
BLOCK_B = 16


@dataclass(frozen=True)
class CoopConfig:
    """A cooperative configuration and its resource use on sm_90: registers and shared memory are the
    most any of its builds uses (forward or backward, any alignment taken), from the compile check,
    and decide how many of its programs an SM holds at once."""
    num_warps: int
    any_h: bool         # False: only H a multiple of 16 (other H spill at this BLOCK_K)
    registers: int      # per thread
    shared_bytes: int   # per program
    w_chunk: int = 0    # backward: 0 keeps W_hh^T on chip; else re-read per step, this many columns at a time
    packed_registers: int = 0  # per thread with per-row lengths (builds *_packed), where more than registers
    fwd_chunk: int = 0  # forward: as w_chunk, for W_hh
    ieee: Optional["CoopConfig"] = None  # float32 with allow_tf32 off (dots on FMA) runs this one instead
    packed_any_h: bool = True  # False: with per-row lengths only H a multiple of 16 (the packed build spills)
    unaligned: Optional["CoopConfig"] = None  # where any_h is False: H not a multiple of 16 runs this one

    def registers_for(self, packed: bool) -> int:
        """Registers per thread of the builds a call runs: with per-row lengths (PackedSequence input)
        the RNN cells' builds take more, the LSTM's and GRU's no more (so their ``registers`` hold)."""
        return max(self.registers, self.packed_registers) if packed else self.registers


GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


#: Hidden units per cooperative program: the smallest M of a tensor-core dot. Each program keeps its
#: units' rows of every gate, NUM_GATES x 16 x H weights, on chip; 32 units would spill.
BLOCK_U = 16
#: Registers per thread the time loops' kernels may take (ptxas ``.maxnreg``). Without a bound ptxas
#: aims at the next occupancy step (64, 80, 128 registers) and spills a few bytes to reach it; a
#: persistent program runs alone on its SM (a cooperative one needs its own SM only), so it gets the
#: whole register file's share.
MAXNREG = 255
_C = CoopConfig
_K = 1024
# Weights on chip (w_chunk = fwd_chunk = 0) wherever that build fits without spilling; ``unaligned``
# (H not a multiple of 16) and the chunked entries re-read W_hh / W_hh^T from L2 where it does not.
# (No LSTM 128 build: the tile kernel takes multiples of 16 up to 128; other H in (64, 128] take 256.)
_LSTM_COOP = {256: _C(8, True, 194, 32 * _K),
              512: _C(8, True, 252, 64 * _K),
              # K = 512 + 256: H not a multiple of 16 spills in the backward with W_hh^T on chip (40 bytes)
              768: _C(8, False, 236, 64 * _K, unaligned=_C(8, True, 255, 56 * _K, w_chunk=256)),
              # H not a multiple of 16 spills there with the weights on chip (32-520 bytes)
              1024: _C(8, False, 194, 160 * _K, unaligned=_C(8, True, 206, 40 * _K, w_chunk=256, fwd_chunk=256))}
_GRU_COOP_HALF = {256: _C(8, True, 192, 16 * _K),
                  512: _C(8, True, 233, 32 * _K),
                  768: _C(8, True, 254, 56 * _K),
                  # the backward for H not a multiple of 16 spills with W_hh^T on chip
                  1024: _C(8, False, 246, 128 * _K, unaligned=_C(8, True, 238, 128 * _K, w_chunk=256))}
_RNN_COOP_HALF = {256: _C(8, True, 86, 12 * _K), 512: _C(8, True, 114, 20 * _K),
                  768: _C(8, True, 160, 24 * _K),
                  1024: _C(8, True, 185, 36 * _K),
                  2048: _C(8, False, 190, 68 * _K)}  # (any H on chip spills: 255 registers)
# float32: W_hh's tiles in shared memory (fp32 does not fit in registers); TF32 dots where
# torch.backends.cudnn.allow_tf32 (its default), else IEEE fp32 on FMA (``ieee``), whose builds hold
# more per thread and so re-read W_hh^T (the LSTM's backward from 128, the GRU's past 128) and W_hh
# (past 256) in chunks. Past 512 (the RNN: 1024) W_hh does not fit in shared memory: re-read in the forward too.
_RNN_COOP_FP32 = {128: _C(4, True, 96, 16 * _K, ieee=_C(4, True, 104, 16 * _K)),
                  256: _C(8, True, 98, 32 * _K, ieee=_C(8, True, 96, 32 * _K)),
                  512: _C(8, True, 120, 64 * _K, ieee=_C(8, True, 96, 64 * _K)),
                  1024: _C(8, True, 144, 128 * _K, ieee=_C(8, True, 150, 128 * _K)),
                  2048: _C(8, True, 148, 64 * _K, w_chunk=512, fwd_chunk=512,
                           ieee=_C(8, True, 104, 32 * _K, w_chunk=256, fwd_chunk=256))}
_LSTM_COOP_FP32 = {128: _C(8, True, 136, 64 * _K, ieee=_C(8, True, 190, 64 * _K, w_chunk=128)),
                   256: _C(8, True, 166, 96 * _K, ieee=_C(8, True, 210, 80 * _K, w_chunk=128)),
                   512: _C(8, True, 202, 192 * _K,
                           ieee=_C(8, True, 254, 128 * _K, w_chunk=256, fwd_chunk=256)),
                   1024: _C(8, True, 232, 80 * _K, w_chunk=256, fwd_chunk=256,
                            ieee=_C(8, True, 254, 128 * _K, w_chunk=256, fwd_chunk=256))}
_GRU_IEEE_1024 = _C(8, True, 240, 80 * _K, w_chunk=256, fwd_chunk=256)
_GRU_COOP_FP32 = {128: _C(8, True, 140, 40 * _K, ieee=_C(8, True, 207, 40 * _K)),
                  256: _C(8, True, 166, 80 * _K, ieee=_C(8, True, 202, 64 * _K, w_chunk=128)),
                  512: _C(8, True, 210, 160 * _K,
                          ieee=_C(8, True, 240, 80 * _K, w_chunk=256, fwd_chunk=256)),
                  # TF32: W_hh^T on chip in the backward for H a multiple of 16 (224 KB of shared memory)
                  1024: _C(8, False, 210, 224 * _K, fwd_chunk=256, ieee=_GRU_IEEE_1024,
                           unaligned=_C(8, True, 220, 64 * _K, w_chunk=256, fwd_chunk=256, ieee=_GRU_IEEE_1024))}
#: The cooperative kernels' configurations, per cell and storage dtype: {K (the H it takes, at most;
#: the smallest K at or above H serves): CoopConfig}, read off the sm_90 compile check (w_chunk /
#: fwd_chunk: where W_hh^T / W_hh are re-read from L2 every step). K is a power of two or the sum of
#: two (768 = 512 + 256, ``k_tiles``), so that H = 768 does not pay for K = 1024.
COOP_CONFIGS = {
    ("LSTM", torch.float16): _LSTM_COOP,
    ("LSTM", torch.bfloat16): _LSTM_COOP,
    ("LSTM", torch.float32): _LSTM_COOP_FP32,
    ("GRU", torch.float16): _GRU_COOP_HALF,
    ("GRU", torch.bfloat16): _GRU_COOP_HALF,
    ("GRU", torch.float32): _GRU_COOP_FP32,
    ("RNN_TANH", torch.float16): _RNN_COOP_HALF,
    ("RNN_TANH", torch.bfloat16): _RNN_COOP_HALF,
    ("RNN_TANH", torch.float32): _RNN_COOP_FP32,
    ("RNN_RELU", torch.float16): _RNN_COOP_HALF,
    ("RNN_RELU", torch.bfloat16): _RNN_COOP_HALF,
    ("RNN_RELU", torch.float32): _RNN_COOP_FP32,
}


def coop_config(cell: str, dtype: torch.dtype, block_k: int, precision: str = "tf32",
                aligned: bool = True) -> Optional[CoopConfig]:
    """The cooperative configuration at ``block_k`` for a build in ``precision`` ("ieee": float32 dots
    on FMA, where an entry may have its own) and for H a multiple of 16 or not (``aligned``: where an
    entry takes only multiples of 16, its ``unaligned`` configuration takes the rest), or None."""
    entry = COOP_CONFIGS.get((cell, torch.float32 if dtype == torch.float64 else dtype), {}).get(block_k)
    if entry is not None and not aligned and not entry.any_h and entry.unaligned:
        entry = entry.unaligned
    return entry.ieee if entry is not None and precision == "ieee" and entry.ieee else entry


@dataclass(frozen=True)
class KernelConfig:
    variant: str      # "tile-persistent", "cooperative" or "stepwise"
    block_b: int      # batch rows per tile
    block_h: int      # H padded: tile-persistent, to a power of two; cooperative, to its K (COOP_CONFIGS)
    num_warps: int
    block_u: int = 0  # cooperative / stepwise: hidden units per program
    groups: int = 0   # cooperative / stepwise: programs along the batch (each takes every groups-th tile)
    w_chunk: int = 0  # cooperative / stepwise backward: see CoopConfig
    fwd_chunk: int = 0  # cooperative / stepwise forward: see CoopConfig


@dataclass(frozen=True)
class DeviceProps:
    """What the capacity model needs to know about a GPU."""
    name: str
    sm_count: int
    shared_per_sm: int            # bytes of shared memory an SM shares out among its blocks
    shared_per_block: int         # the most one block may use (opt-in)
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


#: The GPU the tables were measured for (an H100 SXM has the same SMs; only the SM count may differ).
H200 = DeviceProps("NVIDIA H200", sm_count=132, shared_per_sm=228 * 1024, shared_per_block=227 * 1024)


def device_props(device: torch.device) -> DeviceProps:
    """The capacity model's view of a CUDA device."""
    p = torch.cuda.get_device_properties(device)
    return DeviceProps(p.name, p.multi_processor_count,
                       getattr(p, "shared_memory_per_multiprocessor", H200.shared_per_sm),
                       getattr(p, "shared_memory_per_block_optin", H200.shared_per_block),
                       getattr(p, "regs_per_multiprocessor", H200.registers_per_sm),
                       getattr(p, "max_threads_per_multi_processor", H200.max_threads_per_sm))


def resident_blocks(props: DeviceProps, num_warps: int, registers: int, shared_bytes: int) -> int:
    """How many blocks of a kernel one SM runs at once: the tightest of its thread, register and
    shared-memory limits (registers are allocated per warp in chunks of 256)."""
    if shared_bytes > props.shared_per_block:
        return 0
    threads = 32 * num_warps
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = [props.max_blocks_per_sm, props.max_threads_per_sm // threads,
              props.registers_per_sm // (regs_per_warp * num_warps)]
    if shared_bytes:
        limits.append(props.shared_per_sm // shared_bytes)
    return max(0, min(limits))


@dataclass(frozen=True)
class Plan:
    """The kernel that will run, or ``reason`` why torch's implementation runs instead."""
    config: Optional[KernelConfig]
    reason: Optional[str] = None

    @property
    def uses_triton(self) -> bool:
        return self.config is not None

    @property
    def second_order(self) -> str:
        """What a backward with ``create_graph=True`` (a gradient of a gradient) runs for this call."""
        if not self.uses_triton:
            return "torch.nn's own implementation (the call falls back to it)"
        return ("the Triton backward kernels give the first-order gradients' values; their own derivatives "
                "are autograd's through a torch recomputation of the recurrence (rnn_triton.reference: a "
                "Python loop over the steps, O(T) memory)")


def k_tiles(block_k: int) -> dict:
    """A cooperative build's K (a ``COOP_CONFIGS`` key) as the kernels' two tiles: BLOCK_K, the largest
    power of two within it, and BLOCK_K2, the rest (a power of two, or 0): 768 = 512 + 256."""
    first = 1 << (block_k.bit_length() - 1)
    rest = block_k - first
    if rest & (rest - 1):
        raise ValueError(f"a cooperative K of {block_k} is not a sum of two powers of two")
    return {"BLOCK_K": first, "BLOCK_K2": rest}


def block_h_for(hidden_size: int) -> int:
    """Hidden units padded to a power of two, at least 16 (the smallest K and N of a dot)."""
    return max(16, 1 << (hidden_size - 1).bit_length())


def max_hidden(cell: str, dtype: torch.dtype, multiple_of_16: bool = True, variant: str = "any") -> int:
    """Largest hidden size the kernels take (for H a multiple of 16, or any H), either variant or
    only the "tile-persistent" one. (Below it, some H may still be refused: those whose power-of-two
    padding has a configuration for multiples of 16 only.)"""
    key = (cell, torch.float32 if dtype == torch.float64 else dtype)
    sizes = [bh for bh, (_, any_h) in TILE_CONFIGS.get(key, {}).items() if any_h or multiple_of_16]
    if variant == "any":
        sizes += [bk for bk, c in COOP_CONFIGS.get(key, {}).items() if c.any_h or c.unaligned or multiple_of_16]
    return max(sizes, default=0)


def choose(cell: str, hidden_size: int, dtype: torch.dtype, device: torch.device, batch: int = 1,
           props: Optional[DeviceProps] = None, packed: bool = False, directions: int = 1) -> Plan:
    """The plan for one layer of ``cell`` with ``hidden_size`` units and ``batch`` rows on ``device`` in
    ``dtype``. ``props``: the GPU's properties (read from ``device`` when not given). ``packed``:
    per-row lengths (PackedSequence input): every variant takes them, in a build of its own (the
    kernels' HAS_LENGTHS), which at some sizes takes fewer H (``PACKED_MULTIPLES_OF_16``).
    ``directions``: 2 for a bidirectional layer (the cooperative variant runs its two grids at once
    where both fit)."""
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
    key = (cell, torch.float32 if dtype == torch.float64 else dtype)
    configs = TILE_CONFIGS.get(key, {})
    block_h = block_h_for(hidden_size)
    any_h = block_h in configs and configs[block_h][1] and not (
        packed and (cell, key[1], block_h) in PACKED_MULTIPLES_OF_16)
    if block_h in configs and (any_h or hidden_size % 16 == 0):
        return Plan(KernelConfig("tile-persistent", BLOCK_B, block_h, configs[block_h][0]))
    # the smallest cooperative configuration that takes this H (K padded further where a size's own
    # build does not fit); float32 on a GPU without allow_tf32 runs the IEEE builds (ops._precision)
    ieee = dtype == torch.float32 and device.type == "cuda" and not torch.backends.cudnn.allow_tf32
    aligned = hidden_size % 16 == 0
    fits = sorted(bk for bk, c in COOP_CONFIGS.get(key, {}).items() if bk >= hidden_size and (
        aligned or (c.any_h and (c.packed_any_h or not packed)) or (not c.any_h and c.unaligned)))
    block_h = fits[0] if fits else block_h
    coop = coop_config(cell, key[1], block_h, "ieee" if ieee else "tf32", aligned) if fits else None
    if coop is None:
        if packed and (cell, key[1], block_h) in PACKED_MULTIPLES_OF_16:
            return Plan(None, f"PackedSequence input takes hidden_size={hidden_size} for {cell} in {dtype} only "
                              f"as a multiple of 16 (the tile-persistent kernel's build with lengths spills "
                              f"otherwise)")
        return Plan(None, f"hidden_size={hidden_size} is above the kernels' limit for {cell} in {dtype}: "
                          f"{max_hidden(cell, dtype, False)}, or {max_hidden(cell, dtype, True)} for "
                          f"multiples of 16")
    units = -(-hidden_size // BLOCK_U)
    tiles = -(-max(batch, 1) // BLOCK_B)
    if device.type == "cpu":  # the interpreter runs programs one after another: no barrier between them
        return Plan(KernelConfig("stepwise", BLOCK_B, block_h, coop.num_warps, BLOCK_U, tiles, coop.w_chunk,
                                 coop.fwd_chunk))
    props = props or device_props(device)
    capacity = props.sm_count * resident_blocks(props, coop.num_warps, coop.registers_for(packed),
                                                coop.shared_bytes)
    if units > capacity:  # not all resident: a barrier could wait for a program that never starts
        return Plan(KernelConfig("stepwise", BLOCK_B, block_h, coop.num_warps, BLOCK_U, tiles, coop.w_chunk,
                                 coop.fwd_chunk))
    # A bidirectional layer's two grids run at once where both fit (ops then puts them on two
    # streams): fewer batch groups each, for twice the programs at work at small batch.
    per_group = units * directions if units * directions <= capacity else units
    return Plan(KernelConfig("cooperative", BLOCK_B, block_h, coop.num_warps, BLOCK_U,
                             min(tiles, capacity // per_group), coop.w_chunk, coop.fwd_chunk))
