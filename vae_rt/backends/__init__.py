"""Inference backends behind one small protocol: `open()`, `decode(z)`, `close()`, and `with backend:`.

At the boundary everything is float32 torch: latents `[B, z_dim]` in (numpy accepted), images
`[B, 1, 28, 28]` in [0, 1] out, left on the backend's device. Reduced precision stays inside the
model or engine. Heavy dependencies are imported by the backend module that needs them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from vae_rt.errors import OutputOverflow, RuntimeFailure, UserError
from vae_rt.model import IMAGE_SHAPE
from vae_rt.overflow import UNCERTIFIED

BACKENDS = {"torch": "pt", "ort": "ort", "trt": "trt", "openvino": "openvino"}  # public name -> module in this package
BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEVICES = ("auto", "cpu", "cuda")
OPENVINO_ONNX_FOR_PRECISION = {"fp32": "fp32", "bf16": "fp32", "int8": "int8"}  # openvino's precision -> the file it runs
SMALL_CHECK = 64  # values up to which a Python loop takes the latents' extent quicker than numpy (docs/benchmarks.md)
Latents = np.ndarray | torch.Tensor  # latents at the engine: numpy in host memory, a tensor on a GPU


class BaseBackend:
    """State checks and the I/O contract; subclasses write `_open`, `_decode` and `_close`.

    Construction only records what to load; resources are acquired in `open()` and freed in `close()`.
    """

    name = "base"

    def __init__(self, precision: str, device: str):
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.device = resolve_device(device)
        self.z_dim = 0  # known once open() has read the model
        self.is_open = False
        # Latents with every |z_i| within it cannot overflow (vae_rt.overflow): their images are not scanned.
        # Set by `_open` of a backend that runs on the host from weights it can read.
        self.finite_radius = UNCERTIFIED

    def describe(self) -> str:
        """What really runs, e.g. 'ort fp32 on CPUExecutionProvider'."""
        return f"{self.name} {self.precision} on {self.device}"

    def engines(self) -> list[BaseBackend]:
        """The engines that decode for it, each in its own precision: itself (auto: those it holds)."""
        return [self]

    def open(self) -> BaseBackend:
        if not self.is_open:
            self._open()
            self.is_open = True
        return self

    def close(self) -> None:
        if self.is_open:
            self._close()
            self.is_open = False

    def __enter__(self) -> BaseBackend:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, z: torch.Tensor | np.ndarray, out: torch.Tensor | None = None, check_inputs: bool = True) -> torch.Tensor:
        """Decode latents into images.

        Args:
            z: float32 `[B, z_dim]`, finite (a numpy array is taken without a copy).
            out: optional float32 `[B, 1, 28, 28]` contiguous tensor on the backend's device to write
                into (a slice of a larger result: no copy, no concatenation afterwards).
            check_inputs: False skips the checks of `z`, for latents the caller drew itself.
        Returns:
            float32 `[B, 1, 28, 28]` in [0, 1] on the backend's device (`out` when given); a buffer the
            backend may reuse is never returned, so the result stays valid after the next call.
        Raises:
            UserError: wrong shape, dtype or non-finite latents; an `out` of the wrong shape, dtype or
                device, or not contiguous. RuntimeError: not opened.
            RuntimeFailure (OutputOverflow for latents beyond the radius): output with NaN/Inf (scanned for unless the latents lie within `finite_radius`),
                or of another shape than the model declares.
        """
        if not self.is_open:
            raise not_open(self.name)
        if check_inputs:
            latents, extent = check_latents(z, self.z_dim)
        else:  # read only where a radius could certify them: reading latents on a GPU waits for it
            latents = engine_latents(z)
            extent = latent_extent(latents) if self.finite_radius > UNCERTIFIED else math.inf
        if out is not None:  # always: an engine writes through its raw pointer
            check_out(out, latents.shape[0], self.device)
        images = self._decode(latents, out)
        if not extent <= self.finite_radius and not all_finite(images):  # a NaN extent is never within
            if self.finite_radius > UNCERTIFIED:  # then some latent lies beyond the radius: the latents' fault
                raise OutputOverflow(f"{self.describe()}: output has NaN/Inf (latents beyond |z_i| <= {self.finite_radius:.3g}, where it cannot overflow)")
            raise RuntimeFailure(f"{self.describe()}: output has NaN/Inf (the model's weights or precision overflow)")
        return images

    def _open(self) -> None:
        raise NotImplementedError

    def _decode(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        """Checked latents (numpy on the host, a tensor on a GPU) -> float32 [B, 1, 28, 28] on the backend's device.

        Writes into `out` when given. Each backend shapes its output the cheapest way it can: at
        batch 1 even a `view` shows.
        """
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def not_open(backend: str) -> RuntimeError:
    """decode() on a backend never opened, or closed since (a sampler used after its `with` block)."""
    return RuntimeError(f"{backend} backend is not open: decode() runs between open() and close(), or inside its `with` block")


def engine_failure(engine: str, err: Exception) -> RuntimeFailure:
    """An engine's own error during a run (a graph that computes another shape than it declares, say;
    ONNX Runtime and OpenVINO raise their own types) as one line. Raised from a plain try/except
    around each engine call: no cost unless it fails (docs/benchmarks.md)."""
    return RuntimeFailure(f"{engine} failed: {' '.join(str(err).split())[:400]}")


def check_output_shape(describe: Callable[[], str], rows: int, x_dim: int, shape: tuple[int, ...]) -> None:
    """Refuse an output that is not [rows, x_dim]: a graph that computes other than its declared shape."""
    if tuple(shape) != (rows, x_dim):
        raise RuntimeFailure(f"{describe()}: {rows} latents gave output {list(shape)}, not [B, {x_dim}]")


def latent_rows(z: object) -> int:
    """How many latents `z` holds; 0 for what is not an array or is 0-d, which `check_latents` then names."""
    return z.shape[0] if getattr(z, "ndim", 0) else 0


def all_finite(images: torch.Tensor) -> bool:
    """Whether no value is NaN/Inf. Host memory is checked by numpy on this thread: torch's check would
    wake its own thread pool, which then fights ONNX Runtime's for the cores (docs/benchmarks.md)."""
    if not images.is_cpu:
        return bool(torch.isfinite(images).all())
    return bool(np.isfinite(images.numpy()).all())


