"""The main job: check rnn_triton's LSTM, GRU and RNN against torch.nn, then time both.

    python bench/run.py                  # GPU: default sweep vs cuDNN; CPU: small interpreter run
    python bench/run.py --preset tiny    # the smallest sweep (CI runs it)
    python bench/run.py --cells LSTM GRU

On a GPU: bf16, B=16, T=1024, H from 64 up to each cell's limit, forward and forward+backward, timed
with triton.testing.do_bench (median, p20, p80) against torch.nn (cuDNN). Without a GPU the kernels
run through Triton's interpreter on the CPU: the correctness check is real, the timings are not (the
interpreter is orders of magnitude slower than any GPU and says nothing about one).

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
    # name: (dtype, B, T, input size, hidden sizes); a cell skips the sizes beyond its kernel's limit
    "tiny": ("float32", 4, 8, 16, [16, 32]),
    "cpu": ("float32", 8, 32, 32, [16, 64]),
    "default": ("bfloat16", 16, 1024, 64, [64, 128, 256]),
}

#: cell -> (ours, torch.nn class, constructor extras)
MODULES = {
    "LSTM": (rnn_triton.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnn_triton.GRU, torch.nn.GRU, {}),
    "RNN_TANH": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (rnn_triton.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
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


def check_and_time(cell, dtype, B, T, I, H, reps):
    device = torch.device("cuda" if ON_GPU else "cpu")
    ours_cls, ref_cls, extra = MODULES[cell]
    ours = ours_cls(I, H, **extra).to(device, dtype)
    ref = ref_cls(I, H, **extra).to(device, dtype)
    ref.load_state_dict(ours.state_dict())
    exact = ref_cls(I, H, **extra).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True)
    plan = ours.kernel_plan(x)
    assert plan.uses_triton, plan.reason

    # Correctness first, against torch.nn in float64: a wrong kernel never posts a time.
    y, _ = ours(x)
    y_exact, _ = exact(x.detach().double().cpu())
    y_torch, _ = ref(x)
    err = ((y.double().cpu() - y_exact).norm() / y_exact.norm()).item()
    err_torch = ((y_torch.double().cpu() - y_exact).norm() / y_exact.norm()).item()
    if err > max(4 * err_torch, 1e-5):
        raise SystemExit(f"{cell} H={H}: rnn_triton's output is off (rel err {err:.2e}, "
                         f"torch.nn's {err_torch:.2e})")

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
                             else err_torch, config=dict(cell=cell, dtype=str(dtype).replace("torch.", ""),
                                                         B=B, T=T, I=I, H=H, kernel=plan.config.variant,
                                                         block_h=plan.config.block_h,
                                                         num_warps=plan.config.num_warps)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="default" if ON_GPU else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default reports/<gpu or cpu>)")
    parser.add_argument("--cells", nargs="+", choices=MODULES, default=list(MODULES))
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
    device = torch.device("cuda" if ON_GPU else "cpu")
    for cell in args.cells:
        for H in hidden:
            if not dispatch.choose(cell, H, dtype, device).uses_triton:
                print(f"{cell} H={H}: skipped, {dispatch.choose(cell, H, dtype, device).reason}")
                continue
            new = check_and_time(cell, dtype, B, T, I, H, args.reps)
            for r in new:
                print(f"{cell:8s} H={H:5d} {r['provider']:11s} {r['mode']:17s} {r['ms']:10.3f} ms "
                      f"({r['us_per_step']:.2f} us/step)", flush=True)
            rows += new
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(env | r) + "\n")
    report = _report(rows, env, args.preset)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(report)
    print("\n" + report)
    print(f"wrote {out}/REPORT.md and {out}/results.jsonl")


def _report(rows, env, preset):
    lines = [f"# rnn_triton vs torch.nn ({env['gpu']})", ""]
    if not ON_GPU:
        lines += ["**CPU interpreter — timings not meaningful.** The kernels ran through Triton's "
                  "interpreter; torch.nn ran its CPU implementation. Only the correctness column says "
                  "something here.", ""]
    lines += [f"preset `{preset}`; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
              f"{env['timestamp']}", "",
              "| cell | H | mode | rnn_triton ms | torch.nn ms | speedup | rnn_triton us/step "
              "| rel err vs fp64 (ours / torch.nn) |",
              "|---|---|---|---|---|---|---|---|"]
    by_key = {(r["config"]["cell"], r["config"]["H"], r["mode"], r["provider"]): r for r in rows}
    for (cell, H, mode, provider), r in by_key.items():
        if provider != "rnn_triton":
            continue
        t = by_key[(cell, H, mode, "torch.nn")]
        lines.append(f"| {cell} | {H} | {mode} | {r['ms']:.3f} | {t['ms']:.3f} | {t['ms'] / r['ms']:.2f}x "
                     f"| {r['us_per_step']:.2f} | {r['rel_err_vs_fp64']:.1e} / {t['rel_err_vs_fp64']:.1e} |")
    c = rows[0]["config"]
    lines += ["", f"dtype {c['dtype']}, B={c['B']}, T={c['T']}, input size {c['I']}; "
              "median of triton.testing.do_bench (p20/p80 in results.jsonl)." if ON_GPU else
              f"dtype {c['dtype']}, B={c['B']}, T={c['T']}, input size {c['I']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
