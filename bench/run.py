"""The main job: rnn_triton's LSTM, GRU and RNN checked against torch.nn and timed against it.

    python bench/run.py                        # GPU: the default preset; CPU: the "cpu" preset (~3 min)
    python bench/run.py --preset tiny          # seconds (CI runs it on the CPU)
    python bench/run.py --cells LSTM --batch 16 64 --hidden 128 --seq 1024 --dtypes bfloat16

Three phases, each announced as it starts:
1. accuracy: each cell of the sweeps in every dtype (on a GPU: the sweeps' dtypes), on small inputs,
   against torch.nn in float64 (forward outputs and backward gradients; torch.nn's own error in that
   dtype beside it);
2. timings: every provider is built from the same torch.nn weights and fed the same random inputs; its
   output is checked against torch.nn first (a wrong kernel never posts a time); then each mode (forward,
   backward, forward+backward) is timed for --budget-ms: triton.testing.do_bench on a GPU (warm-up, CUDA
   events, p20/p50/p80, inputs rotated), perf_counter samples on a CPU;
3. the report: <out>/REPORT.md with plots (bench/report.py).
Without a GPU the kernels run in Triton's interpreter: the accuracy is real, the timings are not GPU
performance, and the report says so. The sm_90 compile and static cost tables are not made here (about
30 minutes on 2 cores): they are committed under reports/static/, and the report links to them.

Writes <out>/results.jsonl (one JSON line per measurement, appended), <out> defaulting to reports/<gpu>.
"""
import argparse
import datetime
import itertools
import json
import os
import platform
import signal
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
from providers import CELLS, PROVIDERS, Unavailable, build, make_reference, ours_from  # noqa: E402
import report  # noqa: E402

MODES = ["forward", "backward", "forward+backward"]
ALL_CELLS = list(CELLS)
CORE = ["rnn_triton", "torch.nn"]
DTYPES = ["bfloat16", "float16", "float32"]


def sweep(cells=ALL_CELLS, dtypes=("bfloat16",), batch=(16,), hidden=(128,), seq=(1024,), input_size=(64,),
          layers=(1,), bidirectional=(False,), modes=MODES, providers=CORE):
    return dict(cells=cells, dtypes=dtypes, batch=batch, hidden=hidden, seq=seq, input_size=input_size,
                layers=layers, bidirectional=bidirectional, modes=modes, providers=providers)


CPU_PROVIDERS = ["rnn_triton", "torch.nn", "torch-loop"]

