"""The main job: rnn_triton's LSTM, GRU and RNN against torch.nn (cuDNN) and other providers, checked
for correctness, timed, and written up as a report with plots.

    python bench/run.py                        # GPU: the default preset; CPU: the "cpu" preset
    python bench/run.py --preset tiny          # seconds (CI runs it on the CPU)
    python bench/run.py --cells LSTM --batch 16 64 --hidden 128 --seq 1024 --dtypes bfloat16

Each configuration: every provider is built from the same torch.nn weights and fed the same random
inputs; its output is checked against torch.nn first (a wrong kernel never posts a time); then each
mode (forward, backward, forward+backward) is timed: triton.testing.do_bench on a GPU (warm-up,
CUDA events, p20/p50/p80, inputs rotated), perf_counter on a CPU. Without a GPU the kernels run in
Triton's interpreter: the correctness checks are real, the timings are not, and the report says so.

Writes <out>/results.jsonl (one JSON line per measurement, appended) and <out>/REPORT.md with plots
(bench/report.py), <out> defaulting to reports/<gpu>.
"""
import argparse
import datetime
import itertools
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from providers import CELLS, PROVIDERS, Unavailable, build, make_reference  # noqa: E402
import report  # noqa: E402

MODES = ["forward", "backward", "forward+backward"]
ALL_CELLS = list(CELLS)
CORE = ["rnn_triton", "torch.nn"]


def sweep(cells=ALL_CELLS, dtypes=("bfloat16",), batch=(16,), hidden=(128,), seq=(1024,), input_size=(64,),
          layers=(1,), bidirectional=(False,), modes=MODES, providers=CORE):
    return dict(cells=cells, dtypes=dtypes, batch=batch, hidden=hidden, seq=seq, input_size=input_size,
                layers=layers, bidirectional=bidirectional, modes=modes, providers=providers)


#: Named presets: lists of sweeps (a cross product each). Sizes a kernel does not take are reported
#: as such for rnn_triton and still measured for the others.
PRESETS = {
    "tiny": [sweep(cells=["LSTM", "GRU", "RNN_TANH"], dtypes=["float32"], batch=[2], hidden=[16], seq=[4, 8],
                   input_size=[8], providers=["rnn_triton", "torch.nn", "torch-loop"])],
    "cpu": [sweep(dtypes=["float32"], batch=[2, 8], hidden=[16, 32], seq=[8], input_size=[16],
                  providers=["rnn_triton", "torch.nn", "torch-loop"]),
            sweep(dtypes=["float32"], batch=[2], hidden=[16], seq=[4, 16], input_size=[16],
                  providers=["rnn_triton", "torch.nn", "torch-loop"])],
    "quick": [sweep(batch=[16, 64], hidden=[64, 128], seq=[1024], modes=["forward", "forward+backward"])],
    # the cooperative kernels' reference configurations (issue 5), against cuDNN only
    "large": [sweep(batch=[1, 16, 64], hidden=[256, 512, 768, 1024], seq=[1024],
                    modes=["forward", "forward+backward"], providers=["rnn_triton", "torch.nn"])],
    "default": [
        sweep(batch=[1, 16, 64, 256], hidden=[64, 128, 256], seq=[1024]),   # speedup heatmaps
        sweep(batch=[16], hidden=[128], seq=[128, 512, 2048, 4096]),        # time vs sequence length
        sweep(batch=[16], hidden=[128], seq=[1024], dtypes=["float16", "float32"]),
        # every provider once (the compiled loop unrolls all T steps: compiling takes a while)
        sweep(cells=["LSTM", "GRU"], batch=[16], hidden=[64], seq=[256], modes=["forward", "forward+backward"],
              providers=PROVIDERS),
    ],
    "full": [
        sweep(dtypes=["bfloat16", "float16", "float32"], batch=[1, 4, 16, 64, 256],
              hidden=[64, 128, 256, 512, 1024, 2048], seq=[1024]),
        sweep(batch=[16], hidden=[128], seq=[128, 256, 512, 1024, 2048, 4096], input_size=[64, 256]),
        sweep(batch=[16], hidden=[128], seq=[1024], layers=[1, 2], bidirectional=[False, True]),
        sweep(batch=[16], hidden=[64, 128], seq=[256], providers=PROVIDERS),
    ],
}

#: Dense tensor-core peaks (TFLOP/s) by GPU and dtype, for "fraction of peak". float32 is the FMA peak.
PEAK_TFLOPS = {"H100": {"bfloat16": 989, "float16": 989, "float32": 67},
               "H200": {"bfloat16": 989, "float16": 989, "float32": 67}}


def flops(cell, B, T, I, H, layers, directions, mode):
    """Matrix FLOPs: 2*T*B*G*H*(I + H) per layer and direction forward; backward about twice that."""
    G = {"LSTM": 4, "GRU": 3}.get(cell, 1)
    fwd = sum(2 * T * B * G * H * ((I if layer == 0 else H * directions) + H) * directions
              for layer in range(layers))
    return {"forward": fwd, "backward": 2 * fwd, "forward+backward": 3 * fwd}[mode]


