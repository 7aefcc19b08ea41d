#!/usr/bin/env bash
# One GPU session, run as-is from the repository root on a machine with one CUDA GPU
# (sized for one H100 / H200 and ~15 minutes of device time in all):
#
#   bash benchmarks/gpu_session.sh            # writes under results/gpu/
#
# 1. benchmarks/cuda_check.py: mixSGA's CUDA decode path (incremental == full forward, eviction
#    on mixSGA, bf16, the Triton kernel / eager / compiled backends agree)          ~1 min
# 2. the Triton kernel's tests on CUDA (tests/test_mixsga_decode.py -k triton)        ~1 min
# 3. the decode benchmark: bf16, 16 layers, 5 repeats, batch 1 and 8, contexts 512 / 2k / 8k,
#    Llama 3.2-1B and TinyLlama shapes and the zoo's small architectures             ~4 min
# 4. the GPU profile (config/gpu.yaml, estimated 6.5 min, capped at 8): its tables and
#    figures are copied to results/gpu/profile/                                     <= 8 min
# Each step has its own timeout so that one overrun cannot eat the others' time; a failed
# step is reported and the script goes on. Nothing here was run yet: no GPU was lent to the
# session that wrote it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_RESULTS:-results/gpu}
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else '')" 2>/dev/null)
[ -n "$GPU" ] || { echo "no CUDA device" >&2; exit 1; }
mkdir -p "$OUT" "$OUT/logs"
export PYTHONPATH=.
status=0
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0))s (log: $OUT/logs/$name.log)"
    tail -5 "$OUT/logs/$name.log"
    [ $rc -eq 0 ] || status=1
}
$PY -c "import triton" 2>/dev/null || $PY -m pip install -q "triton==3.9.0" || echo "triton unavailable: mixSGA decodes with the torch backend"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/logs/nvidia-smi.csv" 2>&1

step cuda_check 120 $PY benchmarks/cuda_check.py
step kernel_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_mixsga_decode.py -k "triton or biased"
step decode_bench 330 $PY -m benchmarks.decode --device cuda --dtype bfloat16 --layers 16 --new-tokens 32 \
    --repeats 5 --contexts 512,2048,8192 --batches 1,8 --zoo-contexts 512,2048 --all-methods '' \
    --out "$OUT/decode-$GPU-bf16.json"
step gpu_profile 480 snakemake --cores 16 --configfile config/gpu.yaml --keep-going
mkdir -p "$OUT/profile"
for d in results/gpu_profile/tables results/gpu_profile/figures results/gpu_profile/report; do
    [ -d "$d" ] && cp -r "$d" "$OUT/profile/"
done
[ -d results/gpu_profile/benchmarks ] && cp -r results/gpu_profile/benchmarks "$OUT/profile/job-times"
echo "done: status=$status; commit $OUT (JSON, logs, profile tables and figures)"
exit $status
