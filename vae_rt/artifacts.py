"""The files builders write and backends read: manifests, the ONNX I/O contract, engine file names.

This is the one layer both sides share. Builders (`export.py`, `engine.py`, `triton.py`) write
artifacts; backends only read them; neither imports the other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from vae_rt.errors import UserError, first_line
from vae_rt.files import sha256_file, write_atomic
from vae_rt.model import INPUT_NAME, OUTPUT_NAME, X_DIM

EXPORT_REVISION = 3  # raised whenever the exported graph changes (2: fp32 sigmoid in fp16/int8; 3: fp32 first layer in fp16), so caches re-export

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)

WEIGHT_PRECISIONS = ((onnx.TensorProto.INT8, "int8"), (onnx.TensorProto.FLOAT16, "fp16"))  # checked in this order


class OnnxModelError(UserError):
    """The file is not an ONNX decoder with vae-rt's input and output."""


def onnx_path_for(out_dir: Path, name: str, precision: str) -> Path:
    return Path(out_dir) / f"{name}.{precision}.onnx"


def manifest_path_for(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def read_manifest(artifact: Path) -> dict[str, Any] | None:
    """The manifest beside `artifact`, or None when it is missing or unreadable."""
    try:
        manifest = json.loads(manifest_path_for(artifact).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_mismatch(artifact: Path) -> str | None:
    """Why `artifact` is not the file its vae-rt manifest describes; None when it is, or when it has none
    (a file from elsewhere, or beside another tool's JSON: served as it is)."""
    manifest_path = manifest_path_for(artifact)
    if not manifest_path.exists():
        return None
    if not manifest_path.is_file():
        return f"its manifest {manifest_path.name} is not a file"
    manifest = read_manifest(artifact)
    if manifest is None:
        return f"its manifest {manifest_path.name} is unreadable"
    if manifest.get("kind") != "onnx":
        return None
    if not isinstance(manifest.get("sha256"), str):
        return f"its manifest {manifest_path.name} records no sha256"
    if manifest["sha256"] != sha256_file(artifact):
        return f"its sha256 differs from the one {manifest_path.name} records: altered, replaced or truncated since export"
    return None


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> Path:
    path = manifest_path_for(artifact)
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def io_contract(z_dim: int, x_dim: int) -> dict[str, list[dict[str, Any]]]:
    """The manifest's record of a decoder's inputs and outputs, checked again whenever a cached file is reused."""
    return {
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", z_dim], "dtype": "float32"}],
        "outputs": [{"name": OUTPUT_NAME, "shape": ["batch", x_dim], "dtype": "float32"}],
    }


def inspect_onnx(path: Path) -> tuple[int, int, str]:
    """(z_dim, x_dim, precision) of an exported decoder, or a one-line error saying what does not fit.

    The precision is that of its weights: fp16 or int8 initializers mean an fp16 or int8 model (its
    I/O stays float32). Refused: I/O of other names, types or shapes (a fixed batch included), weights
    with NaN or Inf, an output that is not a sigmoid (images must be probabilities in [0, 1]).
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))  # weights kept in an external data file too, read from beside it as the engines do
    except Exception as err:  # onnx raises DecodeError, ValueError, ... for non-protobuf bytes or missing external data
        raise OnnxModelError(f"{path}: not a readable ONNX model ({type(err).__name__}: {first_line(err)})") from err
    try:  # what one engine refuses another may run anyway (OpenVINO took a model without an opset): all refuse it here
        onnx.checker.check_model(str(path))  # by path: external data is checked beside it, and no 2 GB proto limit
    except onnx.checker.ValidationError as err:
        raise OnnxModelError(f"{path}: not a valid ONNX model: {first_line(err)}") from err
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise OnnxModelError(
            f"{path}: has inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}; "
            f"expected one input '{INPUT_NAME}' [batch, z_dim] and one output '{OUTPUT_NAME}' [batch, 784]"
        )
    (z_in,), (image_out,) = inputs, graph.output
    z_shape, image_shape = _dims(z_in), _dims(image_out)
    float_type = onnx.TensorProto.FLOAT
    if (  # the engines write [batch, 784] float32 straight into the caller's memory: nothing else may pass
        len(z_shape) != 2 or not isinstance(z_shape[1], int) or image_shape[1:] != [X_DIM]
        or isinstance(z_shape[0], int) or isinstance(image_shape[0], int)
        or z_in.type.tensor_type.elem_type != float_type or image_out.type.tensor_type.elem_type != float_type
    ):
        z_type, image_type = (onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower() for v in (z_in, image_out))
        raise OnnxModelError(
            f"{path}: has '{INPUT_NAME}' {z_type} {z_shape} and '{OUTPUT_NAME}' {image_type} {image_shape}; "
            f"needed float [batch, z_dim] and float [batch, {X_DIM}], batch a dynamic axis"
        )
    for tensor in graph.initializer:
        bad = int((~np.isfinite(numpy_helper.to_array(tensor))).sum()) if tensor.data_type in FLOAT_TYPES else 0
        if bad:
            raise OnnxModelError(f"{path}: weight '{tensor.name}' has {bad} NaN/Inf value{'s' if bad > 1 else ''}; the weights are damaged")
    source = _output_source(graph)
    if source is not None:
        raise OnnxModelError(f"{path}: its output '{OUTPUT_NAME}' comes from {source}, not a sigmoid; vae-rt serves "
                             "pixel probabilities in [0, 1] (a decoder that ends in logits needs a Sigmoid node)")
    weight_types = {t.data_type for t in graph.initializer}
    precision = next((name for kind, name in WEIGHT_PRECISIONS if kind in weight_types), "fp32")
    return z_shape[1], image_shape[1], precision


VALUE_KEEPING_OPS = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # type or shape only


def _output_source(graph: onnx.GraphProto) -> str | None:
    """None when the output is a sigmoid: a Sigmoid node, or 1 / (1 + exp(x)) as vae-rt's fp16 and int8
    files write it (an fp32 sigmoid after an fp16 cast), maybe followed by casts and reshapes; else what computes it."""
    producers = {name: node for node in graph.node for name in node.output}
    ones = {t.name for t in graph.initializer if _all_ones(numpy_helper.to_array(t))}
    ones |= {node.output[0] for node in graph.node if node.op_type == "Constant" and node.attribute
             and node.attribute[0].name == "value" and _all_ones(numpy_helper.to_array(node.attribute[0].t))}

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None

    def one_plus_exp(name: str) -> bool:  # 1 + exp(x) >= 1, so its reciprocal is in (0, 1]
        add = made_by(name, "Add")
        if add is None or len(add.input) != 2:
            return False
        a, b = add.input
        return (a in ones and made_by(b, "Exp") is not None) or (b in ones and made_by(a, "Exp") is not None)

    name = OUTPUT_NAME
    while (node := producers.get(name)) is not None and node.op_type in VALUE_KEEPING_OPS and node.domain in ("", "ai.onnx"):
        name = node.input[0]
    reciprocal, div = made_by(name, "Reciprocal"), made_by(name, "Div")
    if (made_by(name, "Sigmoid") or (reciprocal and one_plus_exp(reciprocal.input[0]))
            or (div and div.input[0] in ones and one_plus_exp(div.input[1]))):
        return None
    return f"a {node.op_type} node" if node is not None else "no node (an input or a weight)"


def _all_ones(array: np.ndarray) -> bool:
    return array.size > 0 and bool((array == 1).all())


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


@dataclass(frozen=True)
class Platform:
    """What a TensorRT plan is tied to: the TensorRT build and the GPU."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "9.0"
    cuda: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.gpu} (sm {self.compute_capability}, CUDA {self.cuda})"


@dataclass(frozen=True)
class EngineSpec:
    """A plan's cache key: any change of a field means another plan."""

    onnx_sha256: str
    precision: str
    z_dim: int
    min_batch: int
    opt_batch: int
    max_batch: int
    optimization_level: int
    tensorrt: str
    gpu: str
    compute_capability: str
    cuda: str
    tf32: bool = False  # TensorRT may run fp32 math in TF32; last, with a default, so older manifests still load

    @property
    def platform(self) -> Platform:
        return Platform(self.tensorrt, self.gpu, self.compute_capability, self.cuda)


def platform_tag(platform: Platform) -> str:
    """`<gpu>-sm<cc>.trt<version>`, e.g. `nvidia-h100-80gb-hbm3-sm90.trt11.4.0`: what a plan or timing cache fits."""
    gpu = re.sub(r"[^a-z0-9]+", "-", platform.gpu.lower()).strip("-")
    cc = platform.compute_capability.replace(".", "")
    return f"{gpu}-sm{cc}.trt{platform.tensorrt}"


def engine_path_for(engine_dir: Path, name: str, platform: Platform) -> Path:
    """`engines/<name>.<platform tag>.plan`: one file per model, GPU and TensorRT version."""
    return Path(engine_dir) / f"{name}.{platform_tag(platform)}.plan"


def timing_cache_path(engine_dir: Path, platform: Platform) -> Path:
    """Per GPU model, not per compute capability: an H100's timings would steer an H200 build (same sm 9.0)."""
    return Path(engine_dir) / f"timing-cache.{platform_tag(platform)}.bin"


def spec_mismatches(manifest: dict[str, Any] | None, spec: EngineSpec) -> list[str]:
    """Why a cached plan cannot serve `spec`, one phrase per differing field ([] when it can)."""
    if manifest is None:
        return ["it has no readable manifest"]
    recorded = manifest.get("spec", {})
    return [
        f"{f.name} is {recorded.get(f.name)!r}, needed {getattr(spec, f.name)!r}"
        for f in fields(EngineSpec)
        if recorded.get(f.name) != getattr(spec, f.name)
    ]


def platform_mismatch(manifest: dict[str, Any] | None, here: Platform) -> str | None:
    """A one-line reason why a plan built per `manifest` cannot run here, or None when it can."""
    if manifest is None or "spec" not in manifest:
        return None  # no manifest: only deserializing can tell
    built = EngineSpec(**manifest["spec"]).platform
    if (built.tensorrt, built.gpu, built.compute_capability) != (here.tensorrt, here.gpu, here.compute_capability):
        return f"built for {built.describe()}; this is {here.describe()}: rebuild it with `vae-rt export`"
    return None
