"""What can run on this machine: ONNX Runtime's providers, TensorRT and the GPU it needs.

Builders and backends both ask these questions, so the answers live in neither.
"""

from __future__ import annotations

import logging
from typing import Any

from vae_rt.artifacts import Platform
from vae_rt.errors import UserError, require

log = logging.getLogger(__name__)

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def available_providers() -> list[str]:
    """Execution providers onnxruntime offers here ([] when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def native_bf16(core: Any | None = None) -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 arithmetic on this CPU (False without openvino)."""
    if core is None:
        try:
            import openvino
        except ImportError:
            return False
        core = openvino.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def engine_skip_reason() -> str | None:
    """Why no TensorRT engine can be built or run on this machine (what to install), or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'vae-rt[gpu]' on a machine with an NVIDIA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def current_platform() -> Platform:
    """The TensorRT version and GPU here: what a plan built now is tied to."""
    trt = require("tensorrt", extra="gpu")
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
    major, minor = torch.cuda.get_device_capability()
    return Platform(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}", str(torch.version.cuda))


def capturing_logger(trt: Any) -> Any:
    """A `trt.ILogger` that keeps warnings and errors, since TensorRT reports most failures only there."""
    kept = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING)

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in kept:
                self.messages.append(msg)
                log.debug("TensorRT: %s", msg)

        def last_error(self) -> str:
            return self.messages[-1] if self.messages else "no message from TensorRT"

    return CapturingLogger()
