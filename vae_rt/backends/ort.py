"""The ONNX Runtime backend: CUDA execution provider with IOBinding on torch tensors, or the CPU provider.

`onnxruntime` (extra `cpu`) or `onnxruntime-gpu` (extra `gpu`) is imported only when a session opens.
The provider that really runs is checked, never assumed: ORT silently falls back to the CPU when
its CUDA provider cannot load, and `--device cuda` must not turn into a quiet slowdown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from vae_rt.backends import BaseBackend, Latents, to_device
from vae_rt.errors import UserError, require
from vae_rt.model import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
WEIGHT_PRECISIONS = ((onnx.TensorProto.INT8, "int8"), (onnx.TensorProto.FLOAT16, "fp16"))  # checked in this order


class OnnxModelError(UserError):
    """The file is not an ONNX decoder with vae-rt's input and output."""


def inspect_onnx(path: Path) -> tuple[int, int, str]:
    """(z_dim, x_dim, precision) of an exported decoder, or a one-line error saying what does not fit.

    The precision is that of its weights: fp16 or int8 initializers mean an fp16 or int8 model (its
    I/O stays float32).
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, ValueError, ... for non-protobuf bytes
        raise OnnxModelError(f"{path}: not a readable ONNX model ({type(err).__name__})") from err
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
    if (
        len(z_shape) != 2 or not isinstance(z_shape[1], int) or len(image_shape) != 2 or not isinstance(image_shape[1], int)
        or z_in.type.tensor_type.elem_type != float_type or image_out.type.tensor_type.elem_type != float_type
    ):
        raise OnnxModelError(
            f"{path}: '{INPUT_NAME}' is {z_shape} and '{OUTPUT_NAME}' is {image_shape}; expected float32 "
            "[batch, z_dim] and [batch, 784]"
        )
    weight_types = {t.data_type for t in graph.initializer}
    precision = next((name for kind, name in WEIGHT_PRECISIONS if kind in weight_types), "fp32")
    return z_shape[1], image_shape[1], precision


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def available_providers() -> list[str]:
    """Execution providers onnxruntime offers here ([] when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


class OrtBackend(BaseBackend):
    """One InferenceSession; on CUDA, inputs and outputs are bound to torch tensors (no host round trip)."""

    name = "ort"

    def __init__(self, onnx_path: Path, precision: str | None = None, device: str = "auto", threads: int | None = None):
        self.onnx_path = Path(onnx_path)
        z_dim, self.x_dim, detected = inspect_onnx(self.onnx_path)
        if precision is not None and precision != detected:
            raise UserError(f"{self.onnx_path} is an {detected} model, not {precision}")
        if device == "auto" and CUDA_EP not in available_providers():
            device = "cpu"
        super().__init__(detected, device)
        self.z_dim = z_dim
        self.threads = threads or torch.get_num_threads()  # the same cores torch uses: a fair comparison
        self.provider = ""
        self._session = None

    def describe(self) -> str:
        return f"ort {self.precision} on {self.provider or self.device}"

    def _open(self) -> None:
        ort = require("onnxruntime", extra="cpu" if self.device == "cpu" else "gpu")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # a chain of six nodes: nothing runs in parallel across nodes
        options.log_severity_level = 3  # errors only: ORT's warnings about fp16 casts are expected here
        if self.device == "cuda":
            if CUDA_EP not in ort.get_available_providers():
                raise UserError(
                    "--device cuda: onnxruntime has no CUDAExecutionProvider here "
                    "(install onnxruntime-gpu alone: pip install 'vae-rt[gpu]', and uninstall onnxruntime)"
                )
            # Every node must run on the GPU: a silent CPU fallback would be a slowdown nobody asked for.
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            providers: list = [(CUDA_EP, {"device_id": str(torch.cuda.current_device()), "use_tf32": "0"})]
        else:
            providers = [CPU_EP]
        try:
            self._session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            raise UserError(f"{self.onnx_path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from err
        self.provider = self._session.get_providers()[0]
        if self.device == "cuda" and self.provider != CUDA_EP:
            raise UserError(f"--device cuda: onnxruntime runs this model on {self.provider}, not on the GPU")

    def _close(self) -> None:
        self._session = None

    def _decode(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        if self.device == "cpu" and out is None:
            host_z = z if isinstance(z, np.ndarray) else z.cpu().numpy()
            (images,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: host_z})
            return torch.from_numpy(images.reshape(len(images), *IMAGE_SHAPE))
        return self._decode_bound(z, out)

    def _decode_bound(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        """IOBinding: ORT reads z from and writes images into torch memory directly (CUDA, or `out` on the CPU)."""
        z = to_device(z, self.device).contiguous()
        images = out if out is not None else torch.empty((len(z), *IMAGE_SHAPE), dtype=torch.float32, device=z.device)
        index = z.device.index or 0
        binding = self._session.io_binding()
        binding.bind_input(INPUT_NAME, self.device, index, np.float32, tuple(z.shape), z.data_ptr())
        binding.bind_output(OUTPUT_NAME, self.device, index, np.float32, (len(z), self.x_dim), images.data_ptr())
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()  # z must be in place before ORT's own stream reads it
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # images are complete before torch reads them
        return images


def create(onnx_path: Path, precision: str | None = None, device: str = "auto", **options: int) -> OrtBackend:
    return OrtBackend(onnx_path, precision, device, **options)
