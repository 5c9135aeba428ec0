"""Which latents a decoder provably decodes without overflow, so that their images need no NaN/Inf scan.

Interval bounds, taken in float64 from the very weights the engine runs: if every |z_i| <= r, a
Linear layer's output satisfies |h| <= |W| u + |b| where u bounds its input; a ReLU keeps the bound;
int8 quantize/dequantize pairs add half a step; a sigmoid of finite logits is in [0, 1]. Every bound
is affine in r, so the largest r that keeps all of them below `SAFE_MAGNITUDE` has a closed form.
Checking latents against r reads 2 values per image instead of scanning 784 (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from vae_rt.errors import RuntimeFailure
from vae_rt.parity import parity_latents

if TYPE_CHECKING:
    from vae_rt.model import VAE, Decoder

# float32 and bfloat16 overflow above 3.4e38. The rounding of a 512-term fp32 sum, or of bf16 inputs and
# weights, grows a bound by well under 1 % per layer; 1e30 leaves a factor of 1e8.
SAFE_MAGNITUDE = 1e30
CERTIFIED_PRECISIONS = ("fp32", "bf16", "int8")  # fp16 overflows at 65504: always scanned
UNCERTIFIED = -math.inf  # the radius that no latent is within


@dataclass(frozen=True)
class Magnitude:
    """A finite value: per feature, |x| <= slope * r + offset whenever every latent |z_i| <= r."""

    slope: np.ndarray
    offset: np.ndarray

    def through(self, weight: np.ndarray, bias: np.ndarray) -> Magnitude:
        """The bound after `x @ weight.T + bias`, weight [out, in]. A weight or bias beyond
        `SAFE_MAGNITUDE` gives an infinite bound (refused): bf16 could round it to inf, and inf * 0 is NaN."""
        magnitude = np.abs(weight)
        if not ((magnitude <= SAFE_MAGNITUDE).all() and (np.abs(bias) <= SAFE_MAGNITUDE).all()):
            return Magnitude(np.full(len(magnitude), np.inf), np.full(len(magnitude), np.inf))
        with np.errstate(invalid="ignore", over="ignore"):  # inf weights times 0 give NaN: refused by safe_radius
            return Magnitude(magnitude @ self.slope, magnitude @ self.offset + np.broadcast_to(np.abs(bias), magnitude.shape[:1]))


@dataclass(frozen=True)
class Quantized:
    """An int8 tensor from QuantizeLinear: |q - zero_point| bounded by `steps`."""

    steps: Magnitude
    zero_point: np.ndarray


@dataclass(frozen=True)
class AtLeast:
    """A value >= low, +inf included, never NaN: the exp of a finite value, plus constants."""

    low: float


Value = np.ndarray | Magnitude | Quantized | AtLeast  # np.ndarray: a constant


def safe_radius(bounds: Iterable[Magnitude]) -> float:
    """The largest r that keeps every bound below `SAFE_MAGNITUDE`, itself at most `SAFE_MAGNITUDE`
    (no bound grows with r when the first layer is zero, yet an infinite latent times 0 is NaN);
    `UNCERTIFIED` when even z = 0 is not safe (huge or non-finite weights)."""
    radius = SAFE_MAGNITUDE
    for bound in bounds:
        if not (np.isfinite(bound.slope).all() and (bound.offset <= SAFE_MAGNITUDE).all()):  # NaN fails too
            return UNCERTIFIED
        growing = bound.slope > 0
        if growing.any():
            radius = min(radius, float(((SAFE_MAGNITUDE - bound.offset[growing]) / bound.slope[growing]).min()))
    return radius


def decoder_radius(decoder: Decoder, precision: str) -> float:
    """`safe_radius` of a torch decoder run in fp32 or bf16 (its float32 weights, before any cast)."""
    if precision not in ("fp32", "bf16"):  # of CERTIFIED_PRECISIONS, what torch runs: it has no int8
        return UNCERTIFIED
    bound = latents_bound(decoder.layers[0].in_features)
    bounds = []
    for layer in decoder.layers:
        bound = bound.through(layer.weight.detach().double().cpu().numpy(), layer.bias.detach().double().cpu().numpy())
        bounds.append(bound)
    return safe_radius(bounds)


@torch.no_grad()
def activation_peaks(model: VAE, z: torch.Tensor) -> dict[str, float]:
    """Largest |pre-activation| of each decoder layer in fp32: above 65504 an fp16 engine overflows."""
    decoder = model.decoder()
    names = [name for name, _ in decoder.named_children()]
    names[-1] += "_logits"  # the manifest's key for the sigmoid's input
    return {name: float(t.abs().max()) for name, t in zip(names, decoder.pre_activations(z), strict=True)}


def reference_peaks(model: VAE, source: str) -> dict[str, float]:
    """`activation_peaks` on the parity latents. Raises RuntimeFailure where the fp32 reference itself
    gives NaN/Inf there: its images would be 0/1 or NaN, no engine could agree with it, and none is to blame."""
    peaks = activation_peaks(model, parity_latents(model.config.z_dim))
    overflowing = [layer for layer, peak in peaks.items() if not math.isfinite(peak)]
    if overflowing:
        raise RuntimeFailure(f"{source}: its fp32 decoder gives NaN/Inf from layer {overflowing[0]} on the check "
                             "latents (normal draws and tail points; the weights overflow float32): refused")
    return peaks


def onnx_radius(path: Path, precision: str) -> float:
    """`safe_radius` of an ONNX decoder run in `precision`, read from the file an engine loads."""
    if precision not in CERTIFIED_PRECISIONS:
        return UNCERTIFIED
    model = onnx.load(str(path))
    bounds = None if model.functions else graph_bounds(model.graph)  # a local function could redefine any op
    return UNCERTIFIED if bounds is None else safe_radius(bounds)


def latents_bound(z_dim: int) -> Magnitude:
    """The bound of the latents themselves: |z_i| <= r."""
    return Magnitude(np.ones(z_dim), np.zeros(z_dim))


def graph_bounds(graph: onnx.GraphProto) -> list[Magnitude] | None:
    """The bound of every value a decoder graph computes from z, given that it uses only the ops vae-rt
    exports (Gemm, Relu, Sigmoid; in the int8 file QuantizeLinear/DequantizeLinear and a sigmoid as
    Neg, Exp, Add, Reciprocal; integer quantization only) with constant weights, each name defined
    once; None for any other graph."""
    if len(graph.input) != 1 or len(graph.output) != 1:
        return None
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 2 or dims[1].dim_value < 1:
        return None
    types = {init.name: init.data_type for init in graph.initializer}
    values: dict[str, Value] = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in graph.initializer}
    if len(values) != len(graph.initializer) or graph.input[0].name in values:
        return None
    values[graph.input[0].name] = latents_bound(dims[1].dim_value)
    bounds = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.domain not in ("", "ai.onnx") or len(node.output) != 1 or node.output[0] in values
                or any(name not in values for name in node.input) or not integer_quantization(node, attrs, types)):
            return None
        try:
            result = evaluate(node.op_type, [values[name] for name in node.input], attrs)
        except (ValueError, IndexError):  # shapes that do not broadcast, an axis out of range: not a graph to certify
            return None
        if result is None:
            return None
        values[node.output[0]] = result
        if isinstance(result, Magnitude):
            bounds.append(result)
    return bounds if isinstance(values.get(graph.output[0].name), Magnitude) else None


INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32}  # int32: biases


def integer_quantization(node: onnx.NodeProto, attrs: dict[str, Any], types: dict[str, int]) -> bool:
    """Whether a QuantizeLinear/DequantizeLinear (any other node passes) is integer quantization:
    float8 saturates to inf or NaN and rounds relatively, which the half-step bound does not cover."""
    if node.op_type == "QuantizeLinear":
        return "output_dtype" not in attrs and (len(node.input) < 3 or types.get(node.input[2]) in INTEGER_TYPES)
    if node.op_type == "DequantizeLinear":
        return all(types.get(name, onnx.TensorProto.INT8) in INTEGER_TYPES for name in node.input[:1] + node.input[2:3])
    return True


def evaluate(op: str, inputs: list[Value], attrs: dict[str, Any]) -> Value | None:
    """One node on bounds (or on constants, for the dequantized weights); None for what is not covered."""
    x, rest = inputs[0], inputs[1:]
    if not all(isinstance(value, np.ndarray) for value in rest):
        return None
    if isinstance(x, np.ndarray):  # constant folding: only the int8 file's weights and biases need it
        return dequantize(x, *rest, axis=attrs.get("axis", 1)) if op == "DequantizeLinear" and "block_size" not in attrs else None
    if op == "Gemm" and isinstance(x, Magnitude) and len(rest) == 2 and not attrs.get("transA", 0):
        weight = rest[0] * attrs.get("alpha", 1.0)
        weight = weight if attrs.get("transB", 0) else weight.T
        if weight.ndim != 2 or weight.shape[1] != x.slope.shape[0]:
            return None
        return x.through(weight, rest[1] * attrs.get("beta", 1.0))
    if op in ("Relu", "Neg") and isinstance(x, Magnitude):
        return x
    if op == "Sigmoid" and isinstance(x, Magnitude):
        return Magnitude(np.zeros_like(x.slope), np.ones_like(x.offset))
    if op == "QuantizeLinear" and isinstance(x, Magnitude) and "block_size" not in attrs:
        # round(x / scale) + zp, saturated: |q - zp| <= |x| / scale + 1/2 (saturation only lowers it)
        step = float(np.abs(rest[0]).min())
        if step <= 0:
            return None
        return Quantized(Magnitude(x.slope / step, x.offset / step + 0.5), rest[1] if len(rest) > 1 else np.zeros(1))
    if op == "DequantizeLinear" and isinstance(x, Quantized):
        # (q - zp') * scale, with |q - zp'| <= |q - zp| + |zp - zp'| for any pairing of their entries
        zero_point = rest[1] if len(rest) > 1 else np.zeros(1)
        shift = max(abs(x.zero_point.max() - zero_point.min()), abs(x.zero_point.min() - zero_point.max()))
        scale = float(np.abs(rest[0]).max())
        if not scale <= SAFE_MAGNITUDE:
            return None
        return Magnitude(x.steps.slope * scale, (x.steps.offset + shift) * scale)
    if op == "Exp" and isinstance(x, Magnitude):
        return AtLeast(0.0)
    if op == "Add" and isinstance(x, AtLeast) and rest[0].size == 1 and math.isfinite(float(rest[0].ravel()[0])):
        return AtLeast(x.low + float(rest[0].ravel()[0]))
    if op == "Reciprocal" and isinstance(x, AtLeast) and x.low > 0:
        return Magnitude(np.zeros(1), np.full(1, 1 / x.low))
    return None


def dequantize(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | float = 0.0, axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear on constants: (x - zero_point) * scale, per tensor or along `axis`."""
    along = [1] * quantized.ndim
    if np.ndim(scale) == 1:
        along[axis] = -1
    return (quantized - np.reshape(zero_point, along if np.ndim(zero_point) else ())) * np.reshape(scale, along if np.ndim(scale) else ())
