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
    assert dispatch.choose("LSTM", 128, torch.float16, CUDA).config.variant == "tile-persistent"
    # Past the tile kernel's limits (120: not a multiple of 16; 129) the cooperative kernel takes over.
    assert dispatch.choose("LSTM", 120, torch.float16, CUDA, props=h200).config.variant == "cooperative"
    assert dispatch.choose("LSTM", 129, torch.bfloat16, CUDA, props=h200).config.variant == "cooperative"
    assert dispatch.choose("LSTM", 64, torch.float32, CUDA).config.variant == "tile-persistent"
    # float32 LSTM and GRU: any H to 1024 (the tile kernel's 32 and 64 take multiples of 16 only)
    for cell in ("LSTM", "GRU"):
        for H in (40, 100, 128, 200, 1000, 1024):
            assert dispatch.choose(cell, H, torch.float32, CUDA, props=h200).config.variant == "cooperative"
        assert "limit" in dispatch.choose(cell, 1025, torch.float32, CUDA, props=h200).reason
    assert dispatch.choose("LSTM", 17, torch.float32, CUDA, props=h200).config.variant == "cooperative"
    assert dispatch.choose("GRU", 17, torch.float32, CUDA, props=h200).config.variant == "tile-persistent"
    assert dispatch.choose("LSTM", 1024, torch.bfloat16, CUDA, props=h200).config.variant == "cooperative"
    # Half precision keeps W_hh and W_hh^T on chip, except H not a multiple of 16 at BLOCK_K 1024
    # (on chip it spills): the LSTM re-reads both in chunks, the GRU its backward's W_hh^T
    for cell, H in (("LSTM", 300), ("LSTM", 1024), ("GRU", 200), ("GRU", 1024)):
        c = dispatch.choose(cell, H, torch.bfloat16, CUDA, props=h200).config
        assert c.variant == "cooperative" and (c.fwd_chunk, c.w_chunk) == (0, 0), (cell, H)
    lstm = dispatch.choose("LSTM", 1000, torch.bfloat16, CUDA, props=h200).config
    gru = dispatch.choose("GRU", 1000, torch.bfloat16, CUDA, props=h200).config
    assert lstm.fwd_chunk and lstm.w_chunk and (gru.fwd_chunk, bool(gru.w_chunk)) == (0, True)
    assert dispatch.choose("GRU", 1024, torch.bfloat16, CUDA, props=h200).config.variant == "cooperative"
    assert not dispatch.choose("GRU", 2048, torch.bfloat16, CUDA, props=h200).uses_triton


def test_cooperative_k_is_one_or_two_powers_of_two():
    assert dispatch.k_tiles(1024) == {"BLOCK_K": 1024, "BLOCK_K2": 0}
    assert dispatch.k_tiles(768) == {"BLOCK_K": 512, "BLOCK_K2": 256}
    with pytest.raises(ValueError, match="896"):
        dispatch.k_tiles(896)
    for table in dispatch.COOP_CONFIGS.values():  # each warp's slice of the tail: a dot's K of 16 at least
        for k, config in table.items():
            assert dispatch.k_tiles(k)["BLOCK_K2"] in (0, *range(16 * config.num_warps, k, 16)), k


def test_a_size_whose_build_does_not_fit_takes_the_next_one_up(monkeypatch):
    """No cooperative half-precision GRU or LSTM build at BLOCK_K = 128 (the tile kernel takes H to 128,
    the GRU's and LSTM's multiples of 16 only): other H there pad K to 256. IEEE float32
    (allow_tf32 off) runs its own builds: past 256 they re-read W_hh in chunks (whole tiles spill on FMA)."""
    h200 = dispatch.H200
    for dtype in (torch.bfloat16, torch.float16):
        assert dispatch.choose("GRU", 256, dtype, CUDA, props=h200).config.block_h == 256
        assert dispatch.choose("GRU", 100, dtype, CUDA, props=h200).config.block_h == 256  # any H there
        assert dispatch.choose("GRU", 96, dtype, CUDA, props=h200).config.variant == "tile-persistent"
    # no cooperative LSTM build at 128 (the tile kernel takes its multiples of 16): H = 100 runs the 256 one
    assert dispatch.choose("LSTM", 100, torch.float16, CUDA, props=h200).config.block_h == 256
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
    proc = _compile_check("--probe", "--json", str(out), "--verify", "3")
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
        for excluded, suffix in ((dispatch.PACKED_MULTIPLES_OF_16, "_packed"),
                                 (dispatch.BIDIR_MULTIPLES_OF_16, "_bidir")):
            for bad in excluded:  # the exclusions are measured, not guessed
                if bad[:2] == (cell, dtype):
                    builds = [r for r in mine if r["kernel"].endswith(suffix) and r["block_h"] == bad[2]]
                    assert any(not r["ok"] for r in builds if not r["aligned"]), f"{bad}: any H fits {suffix}"
        beyond = [r for r in mine if r["block_h"] == 2 * top]
        assert beyond and not all(r["ok"] for r in beyond), f"{cell} {name}: {2 * top} fits too"
        if not table[top][1]:
            unaligned = [r for r in mine if r["block_h"] == top and not r["aligned"]]
            assert unaligned and not all(r["ok"] for r in unaligned), f"{cell} {name}: any H fits"


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
            declared = dispatch.coop_config(cell, dtype, r["block_h"], r["precision"], r["aligned"])
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
