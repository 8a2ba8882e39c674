"""The calibration against published peer times (issue 21): the committed table is what the committed
peer analyses give, and the serial chain reads the control bits as documented. Needs neither FlashRNN
nor a compiler: the peers' analyses are committed under reports/static/peers/."""
import json

from rnn_triton import calibration, sass, static_cost


def _line(addr, text, stall=1, wr=7, rd=7, wait=0):
    """One instruction of nvdisasm's `-c -g -hex` output with the given control bits."""
    ctrl = stall | (wr << 5) | (rd << 8) | (wait << 11)
    hi = (ctrl << 41) | 0x7945
    return (f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000007919 */\n"
            f"                                                   /* 0x{hi:016x} */\n")


def _listing(lines):
    return '\t//## File "/x/k.py", line 1\n' + "".join(x if isinstance(x, str) else _line(*x) for x in lines)


def test_committed_table_is_what_the_peer_analyses_give():
    result = json.loads(json.dumps(calibration.calibrate(), sort_keys=True, default=list))
    assert result == json.loads((calibration.OUT_DIR / "calibration.json").read_text()), \
        "run python -m rnn_triton.calibration"
    assert (calibration.OUT_DIR / "calibration.md").read_text() == calibration.markdown(calibration.calibrate())


def test_every_published_configuration_is_estimated_or_says_why():
    estimated = {(c["backend"], c["DH"], c["NH"]) for c in calibration.CONFIGS}
    assert set(calibration.PUBLISHED) == estimated | set(calibration.NOT_ESTIMATED)
    rows = calibration.calibrate()["rows"]
    # DH=128: the figure says "OOSM" for fwd+bwd; the compiled backward asks for more than an SM has
    assert [r["bwd_launches"] for r in rows if r["DH"] == 128] == [False]
    for row in rows:
        for mode, c in row["compare"].items():
            lo, hi = c["estimate_ms"]
            assert 0 < lo <= hi, mode
            assert c["ratio"] == (c["published_ms"] / lo, c["published_ms"] / hi)


def test_peer_estimate_is_the_unchanged_step_model_times_T():
    """The calibration multiplies static_cost's own per-step cycles by T and the waves; it has no
    constant of its own in that path."""
    peer = calibration.load_peer("flashrnn_triton_lstm_fw_dh64")
    k = calibration.kernel_estimate(peer, 12, 1024)
    step = static_cost.step_counts(peer["sass"], 1, 1)
    r = type("R", (), {"kernel": "peer", "num_warps": peer["build"]["num_warps"]})
    lo, hi = static_cost.step_cycles(r, step, 12, 2)["cycles"]
    assert k["waves"] == 1
    assert k["ms"] == (lo * 1024 / (static_cost.CLOCK_GHZ * 1e6), hi * 1024 / (static_cost.CLOCK_GHZ * 1e6))


def test_serial_chain_reads_stalls_and_scoreboard_waits():
    """sass.analyze's serial chain (correction 3), on a known loop."""
    body = [".L_x_0:\n",
            (0x00, "LDS R4, [R2]", 1, 0),                 # shared load, result on scoreboard 0
            (0x10, "FADD R5, R4, R4", 4, 7, 7, 0b1),      # waits for it: 29 cycles after the LDS
            (0x20, "MUFU.EX2 R6, R5", 1, 1),              # MIO producer on scoreboard 1
            (0x30, "FMUL R7, R6, R6", 2, 7, 7, 0b10),     # waits for it: 8 (lo) or 29 (hi) cycles
            (0x40, "LDL R8, [R1]", 1, 2),                 # a spill reload on scoreboard 2
            (0x50, "FADD R9, R8, R7", 1, 7, 7, 0b100),    # waits for it: 40 (L1) or 260 (L2)
            (0x60, "BRA `(.L_x_0)", 1)]
    instrs, labels = sass.parse(_listing(body))
    assert len(sass.find_loops(instrs, labels)) == 1
    c = sass._counts(instrs, {})
    assert c["count"]["local"] == 1 and c["bytes"]["local"] == 128
    # LDS@0; FADD@29 (stall 4); MUFU@33; FMUL@33+lat (stall 2); LDL; FADD@LDL+lat (1); BRA (1)
    assert c["serial"]["local_l1"] == [29 + 4 + 8 + 2 + 40 + 1 + 1, 29 + 4 + 29 + 2 + 40 + 1 + 1]
    assert c["serial"]["local_l2"][0] == 29 + 4 + 8 + 2 + 260 + 1 + 1


def test_spills_fit_l1_by_the_carveout_left():
    # FlashRNN's Triton backward: 1776 B spilled per thread x 128 threads beside 94 KiB of shared memory
    # (carve-out 100 KB, 156 KB of L1 left): does not fit, reloads come from L2
    assert not calibration.spills_fit_l1(1776, 128, 96258)
    assert calibration.spills_fit_l1(0, 128, 37120)
    assert calibration.spills_fit_l1(512, 128, 96258)  # 64 KiB fits in 156 KB


def test_peer_analyses_are_this_reader_s():
    """A change to sass.py's code leaves the committed peer analyses stale: re-import them
    (python -m rnn_triton.calibration --import-peer NAME CUBIN, from the cubins calibration.md describes)."""
    for path in sorted(calibration.PEERS_DIR.glob("*.json")):
        assert json.loads(path.read_text())["analysis_version"] == sass.VERSION, path.name


def test_peer_builds_record_how_they_were_made():
    for name in ("flashrnn_triton_lstm_fw_dh64", "flashrnn_triton_lstm_bw_dh64"):
        b = calibration.load_peer(name)["build"]
        assert b["num_warps"] == 4 and b["constexprs"]["siz_B"] == "16" and b["constexprs"]["DH"] == "64"
        assert b["triton"] == "3.0.0" and b["source_sha256"]
    assert calibration.load_peer("flashrnn_triton_lstm_bw_dh64")["build"]["spill_bytes"] > 0


def test_peer_listing_reads_one_function_without_the_code_never_run():
    """calibration.analyze_listing (FlashRNN's CUDA backward): a second kernel at the same addresses is
    left out, and so is a BRA.DIV's out-of-line path, whose jump back would read as a loop overlapping
    the real one without nesting in it."""
    head = "//--------------------- .text.{} --------------------------\n"
    listing = _listing([head.format("_Z5otherv"), ".L_x_0:\n", (0x00, "FADD R1, R1, R1"),
                        (0x10, "BRA `(.L_x_0)"),
                        head.format("_Z6kernelv"), (0x00, "S2R R0, SR_TID.X"), ".L_x_1:\n",
                        (0x10, "FADD R1, R1, R1"), (0x20, "BRA.DIV UR7, `(.L_x_2)"), ".L_x_3:\n",
                        (0x30, "FMUL R2, R1, R1"), (0x40, "@P0 BRA `(.L_x_1)"), (0x50, "EXIT"), ".L_x_2:\n",
                        (0x60, "NOP"), (0x70, "BRA `(.L_x_3)")])
    spans = lambda a: [(lp["start"], lp["end"]) for lp in a["loops"]]  # noqa: E731
    assert spans(calibration.analyze_listing(listing, function="_Z6kernel")) == [(0x10, 0x40), (0x30, 0x70)]
    a = calibration.analyze_listing(listing, function="_Z6kernel", not_run=[(0x60, 0x70)])
    assert spans(a) == [(0x10, 0x40)] and a["loops"][0]["count"]["total"] == 4 and a["instructions"] == 6
    assert spans(calibration.analyze_listing(listing, function="_Z5other")) == [(0x00, 0x10)]
