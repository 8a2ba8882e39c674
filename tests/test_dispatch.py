"""The dispatcher's choices, and the sm_90 compile check behind its limits."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rnn_triton import compile_check, dispatch

CUDA = torch.device("cuda")


@pytest.mark.parametrize("H,block_h", [(1, 16), (16, 16), (17, 32), (48, 64), (64, 64), (128, 128)])
def test_hidden_size_pads_to_a_power_of_two(H, block_h):
    plan = dispatch.choose("LSTM", H, torch.bfloat16, CUDA)
    assert plan.config.block_h == block_h and plan.config.variant == "tile-persistent"


def test_limits_per_dtype():
    h200 = dispatch.H200
    # the tile kernel takes every H to its top (the kernels see H padded to a multiple of 16)
    for H in (100, 120, 128):
        assert dispatch.choose("LSTM", H, torch.float16, CUDA).config.variant == "tile-persistent"
    # past it, the cooperative kernel
    assert dispatch.choose("LSTM", 129, torch.bfloat16, CUDA, props=h200).config.variant == "cooperative"
    for cell in ("LSTM", "GRU"):  # float32: the tile kernel to 64, the cooperative one to 1024
        for H in (17, 40, 64):
            assert dispatch.choose(cell, H, torch.float32, CUDA, props=h200).config.variant == "tile-persistent"
        for H in (65, 100, 128, 200, 1000, 1024):
            assert dispatch.choose(cell, H, torch.float32, CUDA, props=h200).config.variant == "cooperative"
        assert "limit" in dispatch.choose(cell, 1025, torch.float32, CUDA, props=h200).reason
    assert dispatch.choose("LSTM", 1024, torch.bfloat16, CUDA, props=h200).config.variant == "cooperative"
    # Half precision keeps W_hh and W_hh^T on chip at every size, any H
    for cell, H in (("LSTM", 300), ("LSTM", 1000), ("LSTM", 1024), ("GRU", 200), ("GRU", 1000), ("GRU", 1024)):
        c = dispatch.choose(cell, H, torch.bfloat16, CUDA, props=h200).config
        assert c.variant == "cooperative" and (c.fwd_chunk, c.w_chunk) == (0, 0), (cell, H)
    assert not dispatch.choose("GRU", 2048, torch.bfloat16, CUDA, props=h200).uses_triton


def test_tile_warps_follow_the_precision(monkeypatch):
    """float32's tile builds take their warps per precision: TF32 dots split over at most as many warps
    as they have 16x8 tiles (none repeats the product), IEEE fp32 (FFMA) its own count; half precision
    ignores allow_tf32."""
    for allow_tf32 in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
        for cell in ("LSTM", "GRU", "RNN_TANH"):
            for H in (16, 32):
                fp32 = dispatch.choose(cell, H, torch.float32, CUDA, 16, dispatch.H200).config
                table = dispatch.TILE_CONFIGS[(cell, torch.float32)][H]
                want = table if allow_tf32 else dispatch.TILE_IEEE_WARPS.get((cell, H), table)
                assert fp32.variant == "tile-persistent" and fp32.num_warps == want, (cell, H, allow_tf32)
                half = dispatch.choose(cell, H, torch.bfloat16, CUDA, 16, dispatch.H200).config
                assert half.num_warps == dispatch.TILE_CONFIGS[(cell, torch.bfloat16)][H]
                # a warp's mma.sync is 16 units x 8 rows: at most (H/16) x (16/8) warps share the dot
                assert half.num_warps <= max(1, H // 16) * 2
    assert dispatch.TILE_IEEE_WARPS[("LSTM", 32)] != dispatch.TILE_CONFIGS[("LSTM", torch.float32)][32]
    ieee = [c for c in compile_check.dispatcher_configs() if c[0] == "fwd" and c[1] == "LSTM"
            and c[2] == torch.float32 and c[3] == 32 and c[7] == "ieee"]
    assert ieee and all(c[5] == dispatch.TILE_IEEE_WARPS[("LSTM", 32)] for c in ieee)


def test_cooperative_k_is_one_or_two_powers_of_two():
    assert dispatch.k_tiles(1024) == {"BLOCK_K": 1024, "BLOCK_K2": 0}
    assert dispatch.k_tiles(768) == {"BLOCK_K": 512, "BLOCK_K2": 256}
    with pytest.raises(ValueError, match="896"):
        dispatch.k_tiles(896)
    for table in dispatch.COOP_CONFIGS.values():  # each warp's slice of the tail: a dot's K of 16 at least
        for k, config in table.items():
            assert dispatch.k_tiles(k)["BLOCK_K2"] in (0, *range(16 * config.num_warps, k, 16)), k


def test_the_smallest_cooperative_build_at_or_above_h_serves(monkeypatch):
    """No cooperative half-precision GRU or LSTM build at BLOCK_K = 128 (the tile kernel takes H to 128):
    129 pads K to 256. IEEE float32 (allow_tf32 off) runs its own builds: past 256 they re-read W_hh in
    chunks (whole tiles spill on FMA)."""
    h200 = dispatch.H200
    for dtype in (torch.bfloat16, torch.float16):
        for cell in ("GRU", "LSTM"):
            assert dispatch.choose(cell, 129, dtype, CUDA, props=h200).config.block_h == 256
            assert dispatch.choose(cell, 100, dtype, CUDA, props=h200).config.variant == "tile-persistent"
        assert dispatch.choose("GRU", 600, dtype, CUDA, props=h200).config.block_h == 768
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tf32 = dispatch.choose("LSTM", 512, torch.float32, CUDA, props=h200).config
    assert (tf32.fwd_chunk, tf32.w_chunk) == (0, 0)  # W_hh and W_hh^T on chip
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ieee = dispatch.choose("LSTM", 512, torch.float32, CUDA, props=h200).config
    assert ieee.variant == "cooperative" and ieee.fwd_chunk and ieee.w_chunk
    assert dispatch.choose("RNN_TANH", 2048, torch.float32, CUDA, props=h200).config.variant == "cooperative"


def test_device_and_dtype_rules(monkeypatch):
    assert not dispatch.choose("LSTM", 16, torch.float64, CUDA).uses_triton or \
        os.environ.get("TRITON_INTERPRET") == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in dispatch.choose("LSTM", 16, torch.float32, torch.device("cpu")).reason
    assert "float64" in dispatch.choose("LSTM", 16, torch.float64, CUDA).reason
    assert "dtype" in dispatch.choose("LSTM", 16, torch.int32, CUDA).reason


def _compile_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "rnn_triton.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=1200)


def test_every_dispatcher_config_compiles_for_sm90_and_the_next_size_does_not(tmp_path):
    """The compile check passes for all the dispatcher's configurations (no spills, shared memory
    within 227 KB), and what lies just past each declared limit fails it: the limits are measured."""
    out = tmp_path / "sm90.json"
    proc = _compile_check("--probe", "--json", str(out), "--verify", "1")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    _check_cooperative_results(results)
    results = [r for r in results if not r["kernel"].startswith("coop")]
    for (cell, dtype), table in dispatch.TILE_CONFIGS.items():
        name = str(dtype).replace("torch.", "")
        mine = [r for r in results if r["cell"] == cell and r["dtype"] == name]
        top = max(table)
        chosen = [r for r in mine if compile_check.is_dispatcher_config(compile_check.Result(
            **{k: v for k, v in r.items() if k != "ok"}))]
        assert len(chosen) >= 4 * len(table) and all(r["ok"] and r["spill_bytes"] == 0 for r in chosen)
        for bad in dispatch.PACKED_COOPERATIVE:  # the exclusions are measured, not guessed
            if bad[:2] == (cell, dtype):
                builds = [r for r in mine if "_packed" in r["kernel"] and r["block_h"] == bad[2]]
                assert builds and not all(r["ok"] for r in builds), f"{bad}: the packed tile builds fit"
        beyond = [r for r in mine if r["block_h"] == 2 * top]
        assert beyond and not all(r["ok"] for r in beyond), f"{cell} {name}: {2 * top} fits too"


def _check_cooperative_results(results):
    """Every cooperative configuration the dispatcher can choose fits on sm_90 within the registers and
    shared memory the capacity model assumes, each declared as the most its builds take (a table entry
    shared by several cells or dtypes: over all of them); BLOCK_K twice the largest does not fit."""
    most = {}  # per declared configuration: (it, the most registers and shared memory a build takes)
    for (cell, dtype), table in dispatch.COOP_CONFIGS.items():
        name = str(dtype).replace("torch.", "")
        mine = [r for r in results if r["kernel"].startswith("coop") and r["cell"] == cell and r["dtype"] == name]
        chosen = [r for r in mine if compile_check.is_dispatcher_config(compile_check.Result(
            **{k: v for k, v in r.items() if k != "ok"}))]
        precisions = 2 if name == "float32" else 1
        assert len(chosen) >= 4 * precisions * len(table) and all(r["ok"] for r in chosen), \
            [r for r in chosen if not r["ok"]]
        for r in chosen:
            declared = dispatch.coop_config(cell, dtype, r["block_h"], r["precision"])
            registers = declared.registers_for(r["kernel"].endswith("_packed"))
            assert r["registers"] <= registers and r["shared_bytes"] <= declared.shared_bytes, r
            old = most.get(id(declared), (declared, 0, 0))
            most[id(declared)] = (declared, max(old[1], r["registers"]), max(old[2], r["shared_bytes"]))
        beyond = [r for r in mine if r["block_h"] == 2 * max(table)]
        top = table[max(table)]
        if top.fwd_chunk and top.w_chunk:  # re-read in chunks, any K compiles: the table's top is a choice
            assert beyond and all(r["ok"] for r in beyond if r["precision"] == "tf32")
        else:
            assert beyond and not all(r["ok"] for r in beyond), f"{cell} {name}: {2 * max(table)} fits too"
    for declared, registers, shared in most.values():  # declared as compiled, not above it
        assert (declared.registers, declared.shared_bytes) == (registers, shared), declared


def _abort_on_backward(kernel, *args):
    """A stand-in for compile_one whose backward builds kill their process, as an LLVM assertion does."""
    if kernel == "bwd":
        os._exit(134)  # (quietly: os.abort would dump a fatal-error report)
    return compile_check.Result(*compile_check._result_fields(kernel, *args))


def test_a_compiler_abort_is_reported_not_fatal(monkeypatch):
    """A build whose compile kills its worker is retried alone, then reported as an error; the builds
    beside it still get their results."""
    monkeypatch.setattr(compile_check, "compile_one", _abort_on_backward)
    configs = [(kernel, "LSTM", torch.bfloat16, 16, 16, 1, True, "ieee") for kernel in ("fwd", "bwd", "fwd_bidir")]
    results = compile_check.run(configs, jobs=2)
    assert [r.kernel for r in results] == ["fwd", "bwd", "fwd_bidir"]
    assert results[0].error == "" and results[2].error == ""
    assert "aborted" in results[1].error and not results[1].ok
