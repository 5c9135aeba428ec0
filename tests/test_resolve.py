"""From a model path and options to a backend: the auto choice, refusals, the ONNX cache."""

import pytest
import torch

import vae_rt.resolve as resolve_module
from vae_rt import open_sampler
from vae_rt.errors import UserError
from vae_rt.resolve import cached_onnx, choose_backend

pytest.importorskip("onnxruntime")


def test_auto_prefers_onnx_runtime_on_the_cpu_and_says_why(monkeypatch):
    name, device, why = choose_backend("checkpoint", None, "cpu")
    assert (name, device) == ("ort", "cpu") and "chose ort on cpu" in why
    monkeypatch.setattr(resolve_module, "available_providers", list)
    name, _, why = choose_backend("checkpoint", None, "cpu")
    assert name in ("openvino", "torch") and "onnxruntime is not installed" in why
    monkeypatch.setattr(resolve_module, "_installed", lambda module: False)
    with pytest.raises(UserError, match="no backend can run.*openvino is not installed"):
        choose_backend("onnx", None, "cpu")


def test_auto_on_an_onnx_file_serves_the_precision_asked_for_or_refuses(random_checkpoint):
    from vae_rt.capabilities import native_bf16

    fp16 = cached_onnx(random_checkpoint, "fp16")
    for precision in ("fp32", "int8", "bf16"):
        with pytest.raises(UserError, match=f"is an fp16 model, not {precision}"):
            open_sampler(fp16, "auto", precision, "cpu")
    with open_sampler(fp16, "auto", None, "cpu") as sampler:
        assert sampler.backend.precision == "fp16"
    if native_bf16() and resolve_module._installed("openvino"):  # bf16 from the fp32 file: openvino's hint
        with open_sampler(cached_onnx(random_checkpoint, "fp32"), "auto", "bf16", "cpu") as sampler:
            assert sampler.describe() == "openvino bf16 on cpu"


def test_auto_on_a_machine_without_gpu_explains_the_skip():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, _, why = choose_backend("checkpoint", None, "auto")
    assert "torch sees no CUDA GPU" in why


def test_backends_refuse_files_they_cannot_run(tmp_path, random_checkpoint):
    onnx_path = cached_onnx(random_checkpoint, "fp32")
    with pytest.raises(UserError, match="backend torch needs a checkpoint"):
        open_sampler(onnx_path, "torch")
    with pytest.raises(UserError, match="unknown kind of file"):
        open_sampler(tmp_path / "model.bin")
    with pytest.raises(UserError, match="no such file"):
        open_sampler(tmp_path / "missing.pth")
    with pytest.raises(UserError, match="backend must be one of"):
        open_sampler(random_checkpoint, "tensorflow")
    with pytest.raises(UserError, match="precision must be one of"):
        open_sampler(random_checkpoint, "torch", "int4")
    with pytest.raises(UserError, match="int8 runs on --backend ort or openvino"):
        open_sampler(random_checkpoint, "torch", "int8")
    with pytest.raises(UserError, match="fp32 model, not fp16"):
        open_sampler(onnx_path, "ort", "fp16")


def test_onnx_export_is_cached_by_checkpoint_content(random_checkpoint):
    first = cached_onnx(random_checkpoint, "fp16")
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(random_checkpoint, "fp16") == first and first.stat().st_mtime_ns == stamp


def test_an_export_made_by_an_older_vae_rt_is_made_again(random_checkpoint):
    from vae_rt.artifacts import EXPORT_REVISION, read_manifest, write_manifest

    path = cached_onnx(random_checkpoint, "fp32")
    manifest = read_manifest(path)
    del manifest["export_revision"]  # as every cache entry written before the revision was recorded
    write_manifest(path, manifest)
    assert cached_onnx(random_checkpoint, "fp32") == path
    assert read_manifest(path)["export_revision"] == EXPORT_REVISION


def test_trt_without_tensorrt_names_what_to_install(random_checkpoint):
    from vae_rt.capabilities import engine_skip_reason

    reason = engine_skip_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(UserError, match="backend trt: ") as info:
        open_sampler(random_checkpoint, "trt")
    assert reason in str(info.value) and ("pip install 'vae-rt[gpu]'" in reason or "no CUDA GPU" in reason)



def test_a_failed_cached_export_is_named_by_the_checkpoint_and_not_tried_again(tutorial_state_dict, tmp_path, monkeypatch):
    import vae_rt.resolve
    from vae_rt.errors import RuntimeFailure

    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))  # no int8 export of it cached by another test

    exports = []

    def export_onnx(checkpoint, out_dir, precision, name):
        exports.append(precision)
        raise RuntimeFailure(f"{name}.{precision}.onnx not written: quality gate FAIL int8 test loss +1.2 nats")

    monkeypatch.setattr(vae_rt.resolve, "export_onnx", export_onnx)
    for _ in range(2):  # as ort int8 and openvino int8 ask for the same file under precision auto
        with pytest.raises(RuntimeFailure) as failure:
            cached_onnx(tutorial_state_dict, "int8")
        assert str(failure.value) == "the int8 export of checkpoint_8.pth not written: quality gate FAIL int8 test loss +1.2 nats"
    assert exports == ["int8"]  # tried once per process: a gate's verdict does not change
