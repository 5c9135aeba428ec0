"""The logic around TensorRT (cache keys, file names, mismatch messages) on the CPU; the build itself needs a GPU."""

import sys
import types
from dataclasses import asdict, fields, replace

import pytest
import torch

from vae_rt.artifacts import EngineSpec, Platform, engine_path_for, platform_mismatch, spec_mismatches
from vae_rt.capabilities import engine_skip_reason
from vae_rt.engine import build_engine, check_profile
from vae_rt.errors import UserError

H100 = Platform(tensorrt="11.4.0", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", cuda="13.0")
SPEC = EngineSpec(onnx_sha256="ab" * 32, precision="fp16", z_dim=2, min_batch=1, opt_batch=1024, max_batch=65536,
                  optimization_level=3, **asdict(H100))


def test_engine_file_name_carries_gpu_and_tensorrt_version(tmp_path):
    assert engine_path_for(tmp_path, "vae_z2.fp16", H100).name == "vae_z2.fp16.nvidia-h100-80gb-hbm3-sm90.trt11.4.0.plan"


def test_matching_manifest_means_reuse():
    assert spec_mismatches({"spec": asdict(SPEC)}, SPEC) == []


@pytest.mark.parametrize("field", [f.name for f in fields(EngineSpec)])
def test_every_key_field_forces_a_rebuild(field):
    changed = replace(SPEC, **{field: "other" if isinstance(getattr(SPEC, field), str) else getattr(SPEC, field) + 1})
    reasons = spec_mismatches({"spec": asdict(SPEC)}, changed)
    assert len(reasons) == 1 and reasons[0].startswith(field)


def test_missing_manifest_means_rebuild():
    assert spec_mismatches(None, SPEC) == ["it has no readable manifest"]


def test_engine_for_another_gpu_or_tensorrt_says_what_it_was_built_for():
    manifest = {"spec": asdict(SPEC)}
    assert platform_mismatch(manifest, H100) is None
    a100 = Platform("11.4.0", "NVIDIA A100-SXM4-80GB", "8.0", "13.0")
    message = platform_mismatch(manifest, a100)
    assert "built for TensorRT 11.4.0 on NVIDIA H100 80GB HBM3 (sm 9.0" in message
    assert "this is TensorRT 11.4.0 on NVIDIA A100-SXM4-80GB (sm 8.0" in message and "rebuild" in message
    assert "TensorRT 10.16.0" in platform_mismatch(manifest, replace(H100, tensorrt="10.16.0"))


@pytest.mark.parametrize("opt, max_batch", [(0, 10), (11, 10), (1, 0)])
def test_bad_profiles(opt, max_batch):
    with pytest.raises(UserError):
        check_profile(opt, max_batch)


def test_skip_reason_names_what_is_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    reason = engine_skip_reason()
    assert "TensorRT is not installed" in reason and "pip install 'vae-rt[gpu]'" in reason
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # installed, but no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in engine_skip_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_skip_reason() is None


@pytest.mark.gpu
@pytest.mark.skipif(engine_skip_reason() is not None, reason=f"needs TensorRT and a GPU: {engine_skip_reason()}")
def test_engine_is_built_once_reused_and_rebuilt_when_corrupt(tmp_path, random_checkpoint):
    from vae_rt.artifacts import read_manifest
    from vae_rt.export import export_onnx
    from vae_rt.files import sha256_file

    onnx_path = export_onnx(random_checkpoint, tmp_path / "export", "fp16").path
    plan, built = build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=64, max_batch=1024)
    assert built and plan.is_file()
    manifest = read_manifest(plan)
    assert manifest["sha256"] == sha256_file(plan) and manifest["spec"]["max_batch"] == 1024
    assert build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=64, max_batch=1024) == (plan, False)
    plan.write_bytes(b"corrupt")
    assert build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=64, max_batch=1024)[1] is True
    assert build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=128, max_batch=1024)[1] is True