#: Named presets: lists of sweeps (a cross product each). Sizes a kernel does not take are reported
#: as such for rnn_triton and still measured for the others.
PRESETS = {
    "tiny": [sweep(cells=["LSTM", "GRU", "RNN_TANH"], dtypes=["float32"], batch=[2], hidden=[16], seq=[4, 8],
                   input_size=[8], providers=CPU_PROVIDERS)],
    # The interpreter costs ~10 ms a step: small T, and a time-vs-T series per cell (its accuracy is
    # phase 1's matrix, over every dtype).
    "cpu": [sweep(dtypes=["float32"], batch=[4], hidden=[32], seq=[4, 16, 64], input_size=[16],
                  providers=CPU_PROVIDERS)],
    "quick": [sweep(batch=[16, 64], hidden=[64, 128], seq=[1024], modes=["forward", "forward+backward"])],
    # the cooperative kernels' reference configurations (issue 5), against cuDNN only
    "large": [sweep(batch=[1, 16, 64], hidden=[256, 512, 768, 1024], seq=[1024],
                    modes=["forward", "forward+backward"], providers=CORE)],
    # The headline: every size class the kernels take (tile-persistent to cooperative) against cuDNN.
    # Sized for bench/gpu_check.sh's 5 minutes at --budget-ms 50 (an estimate, not yet run on a GPU):
    # ~200 measurements of ~0.1 s and ~40 Triton builds of a few seconds; the compiled cell loop, the
    # slowest to build, comes last, and a timeout still writes the report.
    "default": [
        sweep(cells=["LSTM", "GRU", "RNN_TANH"], batch=[1, 16, 64], hidden=[128, 256, 512, 1024], seq=[1024],
              modes=["forward", "forward+backward"]),                               # speedup heatmaps
        sweep(cells=["RNN_TANH"], batch=[1, 16, 64], hidden=[2048], seq=[1024],
              modes=["forward", "forward+backward"]),
        sweep(cells=["LSTM"], batch=[16], hidden=[256], seq=[128, 512, 2048, 4096],
              modes=["forward", "backward"]),                                       # time vs T, fwd vs bwd
        # every provider once (the compiled loop unrolls all T steps: compiling takes a while)
        sweep(cells=["LSTM", "GRU"], batch=[16], hidden=[64], seq=[256], modes=["forward", "forward+backward"],
              providers=PROVIDERS),
    ],
    "full": [
        sweep(dtypes=DTYPES, batch=[1, 4, 16, 64, 256], hidden=[64, 128, 256, 512, 1024, 2048], seq=[1024]),
        sweep(batch=[16], hidden=[128], seq=[128, 256, 512, 1024, 2048, 4096], input_size=[64, 256]),
        sweep(batch=[16], hidden=[128], seq=[1024], layers=[1, 2], bidirectional=[False, True]),
        sweep(batch=[16], hidden=[64, 128], seq=[256], providers=PROVIDERS),
    ],
}

#: Phase 1's inputs, for every cell and dtype of the run: one layer, and two bidirectional layers. Small
#: sizes every dtype's kernels take (tile-persistent) on a GPU and in the interpreter.
ACCURACY_CONFIGS = [dict(B=4, T=8, I=16, H=32, layers=1, bidirectional=False),
                    dict(B=3, T=6, I=8, H=16, layers=2, bidirectional=True)]

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
    """(p20, p50, p80) in ms of ``fn``, sampled for about ``budget_ms`` after a warm-up."""
    if ON_GPU:
        return tuple(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=budget_ms))
    for _ in range(3):  # warm-up: first calls allocate and, in torch.nn, pick its CPU kernels
        fn()
    samples = []
    deadline = time.perf_counter() + budget_ms / 1e3
    # At least 5 samples (the interpreter's calls take longer than the budget), else as many as fit:
    # torch.nn's CPU calls take well under a millisecond and vary with the machine's load.
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 2000):
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


def accuracy(cell, dtype_name, B, T, I, H, layers, bidirectional):
    """Phase 1 for one cell, dtype and size: the largest relative error against torch.nn in float64 of
    rnn_triton, and of torch.nn itself in that dtype, over the forward outputs (y, h_n, c_n) and over the
    backward gradients (input, initial states, every parameter), for random inputs, initial states and
    output gradients. ({provider: (forward, backward)}, the kernel variant that ran), or (None, the
    reason) when rnn_triton's kernels do not take the size."""
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = getattr(torch, dtype_name)
    ref = make_reference(cell, I, H, layers, bidirectional, "cpu", torch.float64)
    ours = ours_from(ref, device, dtype)
    x = torch.randn(T, B, I, dtype=torch.float64)
    states = [torch.randn(layers * (2 if bidirectional else 1), B, H, dtype=torch.float64)
              for _ in range(2 if cell == "LSTM" else 1)]
    plan = ours.kernel_plan(x.to(device, dtype))
    if not plan.uses_triton:
        return None, plan.reason
    seed = torch.randint(1 << 30, ()).item()  # the same output gradients for every run below
    want = _outputs_and_gradients(ref, x, states, seed, "cpu", torch.float64)
    errors = {"rnn_triton": _max_errors(_outputs_and_gradients(ours, x, states, seed, device, dtype), want)}
    try:  # torch.nn's own error in this dtype, for scale (some dtypes have no CPU implementation)
        same = make_reference(cell, I, H, layers, bidirectional, device, dtype)
        same.load_state_dict(ref.state_dict())
        errors["torch.nn"] = _max_errors(_outputs_and_gradients(same, x, states, seed, device, dtype), want)
    except RuntimeError:
        errors["torch.nn"] = (None, None)
    return errors, plan.config.variant


