import json

import onnx
import pytest
import torch

from vae_rt.artifacts import OnnxModelError, inspect_onnx, read_manifest
from vae_rt.checkpoint import load_checkpoint, save_checkpoint
from vae_rt.errors import RuntimeFailure
from vae_rt.export import FP16_MAX, export_onnx
from vae_rt.files import sha256_file
from vae_rt.overflow import activation_peaks
from vae_rt.parity import parity_latents

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(random_checkpoint, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("export")
    return {p: export_onnx(random_checkpoint, out_dir, p) for p in ("fp32", "fp16")}


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_structure(exported, precision):
    path = exported[precision].path
    assert path.name == f"random.{precision}.onnx"
    model = onnx.load(str(path))
    (z,), (image,) = model.graph.input, model.graph.output
    assert (z.name, image.name) == ("z", "image")
    assert _dims(z)[1] == 2 and _dims(image)[1] == 784
    assert isinstance(_dims(z)[0], str) and _dims(z)[0] == _dims(image)[0]  # one symbolic batch axis
    assert z.type.tensor_type.elem_type == image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weight_types = [t.data_type for t in model.graph.initializer if len(t.dims) == 2]  # fc4, fc5, fc6
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert weight_types == ([float32, float16, float16] if precision == "fp16" else [float32] * 3)
    assert inspect_onnx(path) == (2, 784, precision)
    if precision == "fp16":  # float32 I/O and first layer, fp16 after it, the sigmoid in float32 as 1 / (1 + exp(-x))
        ops = [n.op_type for n in model.graph.node]
        assert ops == ["Gemm", "Relu", "Cast", "Gemm", "Relu", "Gemm", "Cast", "Neg", "Exp", "Add", "Reciprocal"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_reports_ort_parity_within_tolerance(exported, precision):
    parity = exported[precision].parity
    assert parity.passed and parity.nan_count == 0
    assert parity.samples == 1 + 7 + len(parity_latents(2))  # batches of 1, 7 and all latents
    if precision == "fp32":
        assert parity.max_abs <= 1e-5
    else:
        assert 0 < parity.max_abs <= 5e-3 and parity.mean_abs <= 5e-4  # fp16 really ran: not bit-equal


def test_manifest_records_source_versions_parity_and_quality(exported, random_checkpoint):
    result = exported["fp16"]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest == read_manifest(result.path)
    assert manifest["sha256"] == sha256_file(result.path)
    assert manifest["source_checkpoint"]["sha256"] == sha256_file(random_checkpoint)
    assert manifest["precision"] == "fp16" and manifest["opset"] == 18
    assert manifest["model_config"] == {"x_dim": 784, "h1_dim": 512, "h2_dim": 256, "z_dim": 2}
    assert manifest["inputs"] == [{"name": "z", "shape": ["batch", 2], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "image", "shape": ["batch", 784], "dtype": "float32"}]
    assert {"vae_rt", "torch", "onnx", "onnxruntime"} <= manifest["versions"].keys()
    assert manifest["parity_vs_torch_fp32"]["passed"] is True
    assert manifest["parity_vs_torch_fp32"]["max_abs"] == result.parity.max_abs
    gate = manifest["quality_gate"]  # the test loss through the fp16 file, against fp32's
    assert gate["passed"] is True and gate["limit"] == 0.05 and abs(gate["delta"]) <= 0.05 and gate["images"] == 10000
    assert gate == {"provider": "CPUExecutionProvider", **result.quality.as_dict()}
    assert "quality_gate" not in read_manifest(exported["fp32"].path)  # fp32 is held to 1e-5 parity instead


def test_no_temporary_files_are_left(exported):
    folder = exported["fp32"].path.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["random.fp32.onnx", "random.fp32.onnx.json", "random.fp16.onnx", "random.fp16.onnx.json"]
    )


def test_tutorial_state_dict_exports(tutorial_state_dict, tmp_path):
    result = export_onnx(tutorial_state_dict, tmp_path, "fp32")
    assert result.path.name == "checkpoint_8.fp32.onnx" and result.parity.passed


def test_activation_peaks_flag_fp16_overflow(random_checkpoint):
    model, _ = load_checkpoint(random_checkpoint)
    z = parity_latents(2)
    assert max(activation_peaks(model, z).values()) < FP16_MAX
    with torch.no_grad():
        model.fc5.weight.mul_(1e5)
    assert activation_peaks(model, z)["fc5"] > FP16_MAX


def test_a_decoder_that_overflows_float32_is_named_not_onnx_runtime(random_checkpoint, tmp_path):
    """Its own fp32 output is NaN: the parity check would blame ONNX Runtime for disagreeing with a NaN reference."""
    model, _ = load_checkpoint(random_checkpoint)
    with torch.no_grad():
        model.fc5.weight.fill_(3e38)
    save_checkpoint(tmp_path / "huge.pth", model)
    with pytest.raises(RuntimeFailure, match=r"^huge.pth: its fp32 decoder gives NaN/Inf from layer fc5 .*: refused$"):
        export_onnx(tmp_path / "huge.pth", tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all"])
def test_unreadable_onnx(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxModelError, match="bad.onnx"):
        inspect_onnx(path)


def test_onnx_with_other_names_is_rejected(tmp_path):
    path = tmp_path / "other.onnx"
    torch.onnx.export(torch.nn.Linear(2, 784).eval(), (torch.zeros(1, 2),), str(path), input_names=["x"], output_names=["y"])
    with pytest.raises(OnnxModelError, match="expected one input 'z'"):
        inspect_onnx(path)


def test_a_failed_precision_leaves_the_folder_as_it_was(random_checkpoint, tutorial_state_dict, tmp_path, monkeypatch):
    import vae_rt.export
    from vae_rt.build import export_artifacts
    from vae_rt.errors import UserError

    export_artifacts(random_checkpoint, tmp_path, ["fp32", "fp32"], name="model", engine=False)  # a repeat is one export
    before = {p.name: sha256_file(p) for p in tmp_path.iterdir()}

    def broken_int8(*args):
        raise RuntimeFailure("model.int8.onnx not written: quality gate FAIL")

    monkeypatch.setattr(vae_rt.export, "_export_int8", broken_int8)  # after fp16 passed, in the same run
    small_mnist = tuple(images[:512] for images in vae_rt.export.load_mnist(None))  # fp16's gate on 512 test images: quicker
    monkeypatch.setattr(vae_rt.export, "load_mnist", lambda data_dir: small_mnist)
    with pytest.raises(RuntimeFailure, match="quality gate"):
        export_artifacts(tutorial_state_dict, tmp_path, ["fp32", "fp16", "int8"], name="model", engine=False)
    monkeypatch.undo()
    monkeypatch.setenv("VAE_RT_MNIST_DIR", str(tmp_path / "no-mnist-here"))  # fails before fp32 is exported
    with pytest.raises(UserError, match="MNIST"):
        export_artifacts(tutorial_state_dict, tmp_path, ["fp32", "int8"], name="model", engine=False)
    assert {p.name: sha256_file(p) for p in tmp_path.iterdir()} == before  # fp32 kept, no fp16 added, no staging left


def test_a_served_onnx_must_match_its_manifest(exported, tmp_path):
    from vae_rt.errors import UserError
    from vae_rt.resolve import artifact_kind

    onnx_copy = tmp_path / exported["fp32"].path.name
    onnx_copy.write_bytes(exported["fp32"].path.read_bytes())
    assert artifact_kind(onnx_copy) == "onnx"  # no manifest: a file from elsewhere, served as it is
    manifest = tmp_path / exported["fp32"].manifest_path.name
    manifest.write_bytes(exported["fp32"].manifest_path.read_bytes())
    assert artifact_kind(onnx_copy) == "onnx"
    onnx_copy.write_bytes(exported["fp16"].path.read_bytes())  # replaced after export
    with pytest.raises(UserError, match="sha256 differs"):
        artifact_kind(onnx_copy)
    manifest.write_text("{garbage")
    with pytest.raises(UserError, match="its manifest random.fp32.onnx.json is unreadable"):
        artifact_kind(onnx_copy)
    manifest.write_text('{"opset": 18}')  # another tool's JSON beside the file: not a vae-rt manifest
    assert artifact_kind(onnx_copy) == "onnx"


def test_signals_held_wait_for_the_block_then_interrupt():
    import signal

    from vae_rt.errors import signals_held

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left installed
    try:
        done = []
        with pytest.raises(KeyboardInterrupt), signals_held():
            signal.raise_signal(signal.SIGINT)  # in this thread: handled before the next line runs
            done.append("renamed")  # reached: the Ctrl-C waited
        assert done == ["renamed"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
