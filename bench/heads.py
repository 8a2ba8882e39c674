"""Multi-head recurrences (FlashRNN's layout): rnn_triton.flashrnn against FlashRNN's own backends and
against cuDNN at the same total hidden size (a dense layer: more work, the baseline users switch from).

    python bench/heads.py                      # on a GPU: H = 768 as 12 heads of 64 and 6 of 128
    python bench/heads.py --preset tiny        # no GPU: a dry run through the interpreter

Writes HEADS.md (a table per mode) and heads.jsonl (one row per provider, configuration and mode:
p20/p50/p80 ms, µs per step, relative error of the output against float64) under --out. FlashRNN's
providers run where the ``flashrnn`` package imports and a GPU is present (its CUDA backends compile an
extension per size at first use: that compile is outside the timed region, in the warm-up).
"""
import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run import ON_GPU, time_ms  # noqa: E402
from rnn_triton.flashrnn import FUNCTIONS, flashrnn  # noqa: E402

PRESETS = {
    "default": dict(functions=["lstm", "gru", "slstm"], heads=[(12, 64), (6, 128)], batch=[16, 64], seq=[1024],
                    dtypes=["bfloat16"]),
    "tiny": dict(functions=["lstm", "slstm"], heads=[(2, 16)], batch=[2], seq=[4], dtypes=["float32"]),
}
PROVIDERS = ["rnn_triton", "flashrnn-cuda_fused", "flashrnn-cuda", "flashrnn-triton_fused", "cudnn-dense"]
MODES = ["forward", "forward+backward"]


class Unavailable(Exception):
    pass


def _flashrnn_backend(backend):
    if not ON_GPU:
        raise Unavailable("FlashRNN's backends need a GPU")
    try:
        from flashrnn import flashrnn as theirs
    except ImportError as exc:
        raise Unavailable(f"flashrnn not importable: {exc}")
    return lambda Wx, R, b, function: theirs(Wx, R, b, function=function, backend=backend,
                                             dtype=str(Wx.dtype).replace("torch.", ""))[0]


def build(provider, function, NH, DH, inputs):
    """A callable (Wx, R, b) -> the output sequence h [B, T, NH, DH] (or the dense layer's [B, T, H])."""
    if provider == "rnn_triton":
        return lambda Wx, R, b: flashrnn(Wx, R, b, function=function)[0][0]
    if provider.startswith("flashrnn-"):
        backend = provider.removeprefix("flashrnn-")
        if backend == "triton_fused" and (function not in ("lstm", "slstm") or DH > 64):
            raise Unavailable("FlashRNN's Triton backend: lstm and slstm, head size <= 64")
        run = _flashrnn_backend(backend)
        return lambda Wx, R, b: run(Wx, R, b, function)[0]
    if provider == "cudnn-dense":
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}.get(function)
        if cls is None:
            raise Unavailable("torch.nn has no sLSTM")
        Wx = inputs[0]
        dense = cls(NH * DH, NH * DH, batch_first=True).to(Wx.device, Wx.dtype)
        # an input of H features (cuDNN projects it itself: a GEMM over all steps, as ours before the call)
        return lambda Wx, R, b: dense(Wx[:, :, 0].flatten(2))[0]
    raise ValueError(provider)


def run_config(function, NH, DH, B, T, dtype_name, budget_ms, providers):
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = getattr(torch, dtype_name)
    _, G, G_R, G_B, _ = FUNCTIONS[function]
    inputs = [torch.randn(B, T, G, NH, DH, device=device, dtype=dtype, requires_grad=True),
              (torch.randn(G_R, NH, DH, DH, device=device) / DH ** 0.5).to(dtype).requires_grad_(),
              torch.randn(G_B, NH, DH, device=device, dtype=dtype, requires_grad=True)]
    with torch.no_grad():
        want = flashrnn(*[x.detach().cpu().double() for x in inputs], function=function)[0][0] \
            if not ON_GPU or dtype == torch.float64 else None
    config = dict(function=function, heads=NH, head_size=DH, H=NH * DH, B=B, T=T, dtype=dtype_name)
    rows = []
    for provider in providers:
        try:
            fn = build(provider, function, NH, DH, inputs)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(*inputs)
        except Unavailable as why:
            rows.append(dict(provider=provider, config=config, skipped=str(why)))
            continue
        err = None
        if want is not None and provider != "cudnn-dense":
            err = ((out.double().cpu() - want).norm() / want.norm()).item()
        dy = torch.randn_like(out)
        for mode in MODES:
            if mode == "forward":
                def step():
                    with torch.no_grad():
                        fn(*inputs)
            else:
                def step():
                    fn(*inputs).backward(dy)
            p20, p50, p80 = time_ms(step, budget_ms)
            rows.append(dict(provider=provider, config=config, mode=mode, p20=p20, p50=p50, p80=p80,
                             us_per_step=p50 * 1e3 / T, rel_err_vs_fp64=err))
    return rows


def table(rows) -> str:
    lines = []
    for mode in MODES:
        lines += [f"\n### {mode}\n", "| function | heads x size | B | T | dtype | " + " | ".join(PROVIDERS) + " |",
                  "|---" * (5 + len(PROVIDERS)) + "|"]
        keyed = {}
        for r in rows:
            c = r["config"]
            key = (c["function"], c["heads"], c["head_size"], c["B"], c["T"], c["dtype"])
            cell = f"skipped: {r['skipped']}" if "skipped" in r else (
                f"{r['us_per_step']:.2f} µs/step" if r.get("mode") == mode else None)
            if cell is not None:
                keyed.setdefault(key, {})[r["provider"]] = cell
        for (fn, nh, dh, b, t, d), cells in keyed.items():
            lines.append(f"| {fn} | {nh} x {dh} | {b} | {t} | {d} | "
                         + " | ".join(cells.get(p, "-") for p in PROVIDERS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default" if ON_GPU else "tiny", choices=sorted(PRESETS))
    parser.add_argument("--out", default="bench_heads")
    parser.add_argument("--budget-ms", type=float, default=50 if ON_GPU else 10)
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    args = parser.parse_args(argv)
    p = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    gpu = torch.cuda.get_device_name() if ON_GPU else "CPU (interpreter: not a performance number)"
    for function, (NH, DH), B, T, dtype in itertools.product(p["functions"], p["heads"], p["batch"], p["seq"],
                                                               p["dtypes"]):
        rows += run_config(function, NH, DH, B, T, dtype, args.budget_ms, args.providers)
        # after every configuration: a run cut short by a timeout keeps what it measured
        (out / "heads.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "HEADS.md").write_text(f"# Multi-head recurrences on {gpu}\n\nMade by `python bench/heads.py "
                                      f"--preset {args.preset}`; cudnn-dense is torch.nn's dense layer of the same "
                                      f"total H (more work: H^2 recurrent weights instead of H x head size).\n"
                                      + table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
