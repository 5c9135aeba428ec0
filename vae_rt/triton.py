"""A Triton Inference Server model repository for the decoder: ONNX Runtime and, with a plan, TensorRT.

Layout: `<repo>/<model>/config.pbtxt` and `<repo>/<model>/1/model.onnx` (or `model.plan`), one model
per platform, since a Triton model config names exactly one platform. The fastest one is called
`vae_decoder`, the name `vae-rt serve` answers to, so a client moves between the two unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vae_rt.artifacts import inspect_onnx
from vae_rt.files import atomic_path, make_dir, write_atomic
from vae_rt.model import INPUT_NAME, OUTPUT_NAME

MODEL_NAME = "vae_decoder"
PREFERRED_BATCHES = (1024, 8192)
QUEUE_DELAY_US = 100  # how long Triton may hold a request to batch it with others


def model_config(name: str, platform: str, z_dim: int, x_dim: int, max_batch: int) -> str:
    """config.pbtxt text: float32 `z` [z_dim] in, `image` [x_dim] out, dynamic batching, one instance.

    A plan runs on a GPU only; the ONNX model takes a GPU where Triton has one, else the CPU (KIND_AUTO).
    """
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"
    preferred = ", ".join(str(b) for b in PREFERRED_BATCHES if b <= max_batch) or str(max_batch)
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {z_dim} ] }}
]
output [
  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {x_dim} ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
instance_group [
  {{ count: 1 kind: {kind} }}
]
"""


def write_model_repository(repo: Path, onnx_path: Path, plan_path: Path | None, max_batch: int) -> Path:
    """Write `vae_decoder` (the TensorRT plan when there is one, else the ONNX model) into `repo`, and with a
    plan the ONNX model beside it as `vae_decoder_onnx`; returns the repo folder."""
    z_dim, x_dim, _ = inspect_onnx(onnx_path)
    onnx_model = ("onnxruntime_onnx", onnx_path, "model.onnx")
    if plan_path is None:
        models = [(MODEL_NAME, *onnx_model)]
    else:
        models = [(MODEL_NAME, "tensorrt_plan", plan_path, "model.plan"), (f"{MODEL_NAME}_onnx", *onnx_model)]
    for name, platform, source, filename in models:
        version_dir = make_dir(Path(repo) / name / "1", "--triton")
        with atomic_path(version_dir / filename) as tmp:
            shutil.copyfile(source, tmp)
        write_atomic(version_dir.parent / "config.pbtxt", model_config(name, platform, z_dim, x_dim, max_batch))
    return Path(repo)