def _outputs_and_gradients(module, x, states, seed, device, dtype):
    """``module``'s outputs for (x, states) and the gradients of sum(outputs * g) (g: random, from
    ``seed``) with respect to the input, the states and the parameters."""
    inputs = [t.to(device, dtype).requires_grad_() for t in [x] + states]
    y, h = module(inputs[0], tuple(inputs[1:]) if len(inputs) == 3 else inputs[1])
    outputs = [y] + (list(h) if isinstance(h, tuple) else [h])
    generator = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, dtype=torch.float64, generator=generator).to(device, dtype)
                 for o in outputs]
    return outputs, torch.autograd.grad(outputs, inputs + list(module.parameters()), grads_out)


def _max_errors(got, want):
    """(forward, backward): the largest relative error of any output, of any gradient."""
    return tuple(max(_rel_err(a.cpu(), b) for a, b in zip(g, w)) for g, w in zip(got, want))


def accuracy_bound(cell, dtype_name, mode):
    """The largest relative error phase 1 accepts for ``mode``'s tensors, as the tests do (tests/helpers.py):
    the dtype's tolerance, except for ReLU gradients in half precision, where a pre-activation within
    rounding of 0 flips its derivative and every later step with it (torch.nn's own are 0.1-0.2 off)."""
    if cell == "RNN_RELU" and dtype_name != "float32" and mode == "backward":
        return 0.25
    return _tolerance(getattr(torch, dtype_name))


def within_bound(err, torch_err, bound):
    """The tests' rule: within the bound, or within twice torch.nn's own error in that dtype."""
    return err <= max(bound, 2 * (torch_err or 0))


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="default" if ON_GPU else "cpu",
                        help="a named sweep (default: 'default' on a GPU, 'cpu' without one)")
    parser.add_argument("--cells", nargs="+", choices=ALL_CELLS)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES)
    parser.add_argument("--batch", nargs="+", type=int)
    parser.add_argument("--hidden", nargs="+", type=int)
    parser.add_argument("--seq", nargs="+", type=int)
    parser.add_argument("--input-size", nargs="+", type=int)
    parser.add_argument("--layers", nargs="+", type=int)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS)
    parser.add_argument("--budget-ms", type=int, default=100,
                        help="sampling time per measurement, after a warm-up (default 100)")
    parser.add_argument("--out", help="output folder (default reports/<gpu>)")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in dict(cells=args.cells, dtypes=args.dtypes, batch=args.batch,
                                       hidden=args.hidden, seq=args.seq, input_size=args.input_size,
                                       layers=args.layers, modes=args.modes,
                                       providers=args.providers).items() if v}
    if args.bidirectional:
        overrides["bidirectional"] = [True]
    sweeps = [s | overrides for s in PRESETS[args.preset]] if not overrides else \
        [PRESETS[args.preset][0] | overrides]
    if not ON_GPU:
        # Tiny matrices: a second thread costs more than it saves, and on a shared machine spinning
        # threads made torch.nn's times jump a hundredfold from one call to the next.
        torch.set_num_threads(1)

    gpu = torch.cuda.get_device_name() if ON_GPU else "cpu-interpreter"
    out = args.out or os.path.join("reports", gpu.lower().replace("nvidia ", "").replace(" ", "-"))
    os.makedirs(out, exist_ok=True)
    env = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), commit=_commit(), preset=args.preset,
               timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    began = time.perf_counter()
    path = os.path.join(out, "results.jsonl")
    # Stopped by a time limit (`timeout` sends SIGTERM), still report what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM): reporting what was measured"))
    try:
        _run_phases(sweeps, args, env, path)
    except SystemExit as stop:
        print(stop, flush=True)
    print(f"phase 3/3: the report; the sm_90 compile and static cost tables are not made here (about 30 "
          f"minutes): the report links to the committed ones, {report.STATIC_README}", flush=True)
    report.write_report(path, out)
    print(f"wrote {out}/REPORT.md (from {path}) in {time.perf_counter() - began:.0f} s", flush=True)


