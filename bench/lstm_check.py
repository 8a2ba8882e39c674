"""The main job, for now: check rnn_triton.LSTM against torch.nn.LSTM, then time both.

    python bench/lstm_check.py                 # GPU: default sweep vs cuDNN; CPU: tiny interpreter run
    python bench/lstm_check.py --preset tiny   # the smallest sweep (CI runs it)

On a GPU: bf16, B=16, T=1024, H from 64 to the kernel's limit, forward and forward+backward, timed
with triton.testing.do_bench (median, p20, p80) against torch.nn.LSTM (cuDNN). Without a GPU the
kernels run through Triton's interpreter on the CPU: the correctness check is real, the timings are
not (the interpreter is orders of magnitude slower than any GPU and says nothing about one).

Writes one JSON line per measurement to <out>/results.jsonl and a table to <out>/REPORT.md.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by rnn_triton)

import triton  # noqa: E402

import rnn_triton  # noqa: E402
from rnn_triton import dispatch  # noqa: E402

PRESETS = {
    # name: (dtype, B, T, input size, hidden sizes)
    "tiny": ("float32", 4, 8, 16, [16, 32]),
    "cpu": ("float32", 8, 32, 32, [16, 48, 64]),
    "default": ("bfloat16", 16, 1024, 64, [64, 96, 128]),
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _time_ms(fn, reps: int):
    """(median, p20, p80) in ms: do_bench on the GPU (warm-up, CUDA events), perf_counter on the CPU."""
    if ON_GPU:
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=reps))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return statistics.median(samples), q[0], q[-1]


def check_and_time(dtype, B, T, I, H, reps):
    device = torch.device("cuda" if ON_GPU else "cpu")
    ours = rnn_triton.LSTM(I, H).to(device, dtype)
    ref = torch.nn.LSTM(I, H).to(device, dtype)
    ref.load_state_dict(ours.state_dict())
    exact = torch.nn.LSTM(I, H).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True)
    plan = ours.kernel_plan(x)
    if not plan.uses_triton:
        raise SystemExit(f"H={H} {dtype}: no kernel serves it ({plan.reason})")

    # Correctness first, against torch.nn in float64: a wrong kernel never posts a time.
    y, _ = ours(x)
    y_exact, _ = exact(x.detach().double().cpu())
    y_torch, _ = ref(x)
    err = ((y.double().cpu() - y_exact).norm() / y_exact.norm()).item()
    err_torch = ((y_torch.double().cpu() - y_exact).norm() / y_exact.norm()).item()
    if err > max(4 * err_torch, 1e-5):
        raise SystemExit(f"H={H}: rnn_triton's output is off (rel err {err:.2e}, torch.nn's {err_torch:.2e})")

    dy = torch.randn_like(y)
    rows = []
    for provider, module in (("rnn_triton", ours), ("torch.nn", ref)):
        def forward():
            with torch.no_grad():
                module(x)

        def forward_backward():
            out, _ = module(x)
            out.backward(dy)

        for mode, fn in (("forward", forward), ("forward+backward", forward_backward)):
            p50, p20, p80 = _time_ms(fn, reps)
            rows.append(dict(provider=provider, mode=mode, ms=p50, p20=p20, p80=p80,
                             us_per_step=p50 * 1e3 / T, rel_err_vs_fp64=err if provider == "rnn_triton"
                             else err_torch, config=dict(cell="LSTM", dtype=str(dtype).replace("torch.", ""),
                                                         B=B, T=T, I=I, H=H, kernel=plan.config.variant,
                                                         block_h=plan.config.block_h,
                                                         num_warps=plan.config.num_warps)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="default" if ON_GPU else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default reports/<gpu or cpu>)")
    parser.add_argument("--reps", type=int, default=200, help="do_bench time budget in ms (GPU)")
    args = parser.parse_args(argv)
    dtype_name, B, T, I, hidden = PRESETS[args.preset]
    dtype = getattr(torch, dtype_name)
    gpu = torch.cuda.get_device_name() if ON_GPU else "cpu-interpreter"
    out = args.out or os.path.join("reports", gpu.lower().replace("nvidia ", "").replace(" ", "-"))
    os.makedirs(out, exist_ok=True)
    env = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               commit=_commit(), timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    rows = []
    for H in hidden:
        H_rows = check_and_time(dtype, B, T, I, H, args.reps)
        for r in H_rows:
            print(f"H={H:5d} {r['provider']:11s} {r['mode']:17s} {r['ms']:10.3f} ms  ({r['us_per_step']:.2f} us/step)",
                  flush=True)
        rows += H_rows
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(env | r) + "\n")
    report = _report(rows, env, args.preset)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(report)
    print("\n" + report)
    print(f"wrote {out}/REPORT.md and {out}/results.jsonl")


def _report(rows, env, preset):
    lines = [f"# LSTM: rnn_triton vs torch.nn ({env['gpu']})", ""]
    if not ON_GPU:
        lines += ["**CPU interpreter — timings not meaningful.** The kernels ran through Triton's "
                  "interpreter; torch.nn ran its CPU implementation. Only the correctness column says "
                  "something here.", ""]
    lines += [f"preset `{preset}`; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
              f"{env['timestamp']}", "",
              "| H | mode | rnn_triton ms | torch.nn ms | speedup | rnn_triton us/step | rel err vs fp64 (ours / torch.nn) |",
              "|---|---|---|---|---|---|---|"]
    by_key = {(r["config"]["H"], r["mode"], r["provider"]): r for r in rows}
    for (H, mode, provider), r in by_key.items():
        if provider != "rnn_triton":
            continue
        t = by_key[(H, mode, "torch.nn")]
        lines.append(f"| {H} | {mode} | {r['ms']:.3f} | {t['ms']:.3f} | {t['ms'] / r['ms']:.2f}x "
                     f"| {r['us_per_step']:.2f} | {r['rel_err_vs_fp64']:.1e} / {t['rel_err_vs_fp64']:.1e} |")
    c = rows[0]["config"]
    lines += ["", f"dtype {c['dtype']}, B={c['B']}, T={c['T']}, input size {c['I']}; "
              "median of triton.testing.do_bench (p20/p80 in results.jsonl)." if ON_GPU else
              f"dtype {c['dtype']}, B={c['B']}, T={c['T']}, input size {c['I']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
