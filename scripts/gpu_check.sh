#!/usr/bin/env bash
# The GPU checks in one run of at most 8 minutes, from the repository root:
#     PYTHONPATH=. bash scripts/gpu_check.sh [OUT_DIR]        (default gpu-check/, git-ignored)
# Steps: what is usable here, the gpu-marked tests, a parity report, a short benchmark, two large .npy
# samples. Each step has its own time limit and log (OUT_DIR/<step>.txt). The run ends with a summary
# (also OUT_DIR/summary.txt) of what passed, failed, timed out or was skipped and why, and exits 1
# when any step did not pass. PYTHON names the interpreter (default python3). compare's quality gates
# read MNIST from $VAE_RT_MNIST_DIR (else a download, which an offline GPU machine cannot do); unset,
# it is set here to ../shared/data/mnist, the tests' folder, when that exists.
set -uo pipefail
if [[ -z "${VAE_RT_MNIST_DIR:-}" && -d ../shared/data/mnist ]]; then
    export VAE_RT_MNIST_DIR="$PWD/../shared/data/mnist"
fi
out=${1:-gpu-check}
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-480}  # seconds for the whole run; each step's limit is cut to what is left
mkdir -p "$out" || exit 1
rm -f "$out/summary.txt"  # its skip lines are not this run's
results=()
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output shown and kept in OUT/NAME.txt
    local name=$1 limit=$2 left rc
    shift 2
    left=$((budget - SECONDS))
    if ((left < 5)); then
        results+=("NOT RUN  $name: the run's ${budget} s were spent")
        failed=1
        return 1
    fi
    ((limit > left)) && limit=$left
    local shown=${*//$'\n'/ }
    echo "=== $name (at most ${limit} s): ${shown:0:150}"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    rc=${PIPESTATUS[0]}  # the command's status, not tee's
    case $rc in
        0) results+=("PASS     $name") ;;
        124 | 137) results+=("TIMEOUT  $name after ${limit} s (log: $out/$name.txt)") ;;
        *) results+=("FAIL     $name: exit $rc (log: $out/$name.txt)") ;;
    esac
    ((rc == 0)) || failed=1
    return "$rc"
}

has() { "$py" -c "import $1" >/dev/null 2>&1; }

# What can run here; a backend that cannot is named with its reason, never passed over in silence.
if step probe 60 "$py" scripts/gpu_probe.py; then
    step doctor 60 "$py" -m vae_rt doctor
    test_args=(-m gpu -rs -q -p no:cacheprovider tests)
    if has pytest_benchmark; then
        test_args+=(bench --benchmark-disable)
    else
        echo "SKIP bench/ smoke tests: pytest-benchmark is not installed" | tee "$out/bench-tests.txt"
    fi
    step gpu-tests 150 "$py" -m pytest "${test_args[@]}"
    step compare 60 "$py" -m vae_rt compare --device cuda --backends torch,ort,trt --precisions fp32,fp16,bf16
    plot_args=(--plot "$out/bench.png")
    if ! has matplotlib; then
        plot_args=()
        echo "SKIP bench plot: matplotlib is not installed" | tee "$out/bench-plot.txt"
    fi
    step bench 150 "$py" -m vae_rt -v bench --device cuda --backends torch,ort,trt --batch-sizes 1,1024,65536 --duration 1 \
        --json "$out/bench.json" "${plot_args[@]}"
    step sample-uint8 45 "$py" -m vae_rt sample --device cuda -n 1000000 --dtype uint8 --out "$out/samples-uint8.npy"
    step sample-fp32 45 "$py" -m vae_rt sample --device cuda --backend torch --precision fp32 -n 300000 \
        --out "$out/samples-fp32.npy"
    rm -f "$out"/samples-*.npy
else
    results+=("NOT RUN  doctor, gpu-tests, compare, bench, samples: the probe failed (log: $out/probe.txt)")
fi

{
    echo "=== summary: $SECONDS s of ${budget} s"
    printf '%s\n' "${results[@]}"
    echo "--- skipped, and why"
    grep -h -E '^SKIP|^skipped |: skipped: ' "$out"/*.txt 2>/dev/null | sort -u || true
    if ((failed)); then echo "RESULT: FAILED"; else echo "RESULT: passed (skips above)"; fi
} | tee "$out/summary.txt.tmp"
mv "$out/summary.txt.tmp" "$out/summary.txt"
exit "$failed"
