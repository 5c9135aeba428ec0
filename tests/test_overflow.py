"""The overflow-free radius: sound on real weights, refused where it cannot hold, and the image scan it replaces."""

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from vae_rt import backends, open_sampler
from vae_rt.backends import latent_extent
from vae_rt.checkpoint import load_checkpoint, save_checkpoint
from vae_rt.errors import RuntimeFailure
from vae_rt.model import VAE, VAEConfig
from vae_rt.overflow import (
    SAFE_MAGNITUDE,
    UNCERTIFIED,
    decoder_radius,
    graph_bounds,
    latents_bound,
    onnx_radius,
    safe_radius,
)
from vae_rt.resolve import cached_onnx


def _layers(*layers):
    """The bounds after each of `layers` ((weight [out, in], bias) pairs), from 2-D latents."""
    bound, bounds = latents_bound(2), []
    for weight, bias in layers:
        bound = bound.through(np.array(weight, np.float64), np.array(bias, np.float64))
        bounds.append(bound)
    return bounds


def test_one_layer_radius_is_the_exact_closed_form():
    # |h| <= (2 + 3) r + 1 is the bound; it meets SAFE_MAGNITUDE at r = (1e30 - 1) / 5.
    assert safe_radius(_layers(([[2, -3]], [1]))) == pytest.approx((SAFE_MAGNITUDE - 1) / 5)


def test_later_layers_shrink_the_radius():
    first = ([[1, 1], [1, -1]], [0, 0])  # input bound r -> 2r per unit
    assert safe_radius(_layers(first, ([[4, 4]], [0]))) == pytest.approx(SAFE_MAGNITUDE / 16)


@pytest.mark.parametrize("bias, weight", [(2e30, 1.0), (0.0, np.nan), (0.0, np.inf), (np.nan, 1.0)],
                         ids=["bias-beyond", "nan-weight", "inf-weight", "nan-bias"])
def test_no_radius_where_even_zero_latents_are_not_safe(bias, weight):
    assert safe_radius(_layers(([[weight, 1.0]], [bias]))) == UNCERTIFIED


def test_the_bound_holds_on_the_bundled_decoder_at_its_radius():
    """Latents at +-radius, every sign pattern: each layer's pre-activation, computed in float64, is within the bound."""
    decoder = load_checkpoint(None)[0].decoder().double()
    radius = decoder_radius(load_checkpoint(None)[0].decoder(), "fp32")
    assert 1e3 < radius < math.inf  # a latent space of N(0, 1) draws lies far inside it
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64) * radius
    with torch.no_grad():
        peaks = [h.abs().max().item() for h in decoder.pre_activations(corners)]
    assert max(peaks) <= SAFE_MAGNITUDE * (1 + 1e-9)
    assert max(peaks) > SAFE_MAGNITUDE / 1e3  # and not a vacuous bound: the corners come within 1000x of it


def test_fp16_is_never_certified_and_bf16_shares_fp32s_radius(random_checkpoint):
    decoder = load_checkpoint(random_checkpoint)[0].decoder()
    assert decoder_radius(decoder, "bf16") == decoder_radius(decoder, "fp32") > 0
    assert decoder_radius(decoder, "fp16") == UNCERTIFIED
    assert onnx_radius(cached_onnx(random_checkpoint, "fp32"), "fp16") == UNCERTIFIED


@pytest.mark.parametrize("backend, precision", [("ort", "fp32"), ("ort", "int8"), ("openvino", "fp32"), ("openvino", "int8"), ("torch", "fp32")])
def test_engines_decode_finite_images_at_the_edge_of_the_radius(bundled, backend, precision):
    """The int8 file (quantize/dequantize pairs, a sigmoid as Neg, Exp, Add, Reciprocal) is certified
    too, and what each engine really computes at +-radius, every sign pattern, stays finite."""
    pytest.importorskip({"torch": "torch", "ort": "onnxruntime", "openvino": "openvino"}[backend])
    with open_sampler(bundled, backend, precision, "cpu") as sampler:
        radius = sampler.backend.finite_radius
        assert 1e3 < radius < math.inf
        corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * radius * (1 - 1e-6)
        assert torch.isfinite(sampler.backend._decode(corners.numpy(), None)).all()


def test_the_exported_onnx_gives_the_radius_of_its_checkpoint(random_checkpoint):
    decoder = load_checkpoint(random_checkpoint)[0].decoder()
    assert onnx_radius(cached_onnx(random_checkpoint, "fp32"), "fp32") == pytest.approx(decoder_radius(decoder, "fp32"), rel=1e-12)


