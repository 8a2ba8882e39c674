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
AMD GPUs (gfx942, gfx90a) take their own tables (``AMD_TILE_CONFIGS``, ``AMD_COOP_CONFIGS``), read off
``python -m rnn_triton.amd_compile_check`` under the same rules; ``device_arch`` picks the tables.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import runtime


@dataclass(frozen=True)
class Cell:
    """Static facts about a cell kind, as the kernels see it."""
    name: str
    kernel_id: int    # kernels.cells: LSTM=0, GRU=1, RNN_TANH=2, RNN_RELU=3, SLSTM=4
    num_gates: int    # gate blocks in W_ih / W_hh
    num_saved: int    # slots per step saved for backward (storage dtype: kernels/cells.py)
    num_c: int = 0    # states beside h, stacked in "c" tensors [.., num_c*H]: c (LSTM); c, n, m (sLSTM)


CELLS = {
    "LSTM": Cell("LSTM", 0, 4, 4, 1),
    "GRU": Cell("GRU", 1, 3, 4),
    "RNN_TANH": Cell("RNN_TANH", 2, 1, 1),
    "RNN_RELU": Cell("RNN_RELU", 3, 1, 1),
    # xLSTM's sLSTM (kernels/cells.py ``slstm_forward``): tile-persistent kernels only, through
    # ``rnn_triton.flashrnn`` and ``rnn_triton.SLSTM`` (no torch.nn counterpart)
    "SLSTM": Cell("SLSTM", 4, 4, 4, 3),
}

#: The tile-persistent kernel's configurations, per cell and storage dtype: {BLOCK_H: num_warps},
#: read off the sm_90 compile check (``python -m rnn_triton.compile_check``). H pads to BLOCK_H, the
#: next power of two (the kernels see H padded to a multiple of 16: ``ops.padded_units``).
#: num_warps: no more warps than the tensor-core dots split without repeating (a warp's mma.sync is
#: 16 units x 8 rows; with more warps than that each repeats the whole product and the cell math:
#: MMA efficiency 0.25 at BLOCK_H 16-32 on 4-8 warps), then the fastest by the static model
#: (``static_cost``, forward + backward): 1 warp at 16, 2 at 32, 4 at 64 for the LSTM and GRU (the
#: float32 LSTM at 64 takes 8, repeating part of the dots' work: on 4 its backward with per-step state
#: gradients, ``flashrnn``'s, spills).
_LSTM_HALF = {16: 1, 32: 2, 64: 4, 128: 8}
_GRU_HALF = {16: 1, 32: 2, 64: 4, 128: 8}
_RNN_HALF = {16: 2, 32: 4, 64: 4, 128: 8, 256: 8}
_RNN_FP32 = {16: 2, 32: 4, 64: 8}
_SLSTM_HALF = {32: 4, 64: 8}
TILE_CONFIGS = {
    ("LSTM", torch.float16): _LSTM_HALF,
    ("LSTM", torch.bfloat16): _LSTM_HALF,
    ("LSTM", torch.float32): {16: 1, 32: 2, 64: 8},
    ("GRU", torch.float16): _GRU_HALF,
    ("GRU", torch.bfloat16): _GRU_HALF,
    ("GRU", torch.float32): {16: 1, 32: 2, 64: 4},
    ("RNN_TANH", torch.float16): _RNN_HALF,
    ("RNN_TANH", torch.bfloat16): _RNN_HALF,
    ("RNN_TANH", torch.float32): _RNN_FP32,
    ("RNN_RELU", torch.float16): _RNN_HALF,
    ("RNN_RELU", torch.bfloat16): _RNN_HALF,
    ("RNN_RELU", torch.float32): _RNN_FP32,
    # the sLSTM's backward holds four states: twice the LSTM's warps, which repeat part of the
    # tensor-core work (static_cost.MMA_FLOOR_EXCEPTIONS) where fewer spill, and no 16 (a head of 16 or
    # fewer units runs at 32); float32 in IEEE fp32 only (``dot_precision``). Its
    # 128 (half) and 64 (float32) tiles need 16 warps of over 128 registers: more than a block's file.
    ("SLSTM", torch.float16): _SLSTM_HALF,
    ("SLSTM", torch.bfloat16): _SLSTM_HALF,
    ("SLSTM", torch.float32): {16: 4, 32: 8},
}

