"""The machine's matmul limit for `vae-rt bench`: the best GEMM rate any library here reaches.

One library's GEMM is not the machine's limit: on an AMD Zen 4, torch's fp32 `mm` ran at 174 GFLOP/s
while ONNX Runtime ran the decoder itself at 211 (docs/benchmarks.md), so rows read "121 % of peak".
Each shape is therefore timed through torch, ONNX Runtime (fp32) and OpenVINO (fp32, and bf16 on a
CPU with native bf16) where installed, the right-hand matrix held as a constant as a decoder holds
its weights; the limit of a precision is its best median rate over libraries and shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_rt.capabilities import native_bf16, openvino_core
from vae_rt.checkpoint import load_checkpoint
from vae_rt.timing import Timing

SQUARE_SIZE = 1024  # float32 [1024, 1024] @ [1024, 1024]: a BLAS's best case, beside the decoder's own GEMMs
LIMIT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ONNX_IR_VERSION = 9  # what every supported onnxruntime reads
Shape = tuple[int, int, int]  # (m, k, n): [m, k] @ [k, n]
GemmKey = tuple[str, str, Shape]  # (precision, library, shape)


@dataclass(frozen=True)
class GemmLimit:
    """The best rate of one precision, and the library and shape that reached it."""

    gflops: float
    library: str
    shape: Shape

    def describe(self) -> str:
        return f"{self.gflops:.1f} ({self.library}, {'x'.join(map(str, self.shape))})"


def limit_shapes(checkpoint: Path, batch: int) -> list[Shape]:
    """A square GEMM, and the decoder's own at `batch` (a smaller batch's fit in cache can beat a larger one's)."""
    layers = load_checkpoint(checkpoint)[0].decoder().layers
    return [(SQUARE_SIZE, SQUARE_SIZE, SQUARE_SIZE), *((batch, layer.in_features, layer.out_features) for layer in layers)]


def gemm_calls(shapes: list[Shape], precisions: set[str]) -> dict[GemmKey, Callable[[], Any]]:
    """One call per library, shape and limit precision: fp32 always, another only where a row computes in it
    (a bf16 GEMM without native bf16 takes seconds)."""
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
                except (ImportError, Unsupported):  # not installed (the `cpu` extra), or not this precision
                    continue
    return calls


class Unsupported(Exception):
    """This library cannot run a GEMM in this precision here."""


def _onnxruntime_gemm(a: np.ndarray, b: np.ndarray, precision: str) -> Callable[[], Any]:
    """A MatMul with `b` as an initializer, on the CPU provider with torch's thread count (as vae-rt runs it)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vae_rt.export import OPSET

    if precision != "fp32":  # its CPU provider has no bf16 MatMul
        raise Unsupported(precision)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ONNX_IR_VERSION)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return functools.partial(session.run, None, {"a": a})


def _openvino_gemm(a: np.ndarray, b: np.ndarray, precision: str) -> Callable[[], Any]:
    """A MatMul with `b` as a constant, compiled for the CPU at inference precision `precision`."""
    import openvino as ov
    import openvino.opset13 as ops
    import openvino.properties.hint as hints

    if precision == "bf16" and not native_bf16():
        raise Unsupported(precision)
    a_input = ops.parameter(list(a.shape), ov.Type.f32, name="a")
    model = ov.Model([ops.matmul(a_input, ops.constant(b), False, False)], [a_input], "gemm")
    compiled = openvino_core().compile_model(model, "CPU", {hints.inference_precision: getattr(ov.Type, precision.replace("fp", "f"))})
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
