#!/usr/bin/env bash
# GPU checks in one go, on a CUDA machine, from the repository root (installed, or with PYTHONPATH=.):
# what is usable, the GPU parity cases, a parity report, and the benchmarks incl. large batches.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]      (results and logs land in OUT_DIR, default gpu-check/)
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
run() { echo "+ $*"; "$@" || status=1; }

run $py -m vae_rt doctor 2>&1 | tee "$out/doctor.txt"
run $py -m pytest -m gpu tests/test_parity.py bench -rs -q --benchmark-disable -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt"
run $py -m vae_rt compare --device cuda --backends torch,ort,trt --precisions fp32,fp16,bf16 2>&1 | tee "$out/compare.txt"
run $py -m vae_rt bench --device cuda --batch-sizes 1,64,1024,8192,65536,262144 --duration 2 \
    --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tee "$out/bench.txt"
run $py -m vae_rt sample --device cuda -n 1000000 --dtype uint8 --out "$out/samples.npy" 2>&1 | tee "$out/sample.txt"
rm -f "$out/samples.npy"
exit $status