#: float32 with allow_tf32 off (IEEE fp32: the dots run on FFMA, which more warps share without
#: repeating): {(cell, BLOCK_H): num_warps} where it differs from ``TILE_CONFIGS``, by the static model
#: (fewer warps there spill at 64, or lengthen each warp's serial FFMA chain at 16-32). The LSTM's
#: 32 takes 8: its builds with lengths on fewer warps abort LLVM's SLP vectorizer (Triton 3.9; the
#: compile check reports such a build as an error). Its 64 takes 8 too: on 16 it held over 128
#: registers a thread, more than a block's register file (it could not launch), and on 8 its builds with
#: lengths abort, so packed input there runs cooperative (``PACKED_COOPERATIVE``).
TILE_IEEE_WARPS = {("LSTM", 16): 4, ("LSTM", 32): 8, ("LSTM", 64): 8,
                   ("GRU", 16): 4, ("GRU", 32): 4, ("GRU", 64): 8,
                   ("RNN_TANH", 16): 4, ("RNN_RELU", 16): 4}


def tile_warps(cell: str, dtype: torch.dtype, block_h: int, precision: str, arch: str = "sm_90") -> int:
    """num_warps of the tile-persistent build of ``cell`` at ``block_h`` in ``precision`` on ``arch``."""
    if arch != "sm_90":  # AMD: float32 in IEEE fp32 runs on MFMA too, with TF32's wavefronts
        return AMD_TILE_CONFIGS[arch][(cell, dtype)][block_h]
    warps = TILE_CONFIGS[(cell, dtype)][block_h]
    return TILE_IEEE_WARPS.get((cell, block_h), warps) if dtype == torch.float32 and precision == "ieee" else warps


#: Tile configurations whose build with per-row lengths (PackedSequence input, kernels "*_packed")
#: does not compile to a working kernel: there a packed input runs the cooperative kernel (compile
#: check; the float32 LSTM at 64: in IEEE fp32 on its 8 warps the backward's compile aborts LLVM's SLP
#: vectorizer; in TF32 it fits on 8, but the table is per cell, dtype and size).
PACKED_COOPERATIVE = {("LSTM", torch.float32, 64)}


#: The batch rows one program owns. 16 is the smallest N of a tensor-core dot.
BLOCK_B = 16


@dataclass(frozen=True)
class CoopConfig:
    """A cooperative configuration and its resource use on sm_90: registers and shared memory are the
    most any of its builds uses (forward or backward), from the compile check,
    and decide how many of its programs an SM holds at once."""
    num_warps: int
    registers: int      # per thread
    shared_bytes: int   # per program
    w_chunk: int = 0    # backward: 0 keeps W_hh^T on chip; else re-read per step, this many columns at a time
    packed_registers: int = 0  # per thread with per-row lengths (builds *_packed), where more than registers
    fwd_chunk: int = 0  # forward: as w_chunk, for W_hh
    ieee: Optional["CoopConfig"] = None  # float32 with allow_tf32 off (dots on FMA) runs this one instead

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
# Weights on chip (w_chunk = fwd_chunk = 0) wherever that build fits without spilling; the chunked
# entries re-read W_hh / W_hh^T from L2 where it does not. (No half-precision LSTM or GRU build at 128:
# the tile kernel takes every H up to 128.)
_LSTM_COOP = {256: _C(8, 164, 32 * _K),
              512: _C(8, 242, 32 * _K),
              768: _C(8, 236, 64 * _K),
              1024: _C(8, 194, 160 * _K)}
_GRU_COOP_HALF = {256: _C(8, 160, 16 * _K),
                  512: _C(8, 202, 32 * _K),
                  768: _C(8, 254, 56 * _K),
                  1024: _C(8, 246, 128 * _K)}
_RNN_COOP_HALF = {256: _C(8, 86, 12 * _K), 512: _C(8, 114, 20 * _K),
                  768: _C(8, 128, 24 * _K),
                  1024: _C(8, 144, 36 * _K),
                  2048: _C(8, 190, 68 * _K)}