def latent_extent(z: Latents) -> float:
    """An upper bound of the largest |z_i|, NaN or inf if one is: the sum of |z_i| for a few values (a
    loop is quicker than numpy's call), the largest for more. One pass for the finiteness check and the
    overflow-free radius, as each pass costs twice as much right after an engine call (docs/benchmarks.md)."""
    if isinstance(z, torch.Tensor):  # on a GPU
        return float(z.abs().max())
    if z.size <= SMALL_CHECK:
        return sum(map(abs, z.ravel().tolist()))
    return float(np.abs(z).max())


def engine_latents(z: torch.Tensor | np.ndarray) -> Latents:
    """Latents as engines take them: host memory as a numpy array (a float32 tensor's memory, not a copy),
    GPU ones as the tensor. `numpy(force=True)` detaches a tensor that requires grad, and is quicker
    than a `detach()` that makes a tensor on every call (docs/benchmarks.md)."""
    if isinstance(z, torch.Tensor):
        return z.numpy(force=True) if z.is_cpu else z.detach()
    return z


def check_latents(z: Any, z_dim: int) -> tuple[Latents, float]:
    """The latents as engines take them, checked (float32 `[B, z_dim]`, finite; else a one-line UserError),
    and their `latent_extent`."""
    if isinstance(z, torch.Tensor):
        if z.dtype != torch.float32:  # before anything converts them (a complex conjugate view included)
            raise UserError(f"latents must be float32, got {z.dtype}")
        if z.layout != torch.strided or z.is_meta:
            raise UserError(f"latents must be a dense float32 tensor with data, got layout {z.layout} on {z.device}")
        z = engine_latents(z)
    elif not isinstance(z, np.ndarray):
        raise UserError(f"latents must be a torch tensor or numpy array, got {type(z).__name__}")
    elif z.dtype != np.float32:
        raise UserError(f"latents must be float32, got {z.dtype}")
    if z.ndim != 2 or z.shape[1] != z_dim or z.shape[0] == 0:
        raise UserError(f"latents must have shape [B, {z_dim}] with B >= 1, got {list(z.shape)}")
    extent = latent_extent(z)
    if not math.isfinite(extent):
        raise UserError("latents contain NaN or Inf")
    return z, extent


def check_out(out: Any, rows: int, device: str) -> None:
    """Refuse an `out` no engine could write into safely: ORT and TensorRT write through its raw pointer,
    so a wrong size would corrupt memory and a wrong dtype would be filled with bytes of another type."""
    if not isinstance(out, torch.Tensor):
        raise UserError(f"out must be a torch tensor, got {type(out).__name__}")
    problems = []
    if tuple(out.shape) != (rows, *IMAGE_SHAPE):
        problems.append(f"shape {list(out.shape)}, needed {[rows, *IMAGE_SHAPE]}")
    if out.dtype != torch.float32:
        problems.append(f"dtype {out.dtype}, needed torch.float32")
    if out.device.type != device:
        problems.append(f"device {out.device}, needed {device}")
    if not out.is_contiguous():
        problems.append("a non-contiguous layout")
    if out.requires_grad:
        problems.append("requires_grad=True")
    if problems:
        raise UserError("out has " + "; ".join(problems))


def empty_images(rows: int, device: str) -> torch.Tensor:
    """Uninitialised float32 `[rows, 1, 28, 28]` on `device`. On the host numpy's memory: its allocator
    asks for huge pages, where a torch.empty above glibc's 32 MB reuse limit page-faults 4 KB at a time
    on every call (docs/benchmarks.md)."""
    if device == "cpu":
        return torch.from_numpy(np.empty((rows, *IMAGE_SHAPE), np.float32))
    return torch.empty((rows, *IMAGE_SHAPE), dtype=torch.float32, device=device)


def to_device(z: Latents, device: str) -> torch.Tensor:
    """Latents as a tensor on `device`; host memory is shared, not copied, where torch can share it."""
    if isinstance(z, np.ndarray):
        if not (z.flags.c_contiguous and z.flags.writeable):
            z = z.copy()  # torch cannot wrap negative strides, and warns on read-only memory
        z = torch.from_numpy(z)
    return z.to(device, non_blocking=device != "cpu")  # a copy to the host must be complete before it is read


def get_backend(name: str, **kwargs: Any) -> BaseBackend:
    """Construct backend `name` (a key of BACKENDS); its optional dependency is imported only now."""
    check_choice("backend", name, tuple(BACKENDS))
    module = importlib.import_module(f"vae_rt.backends.{BACKENDS[name]}")
    return module.create(**kwargs)


def check_choice(parameter: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"{parameter} must be one of {', '.join(choices)}, got {value!r}")
    return value


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without one is a usage error."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: torch sees no CUDA GPU on this machine (use device cpu)")
    return device


def chunk_bounds(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in pieces of at most `size` rows, made as they are used (n may be huge)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    return ((start, min(start + size, n)) for start in range(0, n, size))