def time_ms(fn, budget_ms):
    """(p20, p50, p80) in ms."""
    if ON_GPU:
        return tuple(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=budget_ms))
    fn()  # warm-up
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=5)
    return q[0], statistics.median(samples), q[-1]


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tolerance(dtype):
    # float32 on a GPU runs as TF32 in cuDNN and in our kernels alike while cudnn.allow_tf32 is set
    # (torch's default): two different TF32 roundings then differ by about 1e-3.
    tf32 = ON_GPU and torch.backends.cudnn.allow_tf32
    return {torch.float32: 5e-3 if tf32 else 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


def run_config(cell, dtype_name, B, T, I, H, layers, bidirectional, modes, providers, budget_ms, env):
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = getattr(torch, dtype_name)
    ref = make_reference(cell, I, H, layers, bidirectional, device, dtype)
    # Rotate through several inputs when they are small enough to sit in L2 between runs.
    copies = 4 if ON_GPU and T * B * I * dtype.itemsize < 64 << 20 else 1
    xs = [torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
    with torch.no_grad():
        want = ref(xs[0])[0]
    config = dict(cell=cell, dtype=dtype_name, B=B, T=T, I=I, H=H, layers=layers,
                  bidirectional=bidirectional)
    rows = []
    for provider in providers:
        base = env | dict(provider=provider, config=config)
        try:
            fn = build(provider, ref, xs[0], ON_GPU)
            with torch.no_grad():
                err = _rel_err(fn(xs[0]), want)
        except Unavailable as why:
            rows.append(base | dict(mode=None, skipped=str(why)))
            continue
        if err > _tolerance(dtype):
            rows.append(base | dict(mode=None, skipped=f"output differs from torch.nn (rel err {err:.1e})"))
            continue
        dy = torch.randn_like(want)
        for mode in modes:
            rows.append(base | _measure(fn, xs, dy, mode, budget_ms, config, err, env))
    return rows


def _measure(fn, xs, dy, mode, budget_ms, config, err, env):
    turn = itertools.cycle(range(len(xs)))
    if mode == "forward":
        def run():
            with torch.no_grad():
                fn(xs[next(turn)])
    elif mode == "backward":
        ys = [fn(x) for x in xs]  # graphs kept; only the backward is timed

        def run():
            ys[next(turn)].backward(dy, retain_graph=True)
    else:
        def run():
            fn(xs[next(turn)]).backward(dy)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    p20, p50, p80 = time_ms(run, budget_ms)
    c = config
    n_flops = flops(c["cell"], c["B"], c["T"], c["I"], c["H"], c["layers"], 2 if c["bidirectional"] else 1,
                    mode)
    tflops = n_flops / (p50 * 1e-3) / 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in env["gpu"]), {}).get(c["dtype"])
    return dict(mode=mode, p20=p20, p50=p50, p80=p80, us_per_step=p50 * 1e3 / c["T"], tflops=tflops,
                peak_fraction=tflops / peak if peak else None,
                peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if ON_GPU else None,
                rel_err_vs_torch=err)


def configs_of(sweeps):
    for s in sweeps:
        for cell, dtype, B, T, I, H, layers, bidir in itertools.product(
                s["cells"], s["dtypes"], s["batch"], s["seq"], s["input_size"], s["hidden"], s["layers"],
                s["bidirectional"]):
            yield (cell, dtype, B, T, I, H, layers, bidir, s["modes"], s["providers"])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="default" if ON_GPU else "cpu")
    parser.add_argument("--cells", nargs="+", choices=ALL_CELLS)
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", nargs="+", type=int)
    parser.add_argument("--hidden", nargs="+", type=int)
    parser.add_argument("--seq", nargs="+", type=int)
    parser.add_argument("--input-size", nargs="+", type=int)
    parser.add_argument("--layers", nargs="+", type=int)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS)
    parser.add_argument("--budget-ms", type=int, default=100, help="do_bench time per measurement (GPU)")
    parser.add_argument("--out", help="output folder (default reports/<gpu>)")
    parser.add_argument("--no-compile-table", action="store_true",
                        help="on the CPU, skip the sm_90 compile table the report otherwise includes")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in dict(cells=args.cells, dtypes=args.dtypes, batch=args.batch,
                                       hidden=args.hidden, seq=args.seq, input_size=args.input_size,
                                       layers=args.layers, modes=args.modes,
                                       providers=args.providers).items() if v}
    if args.bidirectional:
        overrides["bidirectional"] = [True]
    sweeps = [s | overrides for s in PRESETS[args.preset]] if not overrides else \
        [PRESETS[args.preset][0] | overrides]

    gpu = torch.cuda.get_device_name() if ON_GPU else "cpu-interpreter"
    out = args.out or os.path.join("reports", gpu.lower().replace("nvidia ", "").replace(" ", "-"))
    os.makedirs(out, exist_ok=True)
    env = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), commit=_commit(), preset=args.preset,
               timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    configs = list(configs_of(sweeps))
    path = os.path.join(out, "results.jsonl")
    with open(path, "a") as f:
        for i, (cell, dtype, B, T, I, H, layers, bidir, modes, providers) in enumerate(configs, 1):
            start = time.perf_counter()
            rows = run_config(cell, dtype, B, T, I, H, layers, bidir, modes, providers, args.budget_ms, env)
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            timed = {(r["provider"], r["mode"]): r["p50"] for r in rows if r.get("mode")}
            fb = [f"{p} {timed[(p, 'forward+backward')]:.3f}" for p in CORE if (p, "forward+backward") in timed]
            print(f"[{i}/{len(configs)}] {cell} {dtype} B={B} T={T} I={I} H={H} L={layers} "
                  f"{'bi' if bidir else 'uni'}: fwd+bwd ms {', '.join(fb) or '-'} "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
    if not ON_GPU and not args.no_compile_table:
        _write_compile_table(os.path.join(out, report.COMPILE_TABLE))
    report.write_report(path, out)
    print(f"wrote {out}/REPORT.md (from {path})")


def _write_compile_table(path):
    """Without a GPU, what can be said about one: the sm_90 compile check's table."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rnn_triton.compile_check"], env=env, capture_output=True,
                          text=True)
    with open(path, "w") as f:
        f.write(proc.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
