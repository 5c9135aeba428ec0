"""The logic around TensorRT (cache keys, file names, mismatch messages) on the CPU; the build itself needs a GPU."""

import sys
import types
from dataclasses import asdict, fields, replace
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from vae_rt.artifacts import (
    EngineSpec,
    Platform,
    engine_path_for,
    platform_mismatch,
    spec_mismatches,
    timing_cache_path,
)
from vae_rt.capabilities import engine_skip_reason
from vae_rt.engine import (
    DEFAULT_OPT_BATCH,
    allows_tf32,
    attach_timing_cache,
    build_engine,
    check_profile,
    configure_build,
    network_flags,
)
from vae_rt.errors import UserError

H100 = Platform(tensorrt="11.4.0", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", cuda="13.0")
H200 = Platform(tensorrt="11.4.0", gpu="NVIDIA H200", compute_capability="9.0", cuda="13.0")
SPEC = EngineSpec(onnx_sha256="ab" * 32, precision="fp16", z_dim=2, min_batch=1, opt_batch=1024, max_batch=65536,
                  optimization_level=3, **asdict(H100), tf32=True)


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
    assert manifest["spec"]["opt_batch"] == 64 and manifest["opt_batch_is"] == "opt_batch" and manifest["spec"]["tf32"] is True
    assert build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=64, max_batch=1024) == (plan, False)
    plan.write_bytes(b"corrupt")
    assert build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=64, max_batch=1024)[1] is True
    assert build_engine(onnx_path, tmp_path / "engines", "random.fp16", opt_batch=128, max_batch=1024)[1] is True


def test_a_manifest_from_before_the_tf32_field_means_rebuild():
    old = {k: v for k, v in asdict(SPEC).items() if k != "tf32"}
    assert spec_mismatches({"spec": old}, SPEC) == ["tf32 is None, needed True"]
    assert platform_mismatch({"spec": old}, H100) is None  # still readable


def test_timing_cache_is_per_gpu_model_not_per_compute_capability(tmp_path):
    assert timing_cache_path(tmp_path, H100) != timing_cache_path(tmp_path, H200)
    assert timing_cache_path(tmp_path, H100).name == "timing-cache.nvidia-h100-80gb-hbm3-sm90.trt11.4.0.bin"


def test_the_default_profile_is_tuned_for_the_batch_the_sampler_serves():
    from vae_rt.sampler import DEFAULT_BATCH

    assert DEFAULT_OPT_BATCH == DEFAULT_BATCH["cuda"]


def _configured(precision, tf32, cache_fits=True):
    trt, builder, config = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    config.set_timing_cache.return_value = cache_fits
    spec = replace(SPEC, precision=precision, tf32=tf32, opt_batch=4096)
    configure_build(trt, builder, config, spec, b"saved timings")
    return trt, builder, config


def test_an_fp32_network_is_built_without_tf32():
    assert allows_tf32("fp32") is False
    trt, _, config = _configured("fp32", allows_tf32("fp32"))
    config.clear_flag.assert_called_once_with(trt.BuilderFlag.TF32)
    config.set_flag.assert_not_called()


def test_an_fp16_network_sets_no_precision_flag():
    assert allows_tf32("fp16") is True
    _, _, config = _configured("fp16", allows_tf32("fp16"))
    config.clear_flag.assert_not_called()
    config.set_flag.assert_not_called()  # no BuilderFlag.FP16: removed in 11.x, an error on strongly typed 10.12+


def test_the_profile_is_tuned_for_the_spec_opt_batch():
    _, builder, config = _configured("fp16", True)
    profile = builder.create_optimization_profile.return_value
    profile.set_shape.assert_called_once_with("z", (1, 2), (4096, 2), (65536, 2))
    config.add_optimization_profile.assert_called_once_with(profile)


def test_the_timing_cache_is_verified_and_replaced_when_it_does_not_fit():
    _, _, config = _configured("fp16", True)
    config.create_timing_cache.assert_called_once_with(b"saved timings")
    config.set_timing_cache.assert_called_once_with(config.create_timing_cache.return_value, ignore_mismatch=False)
    _, _, config = _configured("fp16", True, cache_fits=False)
    assert config.create_timing_cache.call_args_list == [mock.call(b"saved timings"), mock.call(b"")]
    assert all(c.kwargs == {"ignore_mismatch": False} for c in config.set_timing_cache.call_args_list)


def test_an_unreadable_timing_cache_is_replaced():
    config = mock.MagicMock()
    fresh = object()
    config.create_timing_cache.side_effect = [RuntimeError("bad magic"), fresh]
    assert attach_timing_cache(config, b"garbage") is fresh
    config.set_timing_cache.assert_called_once_with(fresh, ignore_mismatch=False)


def test_strongly_typed_is_asked_for_only_where_the_enum_has_it():
    assert network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))) == 2
    assert network_flags(SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())) == 0
