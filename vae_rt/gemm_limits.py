"""The machine's matmul limit for `vae-rt bench`: the best GEMM rate any library here reaches.

One library's GEMM is not the machine's limit: on an AMD Zen 4, torch's fp32 `mm` ran at 174 GFLOP/s
while ONNX Runtime ran the decoder itself at 211 (docs/benchmarks.md), so rows read "121 % of peak".
Each shape is therefore timed through torch, ONNX Runtime (fp32) and OpenVINO (fp32, and bf16 on a
CPU with native bf16) where installed, the right-hand matrix held as a constant as a decoder holds
its weights; the limit of a precision is its best median rate over libraries and shapes.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_rt.capabilities import native_bf16, openvino_core
from vae_rt.checkpoint import load_checkpoint
from vae_rt.timing import Timing

log = logging.getLogger(__name__)

LIMIT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ONNX_IR_VERSION = 9  # what every supported onnxruntime and openvino reads
ONNX_OPSET = 13  # MatMul has not changed since
Shape = tuple[int, int, int]  # (m, k, n): [m, k] @ [k, n]
GemmKey = tuple[str, str, Shape]  # (precision, library, shape)
SQUARE: Shape = (1024, 1024, 1024)  # a BLAS's best case, beside the decoder's own GEMMs


@dataclass(frozen=True)
class GemmLimit:
    """The best rate of one precision, and the library and shape that reached it."""

    gflops: float
    library: str
    shape: Shape

    def describe(self) -> str:
        return f"{self.gflops:.1f} ({self.library}, {'x'.join(map(str, self.shape))})"


def decoder_shapes(checkpoint: Path, batch: int) -> list[Shape]:
    """The decoder's own GEMMs at `batch` (a smaller batch's fit in cache can beat a larger one's)."""
    return [(batch, layer.in_features, layer.out_features) for layer in load_checkpoint(checkpoint)[0].decoder().layers]


def gemm_calls(shapes: list[Shape], precisions: set[str]) -> dict[GemmKey, Callable[[], Any]]:
    """One call per library, shape and limit precision: fp32 always, another only where a row computes in it
    (a bf16 GEMM without native bf16 takes seconds). A library that cannot run one here is left out."""
    calls: dict[GemmKey, Callable[[], Any]] = {}
    for precision, dtype in LIMIT_DTYPES.items():
        if precision != "fp32" and precision not in precisions:
            continue
        for shape in shapes:
            m, k, n = shape
            a, b = torch.randn(m, k), torch.randn(k, n)
            calls[precision, "torch", shape] = functools.partial(torch.mm, a.to(dtype), b.to(dtype))
            for library, make in ENGINE_GEMMS.items():
                try:
                    calls[precision, library, shape] = make(a.numpy(), b.numpy(), precision)
                except Unsupported:
                    continue
                except Exception as error:  # noqa: BLE001 - not installed (the `cpu` extra), or its own failure: the others make the limit
                    log.info("matmul limit: %s %s %s left out: %s", library, precision, shape, str(error).splitlines()[0])
    return calls


class Unsupported(Exception):
    """This library cannot run a GEMM in this precision here."""


def _matmul_onnx(a: np.ndarray, b: np.ndarray) -> bytes:
    """An ONNX model computing `a @ b`, with `b` an initializer as a decoder holds its weights."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
        [numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION).SerializeToString()


def _onnxruntime_gemm(a: np.ndarray, b: np.ndarray, precision: str) -> Callable[[], Any]:
    """The MatMul on the CPU provider with torch's thread count, as vae-rt's ort backend runs."""
    import onnxruntime as ort

    if precision != "fp32":  # its CPU provider has no bf16 MatMul
        raise Unsupported(precision)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(_matmul_onnx(a, b), options, providers=["CPUExecutionProvider"])
    return functools.partial(session.run, None, {"a": a})


def _openvino_gemm(a: np.ndarray, b: np.ndarray, precision: str) -> Callable[[], Any]:
    """The MatMul compiled as vae-rt's openvino backend compiles (`cpu_config`), at inference precision `precision`."""
    import openvino as ov

    from vae_rt.backends.openvino import cpu_config

    if precision == "bf16" and not native_bf16():
        raise Unsupported(precision)
    with tempfile.TemporaryDirectory(prefix="vae-rt-gemm-") as work:  # a file: every OpenVINO version reads ONNX from one
        path = Path(work) / "gemm.onnx"
        path.write_bytes(_matmul_onnx(a, b))
        wanted = getattr(ov.Type, precision.replace("fp", "f"))
        compiled = openvino_core().compile_model(str(path), "CPU", cpu_config(wanted, torch.get_num_threads()))
    return functools.partial(compiled, a)


ENGINE_GEMMS = {"onnxruntime": _onnxruntime_gemm, "openvino": _openvino_gemm}


def matmul_limits(latencies: dict[GemmKey, list[float]]) -> dict[str, GemmLimit]:
    """Per precision, the best median rate over libraries and shapes (a decoder GEMM may beat the square one)."""
    limits: dict[str, GemmLimit] = {}
    for (precision, library, (m, k, n)), collected in latencies.items():
        rate = 2 * m * k * n / Timing(collected).median / 1e9
        if precision not in limits or rate > limits[precision].gflops:
            limits[precision] = GemmLimit(rate, library, (m, k, n))
    return limits