def _run_phases(sweeps, args, env, path):
    """Phases 1 and 2, each row appended to ``path`` as it is made."""
    with open(path, "a") as f:
        def write(rows):
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()

        # On a GPU each dtype is a Triton compile per cell and size: only the sweeps' dtypes there.
        dtypes = args.dtypes or (sorted({d for s in sweeps for d in s["dtypes"]}) if ON_GPU else DTYPES)
        cells = [c for c in ALL_CELLS if any(c in s["cells"] for s in sweeps)]
        checks = list(itertools.product(cells, dtypes, ACCURACY_CONFIGS))
        print(f"phase 1/3: accuracy against torch.nn in float64, {len(checks)} checks", flush=True)
        for i, (cell, dtype, size) in enumerate(checks, 1):
            write([_accuracy_row(i, len(checks), cell, dtype, size, env)])

        configs = list(configs_of(sweeps))
        print(f"phase 2/3: timings, {len(configs)} configurations, {args.budget_ms} ms per measurement"
              + ("" if ON_GPU else " (CPU, Triton interpreter: timings are not GPU performance)"), flush=True)
        for i, (cell, dtype, B, T, I, H, layers, bidir, modes, providers) in enumerate(configs, 1):
            start = time.perf_counter()
            rows = run_config(cell, dtype, B, T, I, H, layers, bidir, modes, providers, args.budget_ms, env)
            write(rows)
            timed = [f"{r['provider']} {r['mode']} {r['p50']:.3g}" for r in rows
                     if r.get("mode") and r["provider"] in CORE]
            print(f"  [{i}/{len(configs)}] {cell} {dtype} B={B} T={T} I={I} H={H} L={layers} "
                  f"{'bi' if bidir else 'uni'}: ms {', '.join(timed) or '-'} "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)


def _accuracy_row(i, n, cell, dtype, size, env):
    """One check of phase 1 as a results.jsonl row, its progress line printed."""
    start = time.perf_counter()
    errors, variant = accuracy(cell, dtype, **size)
    config = dict(cell=cell, dtype=dtype, **size)
    label = f"  [{i}/{n}] {cell} {dtype} B={size['B']} T={size['T']} H={size['H']} L={size['layers']} " \
            f"{'bi' if size['bidirectional'] else 'uni'}"
    if errors is None:
        print(f"{label}: not run ({variant})", flush=True)
        return env | dict(kind="accuracy", provider="rnn_triton", config=config, mode=None, skipped=variant)
    (fwd, bwd), (torch_fwd, torch_bwd) = errors["rnn_triton"], errors["torch.nn"]
    bounds = [accuracy_bound(cell, dtype, mode) for mode in ("forward", "backward")]
    ok = within_bound(fwd, torch_fwd, bounds[0]) and within_bound(bwd, torch_bwd, bounds[1])
    print(f"{label}: max rel err forward {fwd:.1e}, backward {bwd:.1e} ({variant}; "
          f"{'within' if ok else 'OVER'} bound) ({time.perf_counter() - start:.1f}s)", flush=True)
    return env | dict(kind="accuracy", provider="rnn_triton", config=config, variant=variant,
                      forward=fwd, backward=bwd, torch_forward=torch_fwd, torch_backward=torch_bwd,
                      bound=bounds, within_bound=ok)


if __name__ == "__main__":
    main(sys.argv[1:])
