"""scripts/gpu_check.sh on the CPU, with a stand-in for python: its exit status, time limits and summary."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
# python for the script's steps: FAKE_FAIL names a word of a step to fail, FAKE_SLEEP one to hang
args="$*"
case "$args" in -c*) exit 0 ;;
    *gpu_probe.py) [[ -n "${FAKE_NO_GPU:-}" ]] && { echo "no CUDA GPU visible to torch" >&2; exit 1; }
        echo "SKIP trt (backend, tests, bench rows): TensorRT is not installed"; exit 0 ;; esac
[[ -n "${FAKE_SLEEP:-}" && "$args" == *"$FAKE_SLEEP"* ]] && exec sleep 60
[[ "$args" == *pytest* ]] && echo "SKIPPED [1] tests/test_parity.py:40: needs onnxruntime-gpu: no CUDAExecutionProvider"
[[ -n "${FAKE_FAIL:-}" && "$args" == *"$FAKE_FAIL"* ]] && { echo "boom"; exit 3; }
echo "ran: $args"
"""

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")), reason="needs bash and timeout")


def run_check(tmp_path, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHON": str(fake), **env}, timeout=120, check=False,
    )
    return result.returncode, (out / "summary.txt").read_text()


def test_all_steps_passing_exits_0_and_names_what_was_skipped(tmp_path):
    code, summary = run_check(tmp_path)
    assert code == 0 and "RESULT: passed" in summary
    for name in ("probe", "doctor", "gpu-tests", "compare", "bench", "sample-uint8", "sample-fp32"):
        assert f"PASS     {name}\n" in summary
    assert "SKIP trt (backend, tests, bench rows): TensorRT is not installed" in summary
    assert "needs onnxruntime-gpu: no CUDAExecutionProvider" in summary


def test_one_failing_step_fails_the_run_and_the_others_still_run(tmp_path):
    code, summary = run_check(tmp_path, FAKE_FAIL="compare")
    assert code == 1 and "RESULT: FAILED" in summary
    assert "FAIL     compare: exit 3" in summary and "PASS     bench" in summary


def test_a_hanging_step_is_stopped_and_the_budget_is_kept(tmp_path):
    code, summary = run_check(tmp_path, FAKE_SLEEP="doctor", GPU_CHECK_BUDGET="6")
    assert code == 1
    assert "TIMEOUT  doctor after" in summary and "NOT RUN  bench: the run's 6 s were spent" in summary


def test_no_gpu_stops_after_the_probe(tmp_path):
    code, summary = run_check(tmp_path, FAKE_NO_GPU="1")
    assert code == 1 and "FAIL     probe: exit 1" in summary and "NOT RUN  doctor, gpu-tests" in summary


def test_the_real_probe_runs_and_fails_without_a_gpu():
    """The probe's own imports work (a stand-in python would not notice a broken one), and no GPU fails it."""
    if torch_sees_gpu():
        pytest.skip("a CUDA GPU is visible: the probe passes here, gpu_check.sh itself covers it")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_probe.py")], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("torch ") and "no CUDA GPU visible to torch" in result.stderr


def torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
