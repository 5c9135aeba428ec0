"""What can run on this machine: ONNX Runtime's providers, TensorRT and the GPU it needs.

Builders and backends both ask these questions, so the answers live in neither.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

from vae_rt.artifacts import Platform
from vae_rt.errors import MissingDependencyError, UserError, require

log = logging.getLogger(__name__)

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def available_providers() -> list[str]:
    """Execution providers onnxruntime offers here ([] when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


_openvino_lock = threading.Lock()


def openvino_core() -> Any:
    """The one `openvino.Core` of this process (MissingDependencyError without openvino).

    Each Core loads its own CPU plugin, which points the thread's alternate signal stack at memory of
    its own and frees it when the Core goes. Two Cores freed in the order they were made leave it
    pointing at freed memory, and the next Ctrl-C or SIGTERM is a segmentation fault (docs/errors.md).
    One Core, kept, never frees it; the lock keeps two first calls from making two.
    """
    with _openvino_lock:
        return _make_openvino_core()


@functools.cache
def _make_openvino_core() -> Any:
    return require("openvino", extra="cpu").Core()


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 arithmetic on this CPU (False without openvino)."""
    try:
        core = openvino_core()
    except MissingDependencyError:
        return False
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


@functools.cache
def process_logger(trt: Any) -> Any:
    """The process's one TensorRT logger, keeping warnings and errors for `collect()`.

    TensorRT reports most failures only through its logger, and keeps the logger as a singleton: the
    first one given to a Builder or Runtime receives the messages of every later one, so a second
    logger object would hear nothing. Builds and loads share this one and collect what it says
    while their own call runs.
    """
    kept = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING)

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._listeners: list[list[str]] = []
            self._lock = threading.Lock()  # TensorRT may log from its own threads

        def log(self, severity: Any, msg: str) -> None:
            log.debug("TensorRT: %s", msg)
            if severity in kept:
                with self._lock:
                    for messages in self._listeners:
                        messages.append(msg)

        @contextlib.contextmanager
        def collect(self) -> Iterator[list[str]]:
            """The warnings and errors logged while the block runs."""
            messages: list[str] = []
            with self._lock:
                self._listeners.append(messages)
            try:
                yield messages
            finally:
                with self._lock:
                    self._listeners.remove(messages)

    return CollectingLogger()


def last_message(messages: list[str]) -> str:
    """What TensorRT said last (its error is the final line), for a one-line failure message."""
    return messages[-1] if messages else "no message from TensorRT"