# float32: W_hh's tiles in shared memory (fp32 does not fit in registers); TF32 dots where
# torch.backends.cudnn.allow_tf32 (its default), else IEEE fp32 on FMA (``ieee``), whose builds hold
# more per thread and so re-read W_hh^T (the LSTM's backward from 128, the GRU's past 128) and W_hh
# (past 256) in chunks. Past 512 (the RNN: 1024) W_hh does not fit in shared memory: re-read in the forward too.
_RNN_COOP_FP32 = {128: _C(4, 94, 16 * _K, ieee=_C(4, 91, 16 * _K)),
                  256: _C(8, 98, 32 * _K, ieee=_C(8, 96, 32 * _K)),
                  512: _C(8, 120, 64 * _K, ieee=_C(8, 96, 64 * _K)),
                  1024: _C(8, 130, 128 * _K, ieee=_C(8, 94, 128 * _K)),
                  2048: _C(8, 132, 64 * _K, w_chunk=512, fwd_chunk=512,
                           ieee=_C(8, 98, 32 * _K, w_chunk=256, fwd_chunk=256))}
_LSTM_COOP_FP32 = {128: _C(8, 126, 64 * _K, ieee=_C(8, 183, 64 * _K, w_chunk=128)),
                   256: _C(8, 166, 96 * _K, ieee=_C(8, 210, 80 * _K, w_chunk=128)),
                   512: _C(8, 186, 160 * _K,
                           ieee=_C(8, 216, 128 * _K, w_chunk=256, fwd_chunk=256)),
                   1024: _C(8, 232, 80 * _K, w_chunk=256, fwd_chunk=256,
                            ieee=_C(8, 216, 128 * _K, w_chunk=256, fwd_chunk=256))}
_GRU_IEEE_1024 = _C(8, 236, 80 * _K, w_chunk=256, fwd_chunk=256)
_GRU_COOP_FP32 = {128: _C(8, 136, 40 * _K, ieee=_C(8, 207, 40 * _K)),
                  256: _C(8, 152, 80 * _K, ieee=_C(8, 202, 64 * _K, w_chunk=128)),
                  512: _C(8, 183, 128 * _K,
                          ieee=_C(8, 236, 80 * _K, w_chunk=256, fwd_chunk=256)),
                  # TF32: W_hh^T on chip in the backward (224 KB of shared memory)
                  1024: _C(8, 210, 224 * _K, fwd_chunk=256, ieee=_GRU_IEEE_1024)}
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


#: AMD Instinct targets, read off the AMD compile check (``python -m rnn_triton.amd_compile_check``):
#: per architecture, the tile-persistent tables ({BLOCK_H: wavefronts of 64}) and the cooperative ones
#: (as ``COOP_CONFIGS``; registers = VGPRs + AGPRs per lane, shared_bytes = LDS, at most 64 KB a CU).
#: Wavefronts: as many as the MFMA dots split without repeating (MFMA efficiency 1.0: a 64-lane wave
#: does what two 32-lane warps do, so the RNN takes half sm_90's warps); the RNN's half-precision
#: 256 tile needs 128 KB of LDS, so its H past 128 runs cooperative.
_AMD_LSTM_GRU_TILE = {16: 1, 32: 2, 64: 4, 128: 8}
_AMD_RNN_TILE = {16: 1, 32: 2, 64: 4, 128: 8}
_AMD_TILE = {
    ("LSTM", torch.float16): _AMD_LSTM_GRU_TILE, ("LSTM", torch.bfloat16): _AMD_LSTM_GRU_TILE,
    ("LSTM", torch.float32): {16: 1, 32: 2, 64: 4},
    ("GRU", torch.float16): _AMD_LSTM_GRU_TILE, ("GRU", torch.bfloat16): _AMD_LSTM_GRU_TILE,
    ("GRU", torch.float32): {16: 1, 32: 2, 64: 4, 128: 8},
    ("RNN_TANH", torch.float16): _AMD_RNN_TILE, ("RNN_TANH", torch.bfloat16): _AMD_RNN_TILE,
    ("RNN_TANH", torch.float32): {16: 1, 32: 2, 64: 2, 128: 4},
    ("RNN_RELU", torch.float16): _AMD_RNN_TILE, ("RNN_RELU", torch.bfloat16): _AMD_RNN_TILE,
    ("RNN_RELU", torch.float32): {16: 1, 32: 2, 64: 2, 128: 4},
    ("SLSTM", torch.float16): {32: 2, 64: 4, 128: 8}, ("SLSTM", torch.bfloat16): {32: 2, 64: 4, 128: 8},
    ("SLSTM", torch.float32): {16: 1, 32: 2, 64: 4},
}
_AMD_LSTM_COOP = {256: _C(8, 141, 32 * _K), 512: _C(8, 159, 64 * _K), 768: _C(8, 183, 64 * _K),
                  1024: _C(8, 195, 32 * _K, w_chunk=256)}
