"""AMD Instinct GPUs (gfx942: MI300, gfx90a: MI200): the dispatcher's tables per architecture, the
compile check behind them and the grid barrier's lowering. Compiled here for those targets on a CPU;
never run on AMD hardware."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rnn_triton import amd_compile_check, dispatch

CUDA = torch.device("cuda")
AMD = {"gfx942": dispatch.MI300X, "gfx90a": dispatch.MI250X}
CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


@pytest.mark.parametrize("arch", AMD)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_every_hidden_size_to_the_limit_has_a_resident_kernel(arch, dtype):
    """On a made-up MI300X / MI250X: every H up to the architecture's limit, padded or packed, runs a
    kernel; a cooperative grid only where all its programs are resident at once (by the CU count, the
    VGPRs and LDS its builds take), else stepwise; on the MI300X's 304 CUs never stepwise at batch 16.
    The next H past the limit is refused with the reason."""
    props = AMD[arch]
    for cell in CELLS:
        top = dispatch.max_hidden(cell, dtype, arch=arch)
        assert top >= 256
        for H in list(range(1, 130)) + list(range(130, top + 1, 7)) + [top]:
            for packed in (False, True):
                plan = dispatch.choose(cell, H, dtype, CUDA, 16, props, packed=packed)
                assert plan.uses_triton, (cell, H, packed, plan.reason)
                c = plan.config
                if c.variant != "tile-persistent":
                    precision = dispatch.dot_precision(dtype, CUDA, arch)
                    coop = dispatch.coop_config(cell, dtype, c.block_h, precision, arch)
                    capacity = props.sm_count * dispatch.resident_blocks(
                        props, coop.num_warps, coop.registers_for(packed), coop.shared_bytes)
                    assert (c.variant == "cooperative") == (-(-H // 16) <= capacity), (cell, H, plan)
                    assert arch == "gfx90a" or c.variant == "cooperative", (cell, H, plan)
        assert arch in dispatch.choose(cell, top + 1, dtype, CUDA, 16, props).reason


def test_the_capacity_model_counts_64_wide_wavefronts():
    """A CU holds 4 x 512 x 64 registers and 2048 lanes: a 4-wave workgroup of 128 VGPRs fits 4 times
    (by registers), of 256 twice, of 512 once; 64 KB of LDS once; eight waves of 64 VGPRs twice (lanes)."""
    mi300 = dispatch.MI300X
    assert dispatch.resident_blocks(mi300, 4, 128, 0) == 4
    assert dispatch.resident_blocks(mi300, 4, 256, 0) == 2
    assert dispatch.resident_blocks(mi300, 4, 512, 0) == 1
    assert dispatch.resident_blocks(mi300, 4, 64, 64 * 1024) == 1
    assert dispatch.resident_blocks(mi300, 4, 64, 64 * 1024 + 1) == 0
    assert dispatch.resident_blocks(mi300, 8, 64, 0) == 4


def test_float32_on_gfx90a_runs_ieee_whatever_allow_tf32_says(monkeypatch):
    """gfx90a has no TF32 MFMA: its float32 takes the IEEE builds; gfx942 (xf32) and sm_90 follow
    allow_tf32 as cuDNN does."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert dispatch.dot_precision(torch.float32, CUDA, "gfx90a") == "ieee"
    assert dispatch.dot_precision(torch.float32, CUDA, "gfx942") == "tf32"
    assert dispatch.dot_precision(torch.float32, CUDA, "sm_90") == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert dispatch.dot_precision(torch.float32, CUDA, "gfx942") == "ieee"


def test_a_rocm_device_is_read_by_its_gcn_arch_name(monkeypatch):
    """On ROCm builds of torch the tables come from gcnArchName; an architecture without tables gets
    torch's implementation with the reason."""
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    for name, arch, cus in (("gfx942:sramecc+:xnack-", "gfx942", 304), ("gfx90a:sramecc+:xnack-", "gfx90a", 110),
                            ("gfx1100", "gfx1100", 48)):
        fake = SimpleNamespace(name="AMD GPU", multi_processor_count=cus, gcnArchName=name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, fake=fake: fake)
        props = dispatch.device_props(CUDA)
        assert (props.arch, props.sm_count, props.warp_size) == (arch, cus, 64)
        plan = dispatch.choose("LSTM", 64, torch.bfloat16, CUDA, 16)
        if arch == "gfx1100":
            assert not plan.uses_triton and "gfx1100" in plan.reason
        else:
            assert plan.config.num_warps == dispatch.AMD_TILE_CONFIGS[arch][("LSTM", torch.bfloat16)][64]


