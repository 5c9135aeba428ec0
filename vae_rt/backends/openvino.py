"""The OpenVINO backend: the exported ONNX on OpenVINO's CPU plugin, in fp32, bf16 or int8.

bf16 is OpenVINO's inference-precision hint on the fp32 file; int8 is the exported static-QDQ file,
whose quantized layers OpenVINO runs in int8 and the rest in fp32 (as ONNX Runtime does, to 1e-7).
The plugin quietly falls back to fp32 where the CPU has no native bf16 (AVX-512 BF16 or AMX), and
could run quantized layers dequantized, so bf16 is refused up front on such a CPU and what the
compiled model really runs is checked after compiling, never assumed.
`openvino` (extra `cpu`) is imported only when the backend opens.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_rt.artifacts import inspect_onnx
from vae_rt.backends import (
    OPENVINO_ONNX_FOR_PRECISION,
    BaseBackend,
    Latents,
    check_output_shape,
    engine_failure,
)
from vae_rt.capabilities import native_bf16, openvino_core
from vae_rt.errors import EngineUnavailable, UserError, require
from vae_rt.model import IMAGE_SHAPE
from vae_rt.overflow import onnx_radius


class OpenVinoBackend(BaseBackend):
    """One compiled model with one infer request, run synchronously: the lowest-overhead call per batch.

    The model keeps the ONNX file's dynamic batch dimension, so any batch size runs on one compiled
    model. Each call hands OpenVINO the latents' memory and the result's, which it writes into. A lock
    makes concurrent calls take turns: the one request refuses a second caller ("Infer Request is busy").
    """

    name = "openvino"

    def __init__(self, onnx_path: Path, precision: str | None = None, device: str = "cpu", threads: int | None = None):
        check_request(precision, device)
        self.onnx_path = Path(onnx_path)
        z_dim, self.x_dim, stored = inspect_onnx(self.onnx_path)
        precision = precision or stored
        if precision not in OPENVINO_ONNX_FOR_PRECISION:
            raise UserError(f"backend openvino reads an fp32 or int8 ONNX; {self.onnx_path} is {stored}")
        if OPENVINO_ONNX_FOR_PRECISION[precision] != stored:
            raise UserError(f"backend openvino runs {precision} from the {OPENVINO_ONNX_FOR_PRECISION[precision]} ONNX; {self.onnx_path} is {stored}")
        super().__init__(precision, "cpu")
        self.z_dim = z_dim
        self.threads = threads or torch.get_num_threads()  # the same cores torch and ort use: a fair comparison
        self._request = None
        self._lock = threading.Lock()
        self._tensor: Any = None  # openvino.Tensor: openvino is imported by `_open`, not with this module

    def _open(self) -> None:
        ov = require("openvino", extra="cpu")
        import openvino.properties.hint as hints

        core = openvino_core()
        if self.precision == "bf16" and not native_bf16():
            raise EngineUnavailable("precision bf16: this CPU has no native bf16 (OpenVINO reports no BF16 capability)")
        wanted = ov.Type.bf16 if self.precision == "bf16" else ov.Type.f32  # int8: what is not quantized runs in fp32
        try:
            compiled = core.compile_model(str(self.onnx_path), "CPU", cpu_config(wanted, self.threads))
        except RuntimeError as err:
            raise EngineUnavailable(f"{self.onnx_path}: openvino cannot compile it: {openvino_reason(err)}") from err
        actual = compiled.get_property(hints.inference_precision)
        if actual != wanted:
            raise EngineUnavailable(f"precision {self.precision}: openvino compiled the model in {actual}, not {wanted}")
        if self.precision == "int8" and not int8_layers(compiled.get_runtime_model()):
            raise EngineUnavailable(f"precision int8: openvino runs no layer of {self.onnx_path.name} in int8 on this CPU")
        self._request = compiled.create_infer_request()
        self._tensor = ov.Tensor
        self.finite_radius = onnx_radius(self.onnx_path, self.precision)

    def _close(self) -> None:
        self._request = None

    def _decode(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        rows = z.shape[0]
        # OpenVINO writes straight into the result's memory: no copy out of its own buffer. It is handed
        # numpy memory, and a fresh result is made a tensor once, at the end: each torch call right after
        # an OpenVINO run costs several microseconds (docs/benchmarks.md). The request keeps pointing at
        # the memory after the call, without keeping it alive: every infer must be given its output first.
        pixels = np.empty((rows, self.x_dim), np.float32) if out is None else out.numpy().reshape(rows, self.x_dim)
        try:
            with self._lock:
                self._request.set_output_tensor(self._tensor(pixels, shared_memory=True))
                (written,) = self._request.infer(np.ascontiguousarray(z), share_inputs=True, share_outputs=True).to_tuple()
        except Exception as err:
            raise engine_failure(self.describe(), RuntimeError(openvino_reason(err))) from err
        # A graph that computes fewer rows or pixels than it declares shrinks the tensor and leaves the rest unwritten.
        check_output_shape(self.describe, rows, self.x_dim, written.shape)
        return out if out is not None else torch.from_numpy(pixels.reshape(rows, *IMAGE_SHAPE))


def cpu_config(precision: Any, threads: int) -> dict[str, Any]:
    """How vae-rt compiles for OpenVINO's CPU plugin: at inference precision `precision` (an `openvino.Type`),
    one stream on `threads` threads (one caller, one batch at a time)."""
    import openvino.properties as props
    import openvino.properties.hint as hints

    return {
        hints.inference_precision: precision,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        props.inference_num_threads: threads,
    }


def check_request(precision: str | None, device: str) -> None:
    """Refuse a device or precision OpenVINO never serves: called before any file is exported for it."""
    if device not in ("auto", "cpu"):
        raise UserError(f"backend openvino runs on the CPU only, not on {device}")
    if precision is not None and precision not in OPENVINO_ONNX_FOR_PRECISION:
        raise UserError(f"backend openvino serves {', '.join(OPENVINO_ONNX_FOR_PRECISION)}, not {precision}")


def openvino_reason(err: Exception) -> str:
    """OpenVINO's message without the source locations it stacks above it ("Exception from src/...:132:", "Check 'x' failed at ...")."""
    lines = [line.strip() for line in str(err).splitlines()]
    reason = [line for line in lines if line and not line.startswith(("Exception from src/", "Check '"))]
    return " ".join(reason) or " ".join(lines)


def int8_layers(runtime_model: Any) -> list[str]:
    """The matrix products of a compiled model (`CompiledModel.get_runtime_model()`) that really compute in int8."""
    found = []
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("FullyConnected", "MatMul") and info["runtimePrecision"].astype(str) in ("i8", "u8"):
            found.append(op.get_friendly_name())
    return found


def create(onnx_path: Path, precision: str | None = None, device: str = "cpu", **options: int) -> OpenVinoBackend:
    return OpenVinoBackend(onnx_path, precision, device, **options)