_AMD_GRU_COOP_HALF = {256: _C(8, 116, 16 * _K), 512: _C(8, 127, 32 * _K), 768: _C(8, 149, 32 * _K),
                      1024: _C(8, 170, 64 * _K)}
_AMD_RNN_COOP_HALF = {256: _C(8, 50, 8 * _K), 512: _C(8, 57, 16 * _K), 768: _C(8, 68, 16 * _K),
                      1024: _C(8, 74, 32 * _K), 2048: _C(8, 112, 64 * _K)}
_AMD_RNN_COOP_FP32 = {128: _C(4, 52, 8 * _K, ieee=_C(4, 59, 8 * _K)),
                      256: _C(8, 54, 16 * _K, ieee=_C(8, 59, 16 * _K)),
                      512: _C(8, 72, 32 * _K, ieee=_C(8, 84, 32 * _K)),
                      1024: _C(8, 108, 64 * _K, ieee=_C(8, 131, 64 * _K)),
                      2048: _C(8, 87, 32 * _K, w_chunk=512, fwd_chunk=512,
                               ieee=_C(8, 74, 16 * _K, w_chunk=256, fwd_chunk=256))}
_AMD_LSTM_COOP_FP32 = {128: _C(8, 138, 32 * _K, ieee=_C(8, 140, 32 * _K, w_chunk=128)),
                       256: _C(8, 154, 64 * _K, ieee=_C(8, 156, 32 * _K, w_chunk=128)),
                       512: _C(8, 189, 64 * _K, w_chunk=256, ieee=_C(8, 166, 64 * _K, w_chunk=256, fwd_chunk=256)),
                       1024: _C(8, 138, 64 * _K, w_chunk=256, fwd_chunk=256,
                                ieee=_C(8, 166, 64 * _K, w_chunk=256, fwd_chunk=256))}
_AMD_GRU_COOP_FP32 = {128: _C(8, 92, 16 * _K, ieee=_C(8, 96, 16 * _K)),
                      256: _C(8, 118, 32 * _K, ieee=_C(8, 115, 16 * _K, w_chunk=128)),
                      512: _C(8, 167, 64 * _K, ieee=_C(8, 154, 32 * _K, w_chunk=256, fwd_chunk=256)),
                      1024: _C(8, 130, 32 * _K, w_chunk=256, fwd_chunk=256,
                               ieee=_C(8, 154, 32 * _K, w_chunk=256, fwd_chunk=256))}
_AMD_COOP = {
    ("LSTM", torch.float16): _AMD_LSTM_COOP, ("LSTM", torch.bfloat16): _AMD_LSTM_COOP,
    ("LSTM", torch.float32): _AMD_LSTM_COOP_FP32,
    ("GRU", torch.float16): _AMD_GRU_COOP_HALF, ("GRU", torch.bfloat16): _AMD_GRU_COOP_HALF,
    ("GRU", torch.float32): _AMD_GRU_COOP_FP32,
    ("RNN_TANH", torch.float16): _AMD_RNN_COOP_HALF, ("RNN_TANH", torch.bfloat16): _AMD_RNN_COOP_HALF,
    ("RNN_TANH", torch.float32): _AMD_RNN_COOP_FP32,
    ("RNN_RELU", torch.float16): _AMD_RNN_COOP_HALF, ("RNN_RELU", torch.bfloat16): _AMD_RNN_COOP_HALF,
    ("RNN_RELU", torch.float32): _AMD_RNN_COOP_FP32,
}
AMD_TILE_CONFIGS = {"gfx942": _AMD_TILE, "gfx90a": _AMD_TILE}
AMD_COOP_CONFIGS = {"gfx942": _AMD_COOP, "gfx90a": _AMD_COOP}


def fp32_precisions(arch: str, cell: str = "") -> tuple:
    """The float32 dot precisions ``arch`` has builds for: IEEE fp32 always, TF32 where the hardware
    has it (sm_90's tf32 mma, gfx942's xf32 MFMA; gfx90a has none: its float32 runs IEEE whatever
    ``allow_tf32`` says) and the cell fits in it (the sLSTM does not: its TF32 backward spills on as
    many warps as the dots split without repeating)."""
    return ("ieee",) if arch == "gfx90a" or cell == "SLSTM" else ("ieee", "tf32")


