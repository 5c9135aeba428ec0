#!/usr/bin/env bash
# GPU checks in one go, on a CUDA machine, from the repository root (installed, or with PYTHONPATH=.):
# what is usable, the GPU parity cases, a parity report, and the benchmarks incl. large batches.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]      (results and logs land in OUT_DIR, default gpu-check/)
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
# run LOG CMD...: CMD's output to the terminal and LOG; a failure marks the whole check failed. The function
# runs in this shell (a `run ... | tee` pipeline would run it in a subshell, whose `status=1` is lost).
run() { local log=$1; shift; echo "+ $*"; "$@" 2>&1 | tee "$out/$log" || { status=1; echo "FAILED: $*"; }; }

run doctor.txt $py -m vae_rt doctor
run gpu-tests.txt $py -m pytest -m gpu tests/test_parity.py bench -rs -q --benchmark-disable -p no:cacheprovider
run compare.txt $py -m vae_rt compare --device cuda --backends torch,ort,trt --precisions fp32,fp16,bf16
run bench.txt $py -m vae_rt bench --device cuda --batch-sizes 1,64,1024,8192,65536,262144 --duration 2 \
    --json "$out/bench.json" --plot "$out/bench.png"
run sample.txt $py -m vae_rt sample --device cuda -n 1000000 --dtype uint8 --out "$out/samples.npy"
rm -f "$out/samples.npy"
exit $status
