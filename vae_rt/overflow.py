"""Which latents a decoder provably decodes without overflow, so that their images need no NaN/Inf scan.

Interval bounds over the decoder's Linear layers, taken in float64 from the very weights the engine
runs: if every |z_i| <= r, each pre-activation satisfies |h| <= |W| u + |b|, where u bounds the layer's
input (the ReLU keeps the bound; the sigmoid of a finite logit is in [0, 1]). That bound is affine in
r, so the largest r that keeps every bound below `SAFE_MAGNITUDE` has a closed form. Scanning the
latents against r costs 2 values per image instead of 784 (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vae_rt.model import Decoder

# float32 and bfloat16 overflow above 3.4e38. The rounding of a 512-term fp32 sum, or of bf16 inputs and
# weights, grows a bound by well under 1 % per layer; 1e30 leaves a factor of 1e8.
SAFE_MAGNITUDE = 1e30
CERTIFIED_PRECISIONS = ("fp32", "bf16")  # fp16 overflows at 65504 and int8 runs other weights: always scanned
UNCERTIFIED = -math.inf  # the radius that no latent is within
Layer = tuple[np.ndarray, np.ndarray]  # weight [out, in], bias [out]


def safe_radius(layers: Sequence[Layer]) -> float:
    """The largest r such that latents with every |z_i| <= r keep every pre-activation below
    `SAFE_MAGNITUDE`; `UNCERTIFIED` when even z = 0 is not safe (huge or non-finite weights)."""
    if not layers:
        return UNCERTIFIED
    in_dim = layers[0][0].shape[1]
    slope, offset = np.ones(in_dim), np.zeros(in_dim)  # the input bound is slope * r + offset, per unit
    radius = math.inf
    for weight, bias in layers:
        magnitude = np.abs(weight.astype(np.float64))
        with np.errstate(invalid="ignore", over="ignore"):  # inf weights times 0 give NaN: refused below
            slope, offset = magnitude @ slope, magnitude @ offset + np.abs(bias.astype(np.float64))
        if not (np.isfinite(slope).all() and (offset <= SAFE_MAGNITUDE).all()):  # NaN fails the comparison too
            return UNCERTIFIED
        growing = slope > 0
        if growing.any():
            radius = min(radius, float(((SAFE_MAGNITUDE - offset[growing]) / slope[growing]).min()))
    return radius


def decoder_radius(decoder: Decoder, precision: str) -> float:
    """`safe_radius` of a torch decoder run in `precision` (its float32 weights, before any cast)."""
    if precision not in CERTIFIED_PRECISIONS:
        return UNCERTIFIED
    return safe_radius([(layer.weight.detach().cpu().numpy(), layer.bias.detach().cpu().numpy()) for layer in decoder.layers])


def onnx_radius(path: Path, precision: str) -> float:
    """`safe_radius` of an ONNX decoder run in `precision`, read from the file an engine loads."""
    if precision not in CERTIFIED_PRECISIONS:
        return UNCERTIFIED
    layers = onnx_layers(onnx.load(str(path)).graph)
    return UNCERTIFIED if layers is None else safe_radius(layers)


def onnx_layers(graph: onnx.GraphProto) -> list[Layer] | None:
    """The Linear layers of a graph that is exactly a chain z -> Gemm (constant weight and bias) -> Relu
    -> ... -> Gemm -> Sigmoid -> image; None for any other graph, which is then not certified."""
    if len(graph.input) != 1 or len(graph.output) != 1 or not graph.node:
        return None
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    kinds = [node.op_type for node in graph.node]
    if kinds[-1] != "Sigmoid" or not set(kinds[:-1]) <= {"Gemm", "Relu"}:
        return None
    layers: list[Layer] = []
    flowing = graph.input[0].name
    for node in graph.node:
        if list(node.input[:1]) != [flowing] or len(node.output) != 1:
            return None
        flowing = node.output[0]
        if node.op_type == "Gemm":
            layer = gemm_layer(node, constants)
            if layer is None or (layers and layer[0].shape[1] != layers[-1][0].shape[0]):
                return None
            layers.append(layer)
    return layers if layers and flowing == graph.output[0].name else None


def gemm_layer(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> Layer | None:
    """A Gemm `alpha * A @ op(B) + beta * C` as (weight [out, in], bias [out]); None unless B and C are constants."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("transA", 0) or len(node.input) != 3 or not {node.input[1], node.input[2]} <= constants.keys():
        return None
    weight = constants[node.input[1]] * attributes.get("alpha", 1.0)
    weight = weight if attributes.get("transB", 0) else weight.T
    bias = constants[node.input[2]] * attributes.get("beta", 1.0)
    if weight.ndim != 2 or bias.size not in (1, weight.shape[0]) or bias.ndim > 1:
        return None
    return weight, np.broadcast_to(bias, (weight.shape[0],))
