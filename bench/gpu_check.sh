#!/usr/bin/env bash
# The GPU check, in one call on a lent H100/H200 (about 10 minutes; give it timeout_s 600):
#   1. the sm_90 compile table, 2. the test suite in compiled mode (no interpreter) on the GPU,
#      the cooperative kernels included (20 runs bitwise identical: tests/test_cooperative.py),
#   3. LSTM, GRU, RNN vs torch.nn (cuDNN): bench/run.py's default preset (B 1/16/64, H 128-1024 and the
#      RNN at 2048, T 1024, bf16: the tile-persistent and cooperative kernels; a time-vs-T series; every
#      provider once), at 50 ms per measurement; 4. heads: bench/heads.py (H = 768 as 12 x 64, 6 x 128).
# It writes under $OUT (default ./out) env.txt, compile.txt, tests.log, bench.log, REPORT.md, results.jsonl
# and bench_report.tgz (the report with its plots): commit them under reports/<gpu>/.
# Nothing is installed: the package is imported from this checkout.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
# rnn_triton.kernels is the top-level kernels/ folder once installed; without installing, a link.
[ -e rnn_triton/kernels ] || ln -s ../kernels rnn_triton/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0 RNN_TRITON_STRICT=1
if ! nvidia-smi > /dev/null 2>&1; then
  echo "no GPU: dry run through the interpreter (checks this script, not the GPU)"
  export TRITON_INTERPRET=1
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/env.txt"

# The compile check runs on the CPUs alongside the GPU tests.
TRITON_INTERPRET=0 python -m rnn_triton.compile_check --probe > "$OUT/compile.txt" 2>&1 &
compile_pid=$!

# Compiling every kernel variant the tests touch dominates: one pytest per cell, side by side.
logs=$(mktemp -d)
pids=()
for k in LSTM GRU RNN_TANH RNN_RELU "not (LSTM or GRU or RNN_TANH or RNN_RELU)"; do
  name=$(echo "$k" | tr -c 'A-Za-z_\n' _)
  # -o addopts="": one process each (pyproject asks for pytest-xdist, which the GPU machine may lack)
  timeout 270 python -m pytest -q -p no:cacheprovider -o addopts="" tests -k "$k" > "$logs/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
cat "$logs"/*.log > "$OUT/tests.log"  # at most 8 files come back from a device run: one log
echo "tests (compiled, GPU): $([ $status = 0 ] && echo pass || echo FAIL)"; tail -q -n 1 "$logs"/*.log
wait $compile_pid
echo "compile check: exit $? ($(tail -n 1 "$OUT/compile.txt"))"

# The headline comparison: small H (tile-persistent) to the cooperative sizes, in one report.
bench=$(mktemp -d)
if [ "$TRITON_INTERPRET" = 1 ]; then
  timeout 180 python bench/run.py --preset tiny --out "$bench" > "$OUT/bench.log" 2>&1
else
  timeout 300 python bench/run.py --preset default --budget-ms 50 --out "$bench" > "$OUT/bench.log" 2>&1
fi
echo "bench: exit $?"
# Heads (FlashRNN's layout): ours, FlashRNN's Triton backend where installed (its CUDA ones compile an
# extension per size: minutes), and cuDNN's dense layer of the same total H. Its log joins bench.log.
if [ "$TRITON_INTERPRET" = 1 ]; then
  timeout 120 python bench/heads.py --preset tiny --out "$bench/heads" >> "$OUT/bench.log" 2>&1
else
  timeout 90 python bench/heads.py --providers rnn_triton flashrnn-triton_fused cudnn-dense --budget-ms 30 \
    --out "$bench/heads" >> "$OUT/bench.log" 2>&1
fi
echo "heads bench: exit $?"
# At most 8 files come back from a device run: the report, the results, and the plots in one archive.
cp "$bench/REPORT.md" "$bench/results.jsonl" "$OUT/" 2>/dev/null
tar czf "$OUT/bench_report.tgz" -C "$bench" .
tail -n 12 "$OUT/bench.log"
