"""The TensorRT backend: a cached engine (fp16 or strict fp32) on torch CUDA tensors, split at the profile max.

Written from TensorRT 10/11's documented Python API; the logic around the calls (chunking, manifest
checks, error messages) is plain code tested on the CPU. Needs `tensorrt` (extra `gpu`) and a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vae_rt.artifacts import platform_mismatch, read_manifest
from vae_rt.backends import BaseBackend, Latents, chunk_bounds, empty_images, to_device
from vae_rt.backends.graphs import CaptureFailed, GraphCache, capture_graph
from vae_rt.capabilities import current_platform, last_message, process_logger
from vae_rt.errors import RuntimeFailure, UserError, require
from vae_rt.model import INPUT_NAME, OUTPUT_NAME, X_DIM


class EngineError(UserError):
    """The plan is missing, corrupt, or was built for another TensorRT version or GPU."""


def io_dtypes(engine: Any, trt: Any) -> tuple[torch.dtype, torch.dtype]:
    """The torch dtypes of the plan's input and output: vae-rt's plans have float32 I/O, a foreign one may not.

    Raises:
        EngineError: the plan's I/O tensors are not vae-rt's, or of a type the buffers cannot take.
    """
    names = sorted(engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
    if names != sorted((INPUT_NAME, OUTPUT_NAME)):
        raise EngineError(f"has I/O tensors {names}; expected '{INPUT_NAME}' and '{OUTPUT_NAME}'")
    torch_dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}
    dtypes = [engine.get_tensor_dtype(name) for name in (INPUT_NAME, OUTPUT_NAME)]
    for name, dtype in zip((INPUT_NAME, OUTPUT_NAME), dtypes):
        if dtype not in torch_dtypes:
            raise EngineError(f"its '{name}' tensor is {dtype}; vae-rt reads float32, float16 or bfloat16")
    return torch_dtypes[dtypes[0]], torch_dtypes[dtypes[1]]


class TrtBackend(BaseBackend):
    """One execution context on a private stream; inputs and outputs go through static, aligned buffers.

    TensorRT needs 256-byte aligned addresses, and a slice of a caller's tensor need not be one, so
    each chunk is copied into buffers allocated once at the profile's max batch, in the plan's own
    I/O dtypes (the copies convert).
    """

    name = "trt"

    def __init__(self, engine_path: Path, device: str = "cuda", cuda_graphs: bool = False):
        if device == "cpu":
            raise UserError("--backend trt runs on CUDA only; use --backend torch or ort for the CPU")
        self.engine_path = Path(engine_path)
        manifest = read_manifest(self.engine_path) or {}
        super().__init__(manifest.get("spec", {}).get("precision", "fp16"), "cuda")
        self.manifest = manifest
        self.use_graphs = cuda_graphs
        self.max_batch = 0
        self._graphs: GraphCache[torch.cuda.CUDAGraph] = GraphCache(self._capture)

    def describe(self) -> str:
        return f"trt {self.precision} on cuda ({self.engine_path.name})"

    def _open(self) -> None:
        trt = require("tensorrt", extra="gpu")
        if not self.engine_path.is_file():
            raise EngineError(f"{self.engine_path}: no such engine file (build one with `vae-rt export`)")
        reason = platform_mismatch(self.manifest or None, current_platform())
        if reason:
            raise EngineError(f"{self.engine_path}: {reason}")
        logger = process_logger(trt)
        with logger.collect() as messages:
            self._runtime = trt.Runtime(logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:  # TensorRT says why only through its logger
            raise EngineError(f"{self.engine_path}: TensorRT cannot load it: {last_message(messages)}")
        try:
            z_dtype, image_dtype = io_dtypes(self._engine, trt)
        except EngineError as error:
            raise EngineError(f"{self.engine_path}: {error}") from None
        self._context = self._engine.create_execution_context()
        _, _, max_shape = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch, self.z_dim = int(max_shape[0]), int(max_shape[1])
        x_dim = int(self._engine.get_tensor_shape(OUTPUT_NAME)[1])
        if x_dim != X_DIM:  # the output is copied into [B, 1, 28, 28] images: any other size would smear them
            raise EngineError(f"{self.engine_path}: its '{OUTPUT_NAME}' has {x_dim} values per image, needed {X_DIM}")
        self._stream = torch.cuda.Stream()  # not the legacy default stream: TensorRT would sync the device
        self._z = torch.empty((self.max_batch, self.z_dim), dtype=z_dtype, device="cuda")
        self._images = torch.empty((self.max_batch, x_dim), dtype=image_dtype, device="cuda")
        self._context.set_tensor_address(INPUT_NAME, self._z.data_ptr())
        self._context.set_tensor_address(OUTPUT_NAME, self._images.data_ptr())
        self._bound_batch = 0

    def _close(self) -> None:
        self._graphs.clear()
        self._context = self._engine = self._runtime = None
        self._z = self._images = None

    def _decode(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        z = to_device(z, "cuda")
        images = out if out is not None else empty_images(len(z), "cuda")
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for start, stop in chunk_bounds(len(z), self.max_batch):
                batch = stop - start
                self._z[:batch].copy_(z[start:stop])
                self._run(batch)
                images[start:stop].view(batch, -1).copy_(self._images[:batch])
        self._stream.synchronize()
        return images

    def _run(self, batch: int) -> None:
        if batch != self._bound_batch:
            if not self._context.set_input_shape(INPUT_NAME, (batch, self.z_dim)):
                raise RuntimeFailure(f"TensorRT refused batch {batch} (profile max {self.max_batch})")
            self._bound_batch = batch
        graph = self._graphs.get(batch) if self.use_graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._execute(batch)

    def _execute(self, batch: int) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeFailure(f"TensorRT execution failed at batch {batch}")

    def _capture(self, batch: int) -> torch.cuda.CUDAGraph:
        """A graph of one execution at `batch` (the shape just set); run eagerly first, so one-time setup is not captured."""
        self._execute(batch)
        self._stream.synchronize()

        def record() -> None:
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise CaptureFailed(f"TensorRT could not enqueue batch {batch} into a CUDA graph")

        return capture_graph(record, self._stream)[0]


def create(engine_path: Path, precision: str | None = None, device: str = "cuda", **options: bool) -> TrtBackend:
    backend = TrtBackend(engine_path, device, **options)
    if precision is not None and precision != backend.precision:
        raise UserError(f"{engine_path} is an {backend.precision} engine, not {precision}")
    return backend