def _gemm_graph(nodes, initializers):
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["b", 2])],
                             [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["b", 1])],
                             [numpy_helper.from_array(v if isinstance(v, np.ndarray) else np.asarray(v, np.float32), k)
                              for k, v in initializers.items()])


def test_a_gemm_reads_its_transpose_and_scales():
    weights = {"W": [[2.0], [-3.0]], "b": [1.0]}  # [in, out]: no transB
    graph = _gemm_graph([helper.make_node("Gemm", ["z", "W", "b"], ["h"], alpha=2.0, beta=0.5),
                         helper.make_node("Sigmoid", ["h"], ["image"])], weights)
    logits, image = graph_bounds(graph)
    assert logits.slope.tolist() == [10.0] and logits.offset.tolist() == [0.5]  # |4 z0 - 6 z1 + 0.5|
    assert image.slope.tolist() == [0.0] and image.offset.tolist() == [1.0]


def test_quantize_dequantize_adds_half_a_step_and_any_zero_point_shift():
    weights = {"W": [[1.0, 1.0]], "b": [0.0], "s": 0.5, "zp": np.array(3, np.uint8), "s2": 2.0, "zp2": np.array(1, np.uint8)}
    graph = _gemm_graph([helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1),
                         helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["q"]),
                         helper.make_node("DequantizeLinear", ["q", "s2", "zp2"], ["d"]),
                         helper.make_node("Sigmoid", ["d"], ["image"])], weights)
    _, dequantized, _ = graph_bounds(graph)
    # |h| <= 2r; |q - 3| <= 2r / 0.5 + 1/2; |(q - 1) * 2| <= (4r + 1/2 + 2) * 2
    assert dequantized.slope.tolist() == [8.0] and dequantized.offset.tolist() == [5.0]


@pytest.mark.parametrize("nodes", [
    [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1), helper.make_node("Tanh", ["h"], ["image"])],
    [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1), helper.make_node("Exp", ["h"], ["image"])],
    [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1), helper.make_node("Exp", ["h"], ["e"]),
     helper.make_node("Reciprocal", ["e"], ["image"])],
    [helper.make_node("Gemm", ["z", "z", "b"], ["h"], transB=1), helper.make_node("Sigmoid", ["h"], ["image"])],
    [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transA=1, transB=1), helper.make_node("Sigmoid", ["h"], ["image"])],
    [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1), helper.make_node("Sigmoid", ["unknown"], ["image"])],
], ids=["tanh", "exp-may-be-inf", "reciprocal-of-zero", "weight-not-constant", "transA", "unknown-input"])
def test_any_other_graph_is_not_certified(nodes):
    assert graph_bounds(_gemm_graph(nodes, {"W": [[1.0, 1.0]], "b": [0.0]})) is None


def test_latent_extent_bounds_the_largest_magnitude_and_keeps_nan():
    small, large = np.array([[3.0, -4.0]], np.float32), np.full((100, 2), -5.0, np.float32)
    assert latent_extent(small) >= 4.0 and latent_extent(large) == 5.0
    for z in (small, large):
        z[0, 1] = np.nan
        assert math.isnan(latent_extent(z))


def _nan_images(z, out):
    return torch.full((len(z), 1, 28, 28), float("nan"))


@pytest.mark.parametrize("backend", ["torch", "ort", "openvino"])
def test_latents_within_the_radius_skip_the_image_scan_and_others_are_scanned(random_checkpoint, backend, monkeypatch):
    pytest.importorskip({"torch": "torch", "ort": "onnxruntime", "openvino": "openvino"}[backend])
    scanned = []
    real_scan = backends.all_finite
    monkeypatch.setattr(backends, "all_finite", lambda values: scanned.append(values.shape) or real_scan(values))
    with open_sampler(random_checkpoint, backend, "fp32", "cpu") as sampler:
        assert sampler.backend.finite_radius > 1e3
        sampler.decode(torch.ones(3, 2), check_inputs=False)
        assert scanned == []
        sampler.backend.finite_radius = 0.5  # as for a model whose radius is small
        monkeypatch.setattr(sampler.backend, "_decode", _nan_images)
        with pytest.raises(RuntimeFailure, match=r"output has NaN/Inf \(latents beyond \|z_i\| <= 0.5, where it cannot overflow\)"):
            sampler.decode(torch.ones(3, 2), check_inputs=False)
        assert scanned == [(3, 1, 28, 28)]


def test_unchecked_nan_latents_are_never_within_the_radius(random_checkpoint, monkeypatch):
    with open_sampler(random_checkpoint, "ort", "fp32", "cpu") as sampler:
        monkeypatch.setattr(sampler.backend, "_decode", _nan_images)
        with pytest.raises(RuntimeFailure, match="output has NaN/Inf"):
            sampler.decode(torch.tensor([[float("nan"), 0.0]]), check_inputs=False)


