#!/usr/bin/env bash
# The benchmarks on an NVIDIA GPU: the raw ONNX Runtime loop and the service sweeps (in
# process, no batching, Redis queue, open-loop load) with the CUDA execution provider, once
# with the fp32 graphs and once with the fp16 graphs. Results go to $OUT (default
# runs/bench-gpu): $OUT/fp32/ and $OUT/fp16/ (results.json, report.md, PNG plots, logs), plus
# nvidia-smi.txt and environment.txt. Then the service's own ceiling (bench/ceiling.py: the
# `null` model, wrk as the client, 1 and 2 API processes on the Redis queue) in
# $OUT/ceiling/: on a GPU the model is fast, so this is where the service becomes the limit.
# int8 graphs are for CPUs (ONNX Runtime's QDQ kernels); on GPUs the reduced precision is fp16,
# so PRECISIONS may not name int8 here (run `bench.raw_onnx --compare-precision int8` on CPU).
#
# Needs, on the GPU machine: the venv with onnxruntime-gpu instead of onnxruntime
#   (.venv/bin/pip uninstall -y onnxruntime && .venv/bin/pip install -e '.[serve,gpu]'),
# the exported models (MODEL_DIR, default models/; `make models` or copy them over) and
# redis-server on PATH for the Redis scenario.
#
#   bench/gpu.sh                              # everything, ~10 min
#   OUT=/tmp/gpu QUICK=1 bench/gpu.sh         # smoke run, a minute
#   PRECISIONS=fp16 bench/gpu.sh              # one precision only
#   PROVIDERS=cpu QUICK=1 bench/gpu.sh        # try the script itself on a CPU machine
#   CEILING=0 bench/gpu.sh                    # without the null-model ceiling (needs wrk)
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench-gpu}
MODEL_DIR=${MODEL_DIR:-models}
MODEL=${MODEL:-objects}
PRECISIONS=${PRECISIONS:-fp32 fp16}
# PROVIDERS=cpu only to try this script out on a machine without a GPU.
PROVIDERS=${PROVIDERS:-cuda}
# A GPU takes much larger batches than 2 CPU cores; the Python load generator (one process)
# becomes the limit somewhere in the hundreds of requests per second: check its CPU use.
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-16}
CONCURRENCY=${CONCURRENCY:-1,2,4,8,16,32,64}
PAIR_CONCURRENCY=${PAIR_CONCURRENCY:-1,2,4,8,16,32}
SHORT_CONCURRENCY=${SHORT_CONCURRENCY:-1,8,32}
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-8}
CEILING=${CEILING:-1}

case " $PRECISIONS " in
    *" int8 "*) if [ "$PROVIDERS" != cpu ]; then
        echo "bench/gpu.sh: int8 is CPU-only (fp16 is the GPU variant); drop it from PRECISIONS." >&2
        exit 2
    fi ;;
esac

mkdir -p "$OUT"
if [ "$PROVIDERS" = cuda ] && ! "$PY" -c 'import onnxruntime as ort, sys; sys.exit("CUDAExecutionProvider" not in ort.get_available_providers())'; then
    echo "bench/gpu.sh: ONNX Runtime offers no CUDAExecutionProvider here ($("$PY" -c 'import onnxruntime as o; print(o.get_available_providers())'))." >&2
    echo "Install onnxruntime-gpu (see the top of this script) on a machine with an NVIDIA GPU." >&2
    exit 2
fi
if ! ls "$MODEL_DIR/$MODEL"/*/manifest.json > /dev/null 2>&1; then
    echo "bench/gpu.sh: no model '$MODEL' under $MODEL_DIR; run 'make models' or set MODEL_DIR." >&2
    exit 2
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo || true
    "$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT/environment.txt"

# The sweep for a GPU: larger batches and concurrency than the CPU defaults.
sizes=(--max-batch-size "$MAX_BATCH_SIZE" --max-queue 128
       --concurrency "$CONCURRENCY" --pair-concurrency "$PAIR_CONCURRENCY"
       --short-concurrency "$SHORT_CONCURRENCY"
       --raw-batches 1,2,4,8,16,32 --raw-pair-batches 1,2,4,8,16
       --seconds "$SECONDS_PER_LEVEL" --warmup 2)
if [ -n "${QUICK:-}" ]; then
    sizes=(--quick)
fi

status=0
for precision in $PRECISIONS; do
    echo "== $precision ==" >&2
    # --threads 0: ONNX Runtime's default CPU threads (only CPU fallback nodes use them).
    "$PY" -m bench.run_all "${sizes[@]}" \
        --out "$OUT/$precision" \
        --model-dir "$MODEL_DIR" --model "$MODEL" \
        --providers "$PROVIDERS" --precision "$precision" --threads 0 \
        || status=$?
done
if [ "$CEILING" = 1 ]; then
    echo "== ceiling (null model) ==" >&2
    if command -v wrk > /dev/null; then
        ceiling=(--out "$OUT/ceiling")
        if [ -n "${QUICK:-}" ]; then
            ceiling+=(--cases landmarks-npz --concurrency 8 --redis-concurrency 8 --seconds 1 --warmup 1)
        else
            # two queue workers: on 16 cores each has a core of its own (on two, one is better)
            ceiling+=(--concurrency 8,32,64 --redis-concurrency 32,64 --workers 2)
        fi
        "$PY" -m bench.ceiling "${ceiling[@]}" || status=$?
    else
        echo "bench/gpu.sh: wrk not installed (apt-get install wrk); ceiling skipped." >&2
    fi
fi
echo "results under $OUT/{$(echo $PRECISIONS | tr ' ' ,)}/report.md and $OUT/ceiling/ceiling.md" >&2
exit $status
