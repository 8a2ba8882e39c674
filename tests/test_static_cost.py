"""The static per-step cost model: the SASS reader on known code, and the table of every dispatcher
build against its committed baseline (MMA efficiency, W_hh kept on chip)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnn_triton import dispatch, sass, static_cost

ROOT = Path(__file__).resolve().parents[1]


def _line(addr, text, wr=7, wait=0):
    """One instruction of nvdisasm's `-c -g -hex` output, with the given scoreboard bits."""
    hi = (((wait << 11) | (wr << 5) | 1) << 41) | 0x7945
    return (f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000007919 */\n"
            f"                                                   /* 0x{hi:016x} */\n")


def _listing(body):
    out = ['\t//## File "/x/kernels/persistent.py", line 10\n']
    for item in body:
        out.append(item if isinstance(item, str) and item.startswith(".L") else _line(*item))
    return "".join(out)


def _loops(body, tags=None):
    instrs, labels = sass.parse(_listing(body))
    loops = sass.find_loops(instrs, labels)
    return instrs, loops


def test_control_bits_and_loops_are_read():
    body = [(0x0, "S2R R0, SR_TID.X", 0), (0x10, "IADD3 R1, R0, 0x1, RZ", 7, 0b1),
            ".L_x_0:\n", (0x20, "LDG.E.128 R4, desc[UR4][R2.64]", 2), ".L_x_1:\n",
            (0x30, "FFMA R8, R4, R5, R6", 7, 0b100), (0x40, "@P0 BRA `(.L_x_1)"), (0x50, "@P1 BRA `(.L_x_0)"),
            ".L_x_2:\n", (0x60, "BRA `(.L_x_2)")]
    instrs, loops = _loops(body)
    assert (instrs[0].wr_sb, instrs[1].wait, instrs[2].wr_sb, instrs[3].wait) == (0, 1, 2, 4)
    assert instrs[4].predicated and instrs[4].target == ".L_x_1"
    # two loops, the inner nested in the outer; the trap after EXIT (a jump to itself) is none
    assert [(lp.start, lp.end, lp.parent) for lp in loops] == [(0x20, 0x50, None), (0x30, 0x40, 0)]


def _trips(body):
    instrs, _ = sass.parse(_listing(body))
    return sass._round_trips(instrs, {})


def test_round_trips_count_waits_for_loads_issued_since_the_last_wait():
    together = [(0x0, "LDG.E R4, desc[UR4][R2.64]", 1), (0x10, "LDG.E R5, desc[UR4][R6.64]", 2),
                (0x20, "FADD R8, R4, R5", 7, 0b110)]
    assert _trips(together) == 1  # issued back to back, waited for together
    chained = [(0x0, "LDG.E R4, desc[UR4][R2.64]", 1), (0x10, "STS [R9], R4", 7, 0b10),
               (0x20, "LDG.E R5, desc[UR4][R6.64]", 1), (0x30, "STS [R9+0x4], R5", 7, 0b10)]
    assert _trips(chained) == 2  # the second issued only after the first returned
    staggered = [(0x0, "LDG.E R4, desc[UR4][R2.64]", 1), (0x10, "LDG.E R5, desc[UR4][R6.64]", 2),
                 (0x20, "FADD R8, R4, R4", 7, 0b10), (0x30, "FADD R8, R5, R5", 7, 0b100)]
    assert _trips(staggered) == 1  # the second wait is for a load in flight during the first
    prefetched = [(0x0, "FADD R8, R4, R4", 7, 0b10), (0x10, "LDG.E R4, desc[UR4][R2.64]", 1)]
    assert _trips(prefetched) == 1  # issued for the next iteration, waited for there: one per step
    assert _trips([(0x0, "LDS R4, [R2]", 1), (0x10, "FADD R8, R4, R4", 7, 0b10)]) == 0  # shared: no


def test_counts_bytes_and_mma_shapes():
    body = [(0x0, "LDSM.16.M88.4 R4, [R2]"), (0x10, "HMMA.16816.F32.BF16 R8, R4, R6, R8"),
            (0x20, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4].tnspB, R24"), (0x30, "LDG.E.128 R4, desc[UR4][R2.64]"),
            (0x40, "STG.E.U16 desc[UR4][R2.64], R4"), (0x50, "MUFU.EX2 R4, R4")]
    instrs, _ = sass.parse(_listing(body))
    c = sass._counts(instrs, {})
    assert c["count"]["mma"] == 2 and c["count"]["mufu"] == 1 and c["count"]["total"] == 6
    assert c["macs"] == 16 * 8 * 16 + 64 * 16 * 16 / 4  # HGMMA: a quarter per warp of its warpgroup
    # per warp: LDSM x4 512 B + wgmma's A and B from shared memory, a quarter per warp
    assert c["bytes"]["shared_read"] == 512 + (64 * 16 * 2 + 16 * 16 * 2) / 4
    assert c["bytes"]["global_loaded"] == 16 * 32 and c["bytes"]["global_stored"] == 2 * 32


def test_useful_work_of_a_step():
    lstm = dispatch.CELLS["LSTM"].num_gates
    assert static_cost.useful_macs("fwd", lstm, 128, 0) == 4 * 128 * 16 * 128
    assert static_cost.useful_macs("coop_bwd", lstm, 1024, 16) == 16 * 16 * 4 * 1024


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """`python -m rnn_triton.static_cost --check` (compiled builds, outside the interpreter; every build
    comes from the committed results unless its kernel's source changed)."""
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rnn_triton.static_cost", "--check", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=3000)
    return proc, json.loads((out / "static_cost.json").read_text()), out


def test_every_dispatcher_build_is_analysed_and_none_regresses(table):
    """CI's facts: every configuration the dispatcher can choose has its MMA efficiency, none is below
    its committed baseline, and none reads W_hh from global memory inside its time loop except the
    cooperative backward that re-reads it in chunks by design (``--check`` asserts all of it)."""
    proc, data, _ = table
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    facts = data["facts"]
    baseline = json.loads(static_cost.BASELINE_FILE.read_text())
    assert set(facts) == set(baseline)
    assert all(f["mma_efficiency"] is not None and f["mma_efficiency"] > 0 for f in facts.values())
    assert all(f["weight_loads_in_loop"] == 0 for cid, f in facts.items() if not f["w_chunk"])
    assert any(f["weight_loads_in_loop"] > 0 for f in facts.values() if f["w_chunk"])  # the reader sees them


def test_the_anchor_estimate_is_made_and_labelled(table):
    proc, data, out = table
    anchor = data["anchor"]
    assert anchor["label"] == static_cost.LABEL and "estimate" in static_cost.LABEL
    lo, hi = anchor["fwd"]["us"]
    assert 0 < lo <= hi and anchor["fwd_bwd"]["us"][0] > lo
    assert static_cost.LABEL in proc.stdout and (out / "static_cost.png").stat().st_size > 0


def test_the_committed_table_is_this_code_s(table):
    """reports/static/static_cost.json is what this code gives (rerun the command to refresh it)."""
    _, data, _ = table
    committed = json.loads((static_cost.OUT_DIR / "static_cost.json").read_text())
    assert committed["facts"] == data["facts"], "python -m rnn_triton.static_cost: the facts changed"
    assert committed["estimates"] == data["estimates"], "python -m rnn_triton.static_cost: the estimates changed"