def test_fp16_images_are_always_scanned(random_checkpoint, monkeypatch):
    with open_sampler(random_checkpoint, "ort", "fp16", "cpu") as sampler:
        assert sampler.backend.finite_radius == UNCERTIFIED
        monkeypatch.setattr(sampler.backend, "_decode", _nan_images)
        with pytest.raises(RuntimeFailure, match=r"output has NaN/Inf \(the model's weights or precision overflow\)"):
            sampler.decode(torch.zeros(2, 2))


def test_weights_bf16_could_round_to_inf_are_never_certified(tmp_path):
    """A weight of 3.4e38 is finite in fp32 and inf in bf16, and inf * 0 is NaN: bounded as |W| * 0 it would pass."""
    assert safe_radius(_layers(([[3.4e38, 0.0]], [0.0]))) == UNCERTIFIED
    vae = VAE(VAEConfig())
    with torch.no_grad():
        vae.fc4.weight[0].zero_()
        vae.fc4.bias[0] = 0.0  # hidden unit 0 is 0 for every latent
        vae.fc5.weight[0, 0] = 3.4e38
    save_checkpoint(tmp_path / "edge.pth", vae)
    with open_sampler(tmp_path / "edge.pth", "torch", "bf16", "cpu") as sampler:
        assert sampler.backend.finite_radius == UNCERTIFIED
        with pytest.raises(RuntimeFailure, match="output has NaN/Inf"):
            sampler.decode(torch.randn(4, 2))


def _decoder_file(path, nodes, initializers, opset=18, functions=()):
    graph = helper.make_graph(nodes, "d", [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 784])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("local", 1)],
                              functions=list(functions))
    onnx.save(model, str(path))
    return path


WEIGHTS = [numpy_helper.from_array(np.full((784, 2), 0.01, np.float32), "W"), numpy_helper.from_array(np.zeros(784, np.float32), "b")]


def test_a_zero_first_layer_still_bounds_the_latents(tmp_path):
    """No bound grows with r, yet an infinite latent times a zero weight is NaN: the radius stays finite."""
    zero = [numpy_helper.from_array(np.zeros((784, 2), np.float32), "W"), WEIGHTS[1]]
    path = _decoder_file(tmp_path / "zero.onnx", [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1),
                                                  helper.make_node("Sigmoid", ["h"], ["image"])], zero)
    assert onnx_radius(path, "fp32") == SAFE_MAGNITUDE
    with open_sampler(path, "ort", device="cpu") as sampler, pytest.raises(RuntimeFailure, match="output has NaN/Inf"):
        sampler.decode(torch.tensor([[float("inf"), 0.0]]), check_inputs=False)


def test_ops_of_another_domain_or_a_local_function_are_not_certified(tmp_path):
    gemm = helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1)
    body = [helper.make_node("Abs", ["X"], ["a"]), helper.make_node("Neg", ["a"], ["n"]), helper.make_node("Log", ["n"], ["Y"])]
    evil = helper.make_function("local", "Sigmoid", ["X"], ["Y"], body, [helper.make_opsetid("", 18)])
    path = _decoder_file(tmp_path / "f.onnx", [gemm, helper.make_node("Sigmoid", ["h"], ["image"], domain="local")], WEIGHTS,
                         functions=[evil])
    assert onnx_radius(path, "fp32") == UNCERTIFIED
    assert graph_bounds(onnx.load(str(path)).graph) is None  # the domain alone refuses it


def test_float8_quantization_is_not_certified():
    """A float8 QuantizeLinear saturates to NaN/inf (saturate=0) and rounds relatively: not the half-step bound."""
    zero_point = helper.make_tensor("zp8", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])
    nodes = [helper.make_node("Gemm", ["z", "W", "b"], ["h"], transB=1),
             helper.make_node("QuantizeLinear", ["h", "s", "zp8"], ["q"], saturate=0),
             helper.make_node("DequantizeLinear", ["q", "s", "zp8"], ["d"]), helper.make_node("Sigmoid", ["d"], ["image"])]
    graph = _gemm_graph(nodes, {"W": [[1.0, 1.0]], "b": [0.0], "s": 1e-3})
    graph.initializer.append(zero_point)
    assert graph_bounds(graph) is None


def test_a_name_defined_twice_is_not_certified():
    nodes = [helper.make_node("Gemm", ["z", "W", "b"], ["W"], transB=1), helper.make_node("Sigmoid", ["W"], ["image"])]
    assert graph_bounds(_gemm_graph(nodes, {"W": [[1.0, 1.0]], "b": [0.0]})) is None
