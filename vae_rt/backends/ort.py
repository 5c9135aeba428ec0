"""The ONNX Runtime backend: CUDA execution provider with IOBinding on torch tensors, or the CPU provider.

`onnxruntime` (extra `cpu`) or `onnxruntime-gpu` (extra `gpu`) is imported only when a session opens.
The provider that really runs is checked, never assumed: ORT silently falls back to the CPU when
its CUDA provider cannot load, and `--device cuda` must not turn into a quiet slowdown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vae_rt.artifacts import inspect_onnx
from vae_rt.backends import BaseBackend, Latents, check_output_shape, empty_images, engine_failure, to_device
from vae_rt.capabilities import CPU_EP, CUDA_EP, available_providers
from vae_rt.errors import UserError, require
from vae_rt.model import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from vae_rt.overflow import onnx_radius


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
        if self.device == "cpu":
            self.finite_radius = onnx_radius(self.onnx_path, self.precision)

    def _close(self) -> None:
        self._session = None

    def _decode(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        if self.device == "cpu" and out is None:
            host_z = z if isinstance(z, np.ndarray) else z.cpu().numpy()
            try:
                (images,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: host_z})
            except Exception as err:
                raise engine_failure(self.describe(), err) from err
            check_output_shape(self.describe, len(host_z), self.x_dim, images.shape)
            return torch.from_numpy(images.reshape(len(images), *IMAGE_SHAPE))
        return self._decode_bound(z, out)

    def _decode_bound(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        """IOBinding: ORT reads z from and writes images into torch memory directly (CUDA, or `out` on the CPU)."""
        z = to_device(z, self.device).contiguous()
        images = out if out is not None else empty_images(len(z), self.device)
        index = z.device.index or 0
        binding = self._session.io_binding()
        binding.bind_input(INPUT_NAME, self.device, index, np.float32, tuple(z.shape), z.data_ptr())
        binding.bind_output(OUTPUT_NAME, self.device, index, np.float32, (len(z), self.x_dim), images.data_ptr())
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()  # z must be in place before ORT's own stream reads it
        try:
            self._session.run_with_iobinding(binding)
        except Exception as err:
            raise engine_failure(self.describe(), err) from err
        binding.synchronize_outputs()  # images are complete before torch reads them
        return images


def create(onnx_path: Path, precision: str | None = None, device: str = "auto", **options: int) -> OrtBackend:
    return OrtBackend(onnx_path, precision, device, **options)
