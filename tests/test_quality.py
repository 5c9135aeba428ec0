"""The quality gate (test loss against fp32) and the int8 export it guards, on the real MNIST files."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import vae_rt.quantize
from vae_rt.artifacts import inspect_onnx, read_manifest
from vae_rt.backends import get_backend
from vae_rt.checkpoint import load_checkpoint
from vae_rt.data import load_mnist
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.evaluate import to_pixels
from vae_rt.export import export_onnx
from vae_rt.files import sha256_file
from vae_rt.quality import QUALITY_LIMITS, quality_gate
from vae_rt.sampler import draw_latents, open_sampler

pytest.importorskip("onnxruntime")

SUBSET = 2000  # test images for the gates computed here; the export gate itself uses all 10000


@pytest.fixture(scope="module")
def test_pixels(mnist_dir):
    return to_pixels(load_mnist(mnist_dir)[1])


@pytest.fixture(scope="module")
def model(bundled):
    return load_checkpoint(bundled)[0]


@pytest.fixture(scope="module")
def int8_export(mnist_dir, tmp_path_factory):
    return export_onnx(None, tmp_path_factory.mktemp("int8"), "int8", data_dir=mnist_dir)


def test_bf16_decoder_passes_its_gate_on_the_real_test_set(model, test_pixels):
    with get_backend("torch", checkpoint=None, precision="bf16", device="cpu") as backend:
        gate = quality_gate(model, backend.decode, "bf16", test_pixels[:SUBSET])
    assert gate.passed and gate.limit == QUALITY_LIMITS["bf16"] == 0.05
    assert gate.delta != 0 and abs(gate.delta) <= 0.05  # bf16 really ran, and costs next to nothing
    assert gate.images == SUBSET and math.isclose(gate.this - gate.fp32, gate.delta)


def test_the_gate_fails_decoders_whose_pixel_error_is_small(model, test_pixels):
    pixels = test_pixels[:500]
    exact = quality_gate(model, model.decode, "fp16", pixels)
    assert exact.passed and exact.delta == 0  # the same latents: the fp32 decoder scores itself exactly
    unsure = quality_gate(model, lambda z: model.decode(z).clamp(0.01, 0.99), "fp16", pixels)
    assert not unsure and unsure.delta > 1  # max abs 0.01, yet a large loss
    uint8_output = quality_gate(model, lambda z: model.decode(z).mul(255).round().div(255), "int8", pixels)
    assert not uint8_output and uint8_output.delta > 0.5 and "FAIL int8" in uint8_output.summary()  # max abs 0.002


def test_int8_export_is_static_qdq_and_records_its_passing_gate(int8_export, mnist_dir):
    manifest = read_manifest(int8_export.path)
    gate = manifest["quality_gate"]
    assert int8_export.path.name == "vae_z2.int8.onnx" and manifest["precision"] == "int8"
    assert gate["metric"] == "test_loss_nats" and gate["images"] == 10000 and gate["passed"] is True
    assert 0 < gate["delta"] <= gate["limit"] == 0.5 and gate["delta"] == pytest.approx(gate["this"] - gate["fp32"])
    assert manifest["quantization"]["format"] == "QDQ" and manifest["sha256"] == sha256_file(int8_export.path)
    graph = onnx.load(str(int8_export.path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("Gemm") == 3 and "Sigmoid" not in ops
    zero_points = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("zero_point")]
    assert zero_points and all(not zp.any() for zp in zero_points)  # symmetric: TensorRT takes no other
    assert inspect_onnx(int8_export.path) == (2, 784, "int8")


def test_int8_file_runs_on_the_ort_cpu_provider_within_its_gate(int8_export, model, test_pixels):
    with open_sampler(int8_export.path, "ort", "int8", "cpu") as sampler:
        assert sampler.describe() == "ort int8 on CPUExecutionProvider"
        images = sampler.sample(64)
        gate = quality_gate(model, sampler.decode, "int8", test_pixels[:SUBSET])
    assert images.shape == (64, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert gate.passed and gate.delta > 0


def test_int8_file_runs_on_openvino_in_int8_as_onnx_runtime_does(int8_export, model, test_pixels):
    """OpenVINO runs the quantized layers in int8 and the rest in fp32: ORT's numbers on ordinary latents, the same gate."""
    pytest.importorskip("openvino")
    from vae_rt.backends.openvino import int8_layers

    z = draw_latents(1000, 2, seed=3)
    with open_sampler(int8_export.path, "openvino", None, "cpu") as ov, open_sampler(int8_export.path, "ort", "int8", "cpu") as ort:
        assert ov.describe() == "openvino int8 on cpu"
        assert len(int8_layers(ov.backend._request.get_compiled_model().get_runtime_model())) == 2  # fc5 and fc6
        assert (ov.decode(z) - ort.decode(z)).abs().max() <= 1e-5
        assert (ov.decode(z[:1]) - ort.decode(z[:1])).abs().max() <= 1e-5
        gate = quality_gate(model, ov.decode, "int8", test_pixels[:SUBSET])
        assert gate.passed and gate.this == pytest.approx(quality_gate(model, ort.decode, "int8", test_pixels[:SUBSET]).this, abs=1e-3)


def test_a_broken_quantization_fails_the_gate_and_keeps_the_good_file(int8_export, mnist_dir, monkeypatch):
    good = sha256_file(int8_export.path)
    quantize = vae_rt.quantize.quantize_int8

    def corrupted_scale(fp32_path, out_path, latents):
        settings = quantize(fp32_path, out_path, latents)
        model = onnx.load(str(out_path))
        (scale,) = [t for t in model.graph.initializer if t.name.endswith("weight_scale") and list(t.dims) == [784]]
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.1), scale.name))
        onnx.save(model, str(out_path))
        return settings

    monkeypatch.setattr(vae_rt.quantize, "quantize_int8", corrupted_scale)
    with pytest.raises(RuntimeFailure, match="vae_z2.int8.onnx not written: quality gate FAIL int8") as caught:
        export_onnx(None, int8_export.path.parent, "int8", data_dir=mnist_dir)
    assert "\n" not in str(caught.value)
    assert sha256_file(int8_export.path) == good and json.loads(int8_export.manifest_path.read_text())["sha256"] == good
    assert sorted(p.name for p in int8_export.path.parent.iterdir()) == ["vae_z2.int8.onnx", "vae_z2.int8.onnx.json"]


def test_torch_has_no_int8_decoder():
    with pytest.raises(UserError, match="int8 runs on --backend ort or openvino"):
        get_backend("torch", checkpoint=None, precision="int8", device="cpu")


def test_openvino_refuses_int8_it_would_run_dequantized(int8_export, monkeypatch):
    """Where OpenVINO's compiled model has no int8 layer, int8 would be a silent fp32 slowdown: refused, as unavailable here."""
    pytest.importorskip("openvino")
    import vae_rt.backends.openvino
    from vae_rt.errors import EngineUnavailable

    monkeypatch.setattr(vae_rt.backends.openvino, "int8_layers", lambda runtime_model: [])
    with pytest.raises(EngineUnavailable, match="^precision int8: openvino runs no layer of vae_z2.int8.onnx in int8 on this CPU$"):
        open_sampler(int8_export.path, "openvino", "int8", "cpu")