def coop_config(cell: str, dtype: torch.dtype, block_k: int, precision: str = "tf32",
                arch: str = "sm_90") -> Optional[CoopConfig]:
    """The cooperative configuration at ``block_k`` on ``arch`` for a build in ``precision`` ("ieee":
    float32 dots on FMA, where an entry may have its own), or None."""
    table = COOP_CONFIGS if arch == "sm_90" else AMD_COOP_CONFIGS[arch]
    entry = table.get((cell, torch.float32 if dtype == torch.float64 else dtype), {}).get(block_k)
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
    arch: str = "sm_90"           # the tables it takes: "sm_90", or an AMD target ("gfx942", "gfx90a")
    warp_size: int = 32
    register_granule: int = 256   # registers allocated to a warp at a time


#: The GPU the tables were measured for (an H100 SXM has the same SMs; only the SM count may differ).
H200 = DeviceProps("NVIDIA H200", sm_count=132, shared_per_sm=228 * 1024, shared_per_block=227 * 1024)


#: AMD Instinct GPUs (CDNA3 / CDNA2 ISA references): 64 KB of LDS per CU; per SIMD lane 512 VGPRs
#: (unified with AGPRs) in granules of 8, 4 SIMDs and at most 8 waves of 64 per SIMD, so 2048 lanes and
#: 4 x 512 x 64 registers per CU. MI250X: one of its two dies (GCDs), which ROCm shows as a device.
MI300X = DeviceProps("AMD Instinct MI300X", sm_count=304, shared_per_sm=64 * 1024, shared_per_block=64 * 1024,
                     registers_per_sm=4 * 512 * 64, max_threads_per_sm=2048, arch="gfx942", warp_size=64,
                     register_granule=8 * 64)
MI250X = DeviceProps("AMD Instinct MI250X (one GCD)", sm_count=110, shared_per_sm=64 * 1024,
                     shared_per_block=64 * 1024, registers_per_sm=4 * 512 * 64, max_threads_per_sm=2048,
                     arch="gfx90a", warp_size=64, register_granule=8 * 64)
_AMD = {"gfx942": MI300X, "gfx90a": MI250X}


def device_props(device: torch.device) -> DeviceProps:
    """The capacity model's view of a CUDA (or ROCm) device. A ROCm device's architecture comes from
    ``gcnArchName`` ("gfx942:sramecc+:xnack-"); one the tables do not know keeps that name (``choose``
    then refuses it)."""
    p = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        arch = getattr(p, "gcnArchName", "").split(":")[0]
        base = _AMD.get(arch, MI300X)
        return DeviceProps(p.name, p.multi_processor_count, base.shared_per_sm, base.shared_per_block,
                           base.registers_per_sm, base.max_threads_per_sm, base.max_blocks_per_sm, arch or "unknown",
                           base.warp_size, base.register_granule)
    return DeviceProps(p.name, p.multi_processor_count,
                       getattr(p, "shared_memory_per_multiprocessor", H200.shared_per_sm),
                       getattr(p, "shared_memory_per_block_optin", H200.shared_per_block),
                       getattr(p, "regs_per_multiprocessor", H200.registers_per_sm),
                       getattr(p, "max_threads_per_multi_processor", H200.max_threads_per_sm))