def _amd_check(*args):
    """The AMD compile check in a process of its own (without TRITON_INTERPRET: it compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rnn_triton.amd_compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("arch", AMD)
def test_the_grid_barrier_lowers_to_agent_scope_release_and_acquire(arch):
    """The cooperative forward's barrier, read from its gfx942 / gfx90a assembly: the arriving atomic
    follows a wait for every earlier store (and on gfx942 the L2 writeback that makes them visible
    to the other XCDs); each poll returns the counter and is followed by a wait for it and the
    invalidation of the CU's caches before any later load (LLVM AMDGPU memory model, agent scope)."""
    seen = json.loads(_amd_check("--barrier", "--arch", arch).stdout.splitlines()[-1])[arch]
    assert seen["release"] and seen["acquire"]
    for release in seen["release"]:
        assert release[-1].startswith("global_atomic_add") and "s_waitcnt vmcnt(0)" in release[:-1]
        if arch == "gfx942":
            assert release[0] == "buffer_wbl2 sc1"
    invalidate = {"gfx942": "buffer_inv sc1", "gfx90a": "buffer_wbinvl1_vol"}[arch]
    for poll, wait, inv in seen["acquire"]:
        assert wait == "s_waitcnt vmcnt(0)" and inv == invalidate, (poll, wait, inv)


def test_every_amd_dispatcher_config_compiles_and_the_next_size_does_not(tmp_path):
    """The AMD compile check passes for every configuration the dispatcher can choose on gfx942 and
    gfx90a (no VGPR spill or scratch, LDS within 64 KB, every wave resident), what lies just past each
    limit fails it, and the cooperative tables declare what their builds take (the most, not more)."""
    out = tmp_path / "amd.json"
    _amd_check("--probe", "--json", str(out))
    results = [amd_compile_check.AmdResult(**{k: v for k, v in r.items() if k not in ("ok", "waves_per_simd")})
               for r in json.loads(out.read_text())]
    most = {}  # per declared configuration (shared by both architectures' tables): the most its builds take
    beyond_limits = {}  # per cell, dtype and variant (one table for both architectures): builds past its top
    for arch in AMD:
        mine = [r for r in results if r.arch == arch]
        chosen = [r for r in mine if amd_compile_check.is_dispatcher_config(r)]
        assert chosen and all(r.ok for r in chosen), [r for r in chosen if not r.ok][:3]
        tile, coop = dispatch.tables(arch)
        for (cell, dtype), table in list(tile.items()) + list(coop.items()):
            name = str(dtype).replace("torch.", "")
            coop_kernel = (cell, dtype) in coop and table is coop[(cell, dtype)]
            beyond = [r for r in mine if r.cell == cell and r.dtype == name and r.block_h == 2 * max(table)
                      and r.kernel.startswith("coop") == coop_kernel]
            top = table[max(table)]
            if coop_kernel and top.fwd_chunk and top.w_chunk:
                continue  # re-read in chunks, any K compiles: the table's top is a choice
            beyond_limits[(cell, dtype, coop_kernel)] = beyond_limits.get((cell, dtype, coop_kernel), []) + beyond
        for r in chosen:
            if r.kernel.startswith("coop"):
                declared = dispatch.coop_config(r.cell, getattr(torch, r.dtype), r.block_h, r.precision, arch)
                old = most.get(id(declared), (declared, 0, 0))
                most[id(declared)] = (declared, max(old[1], r.vgprs), max(old[2], r.lds_bytes))
        for r in chosen:  # the waves chosen split the MFMA dots without repeating
            assert not r.mfma or r.mfma_efficiency >= 0.9, r
    for beyond in beyond_limits.values():  # fails on at least one architecture that shares the table
        assert beyond and not all(r.ok for r in beyond), beyond[0]
    for declared, vgprs, lds in most.values():
        assert (declared.registers, declared.shared_bytes) == (vgprs, lds), (declared, vgprs, lds)