def resident_blocks(props: DeviceProps, num_warps: int, registers: int, shared_bytes: int) -> int:
    """How many blocks of a kernel one SM runs at once: the tightest of its thread, register and
    shared-memory limits (registers are allocated per warp in the device's granule: 256 on sm_90)."""
    if shared_bytes > props.shared_per_block:
        return 0
    threads = props.warp_size * num_warps
    granule = props.register_granule
    regs_per_warp = -(-registers * props.warp_size // granule) * granule
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


def max_hidden(cell: str, dtype: torch.dtype, variant: str = "any", arch: str = "sm_90") -> int:
    """Largest hidden size the kernels take on ``arch`` (every H up to it), either variant or only the
    "tile-persistent" one."""
    key = (cell, torch.float32 if dtype == torch.float64 else dtype)
    tile, coop = tables(arch)
    sizes = list(tile.get(key, {}))
    if variant == "any":
        sizes += list(coop.get(key, {}))
    return max(sizes, default=0)


def tables(arch: str) -> tuple:
    """(tile-persistent, cooperative) tables of ``arch``: "sm_90" (every NVIDIA GPU takes them), or
    an AMD target of ``AMD_TILE_CONFIGS``."""
    return (TILE_CONFIGS, COOP_CONFIGS) if arch == "sm_90" else (AMD_TILE_CONFIGS[arch], AMD_COOP_CONFIGS[arch])


def device_arch(device: torch.device, props: Optional[DeviceProps] = None) -> str:
    """The tables' architecture for ``device``: "sm_90" on NVIDIA GPUs and on the CPU (the
    interpreter takes sm_90's sizes), else the AMD target (e.g. "gfx942")."""
    if props is not None:
        return props.arch
    if device.type != "cuda" or not torch.version.hip:
        return "sm_90"
    return device_props(device).arch


def dot_precision(dtype: torch.dtype, device: torch.device, arch: str, cell: str = "") -> str:
    """The float32 dots' precision a call runs (ops._precision): TF32 where ``allow_tf32`` is set
    (cuDNN's rule) and ``arch`` has it, else IEEE fp32; "tf32" names the tables' entry otherwise. The
    sLSTM's float32 runs IEEE fp32 always (its TF32 tile builds spill: ``fp32_precisions``)."""
    if dtype == torch.float32 and device.type == "cuda" and not (
            torch.backends.cudnn.allow_tf32 and "tf32" in fp32_precisions(arch, cell)):
        return "ieee"
    return "tf32"


def choose(cell: str, hidden_size: int, dtype: torch.dtype, device: torch.device, batch: int = 1,
           props: Optional[DeviceProps] = None, packed: bool = False, directions: int = 1,
           heads: int = 1) -> Plan:
    """The plan for one layer of ``cell`` with ``hidden_size`` units and ``batch`` rows on ``device`` in
    ``dtype``. ``props``: the GPU's properties (read from ``device`` when not given). ``packed``:
    per-row lengths (PackedSequence input): every variant takes them, in a build of its own (the
    kernels' HAS_LENGTHS; where that tile build spills, the cooperative kernel: ``PACKED_COOPERATIVE``).
    ``directions``: 2 for a bidirectional layer (the cooperative variant runs its two grids at once
    where both fit). ``heads``: a block-diagonal recurrence of that many heads, ``hidden_size`` units
    each, which only the tile-persistent kernel runs (one program per head and batch tile)."""
    if device.type == "cpu":
        if not runtime.interpreting():
            return Plan(None, "CPU tensors run through Triton only under TRITON_INTERPRET=1")
    elif device.type != "cuda":
        return Plan(None, f"device type {device.type!r} is not supported by the Triton kernels")
    if dtype == torch.float64 and not runtime.interpreting():
        return Plan(None, "float64 runs through the Triton kernels only in the interpreter")
    if dtype not in GPU_DTYPES + (torch.float64,):
        return Plan(None, f"dtype {dtype} is not supported (float16, bfloat16, float32)")
    arch = device_arch(device, props)
    if arch != "sm_90" and arch not in AMD_TILE_CONFIGS:
        return Plan(None, f"GPU architecture {arch!r} has no compiled configurations (AMD: "
                          f"{', '.join(AMD_TILE_CONFIGS)})")
    # float64 runs only in the interpreter; it takes float32's sizes, as the GPU would.
    key = (cell, torch.float32 if dtype == torch.float64 else dtype)
    tile_table, coop_table = tables(arch)
    # the smallest tile at or above H's power of two (a table may start above 16)
    tiles_above = sorted(b for b in tile_table.get(key, {}) if b >= block_h_for(hidden_size))
    block_h = tiles_above[0] if tiles_above else block_h_for(hidden_size)
    precision = dot_precision(dtype, device, arch, cell)
    if block_h in tile_table.get(key, {}) and not (packed and (cell, key[1], block_h) in PACKED_COOPERATIVE):
        return Plan(KernelConfig("tile-persistent", BLOCK_B, block_h,
                                 tile_warps(cell, key[1], block_h, precision, arch)))
    if heads > 1:
        return Plan(None, f"a head size of {hidden_size} is above the tile-persistent kernel's limit for {cell} "
                          f"in {dtype}{'' if arch == 'sm_90' else ' on ' + arch}, which heads need: "
                          f"{max_hidden(cell, dtype, 'tile-persistent', arch)}")
    # the smallest cooperative configuration that takes this H
    fits = sorted(bk for bk in coop_table.get(key, {}) if bk >= hidden_size)
    if not fits:
        return Plan(None, f"hidden_size={hidden_size} is above the kernels' limit for {cell} in {dtype}"
                          f"{'' if arch == 'sm_90' else ' on ' + arch}: {max_hidden(cell, dtype, arch=arch)}")
    block_h = fits[0]
    coop = coop_config(cell, key[1], block_h, precision, arch)
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
