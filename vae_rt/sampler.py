"""One sampling API over every backend: `open_sampler(...)` -> `sample(n, seed)` / `decode(z)`.

Latents are drawn on the host from a seeded `torch.Generator` in fixed blocks, so a seed gives the
same z whatever the backend, the batch size or n (`sample(1000)` is the first 1000 rows of
`sample(4096)`): outputs are comparable across backends. Artifacts a backend needs (ONNX file,
TensorRT engine) are exported or built once and cached, keyed by the checkpoint's sha256.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vae_rt.backends import DEVICES, PRECISIONS, BaseBackend, check_choice, chunk_bounds, get_backend, resolve_device
from vae_rt.backends.ort import CUDA_EP, available_providers
from vae_rt.checkpoint import BUNDLED_CHECKPOINT
from vae_rt.data import cache_dir
from vae_rt.engine import DEFAULT_MAX_BATCH, build_engine, engine_skip_reason
from vae_rt.errors import UserError
from vae_rt.export import export_onnx, onnx_path_for, read_manifest
from vae_rt.files import block_aligned_empty, sha256_file
from vae_rt.model import IMAGE_SHAPE

log = logging.getLogger(__name__)

LATENT_BLOCK = 4096  # rows drawn per generator call; fixed, so z never depends on the batch size
DEFAULT_BATCH = {"cpu": 1024, "cuda": 65536}  # CPU: activations of 1024 rows stay in cache (measured best); GPU: fills an H100
MAX_BATCH = 1 << 22  # 4M images = 13 GB of float32 output per call: beyond that nothing gets faster
BACKEND_CHOICES = ("auto", "torch", "ort", "trt")
ENGINE_DIR_ENV = "VAE_RT_ENGINE_DIR"


class Sampler:
    """A backend plus the batching and seeded latents around it; close it, or use `with`."""

    def __init__(self, backend: BaseBackend, batch_size: int | None = None, chosen_because: str | None = None):
        self.chosen_because = chosen_because  # why backend="auto" picked this backend
        self.batch_size = batch_size if batch_size is not None else DEFAULT_BATCH[backend.device]
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise UserError(f"--batch-size must be between 1 and {MAX_BATCH}, got {self.batch_size}")
        self.backend = backend.open()

    @property
    def z_dim(self) -> int:
        return self.backend.z_dim

    def describe(self) -> str:
        return self.backend.describe()

    def decode(self, z: torch.Tensor | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [B, z_dim] -> float32 [B, 1, 28, 28] in [0, 1] on the backend's device, in batches.

        `out`, when given, receives the images (contiguous, on the backend's device). A batch that
        runs out of device memory is split in halves and retried (with a warning), and the smaller
        batch size is kept for the calls that follow.
        """
        # Not len(): torch's Tensor.__len__ is Python code (a share of a batch-1 decode) and fails on
        # 0-d input. What is not an array at all counts 0 rows and goes to the backend's check, which names it.
        rows = z.shape[0] if getattr(z, "ndim", 0) else 0
        while True:
            try:
                if rows <= self.batch_size:
                    return self.backend.decode(z, out)
                images = out if out is not None else torch.empty(
                    (rows, *IMAGE_SHAPE), dtype=torch.float32, device=self.backend.device
                )
                for a, b in chunk_bounds(rows, self.batch_size):
                    self.backend.decode(z[a:b], out=images[a:b])  # straight into place: no concatenation
                return images
            except Exception as error:
                if not is_out_of_memory(error) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, min(self.batch_size, rows) // 2)
                log.warning("out of device memory; retrying with batch size %d", self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n images decoded from the seeded latents: float32 [n, 1, 28, 28]."""
        return torch.cat(list(self.iter_samples(n, seed)))

    def iter_samples(self, n: int, seed: int = 0, reuse: int = 0) -> Iterator[torch.Tensor]:
        """The images of `sample(n, seed)` one batch at a time, so n can exceed memory.

        With `reuse=k`, batches are decoded into a ring of k buffers allocated once, and each yielded
        tensor is overwritten k batches later: for a consumer (a writer) that is done with a batch by
        then. Fresh multi-MB allocations cost page faults on every batch; the ring costs none. On the
        host the buffers are block-aligned, so an O_DIRECT writer takes them without a copy.
        """
        ring = [self._ring_buffer() for _ in range(reuse)]
        for index, z in enumerate(latent_batches(n, self.z_dim, seed, self.batch_size)):
            yield self.decode(z, ring[index % reuse][: len(z)] if ring else None)

    def _ring_buffer(self) -> torch.Tensor:
        shape = (self.batch_size, *IMAGE_SHAPE)
        if self.backend.device == "cpu":
            return block_aligned_empty(shape, torch.float32)
        return torch.empty(shape, device=self.backend.device)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OOM, or a backend's allocation failure worded the CUDA way."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def check_count(n: int) -> None:
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")


def latent_batches(n: int, z_dim: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """float32 [<= batch_size, z_dim] batches of the seed's latent stream, n rows in all."""
    check_count(n)
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, z_dim)
    for start, stop in chunk_bounds(n, batch_size):
        need = stop - start
        blocks = [pending]
        while sum(len(b) for b in blocks) < need:
            blocks.append(torch.randn(LATENT_BLOCK, z_dim, generator=generator))
        pending = torch.cat(blocks) if len(blocks) > 1 else pending
        yield pending[:need]
        pending = pending[need:]


def draw_latents(n: int, z_dim: int, seed: int = 0) -> torch.Tensor:
    """The first n latents of the seed's stream, float32 [n, z_dim]."""
    return torch.cat(list(latent_batches(n, z_dim, seed, n)))


def open_sampler(
    model: str | Path | None = None,
    backend: str = "auto",
    precision: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    cuda_graphs: bool = True,
) -> Sampler:
    """Open a sampler on a checkpoint, an ONNX file, a TensorRT plan, or the bundled model (None).

    Args:
        backend: 'torch', 'ort', 'trt', or 'auto' (trt -> ort on CUDA -> torch on CUDA -> fastest CPU path).
        precision: 'fp32', 'fp16' or 'bf16'; None picks the backend's fastest safe choice
            (fp16 on a GPU, fp32 on the CPU, or what an ONNX file/plan holds).
        device: 'auto', 'cpu' or 'cuda'.
    Raises:
        UserError: unknown option, missing file or dependency, a combination that cannot run here.
    """
    check_choice("--backend", backend, BACKEND_CHOICES)
    check_choice("--device", device, DEVICES)
    if precision is not None:
        check_choice("--precision", precision, PRECISIONS)
    path = Path(model) if model is not None else BUNDLED_CHECKPOINT
    kind = artifact_kind(path)
    why = None
    if backend == "auto":
        backend, device, why = choose_backend(kind, precision, device)
        log.info("backend auto: %s", why)
    serving_batch = batch_size or DEFAULT_BATCH["cuda"]  # trt only runs on CUDA
    return Sampler(_create(backend, path, kind, precision, device, cuda_graphs, serving_batch), batch_size, why)


def artifact_kind(path: Path) -> str:
    kinds = {".pth": "checkpoint", ".pt": "checkpoint", ".onnx": "onnx", ".plan": "plan", ".engine": "plan"}
    if path.suffix not in kinds:
        raise UserError(f"--model {path}: unknown kind of file; expected .pth (checkpoint), .onnx or .plan")
    if not path.is_file():
        raise UserError(f"--model {path}: no such file")
    return kinds[path.suffix]


def choose_backend(kind: str, precision: str | None, device: str) -> tuple[str, str, str]:
    """(backend, device, explanation) of the fastest backend that can run `kind` here.

    On the CPU, ONNX Runtime beats torch's eager dispatch at small batches and matches it at large
    ones (see `vae-rt bench`), so it is preferred whenever onnxruntime is installed.
    """
    skipped = []
    gpu = resolve_device(device) == "cuda"  # an explicit 'cuda' without a GPU fails here, never falls back
    if kind == "plan":
        return "trt", "cuda", "a TensorRT plan runs only on trt"
    candidates = []
    no_bf16_onnx = "vae-rt exports ONNX in fp32 and fp16 only" if precision == "bf16" else None
    if gpu:
        trt_reason = engine_skip_reason() or ("trt serves fp16 only" if precision not in (None, "fp16") else None)
        candidates += [("trt", "cuda", trt_reason)]
        ort_reason = None if CUDA_EP in available_providers() else "onnxruntime has no CUDAExecutionProvider"
        candidates += [("ort", "cuda", ort_reason or no_bf16_onnx)]
        candidates += [("torch", "cuda", "an ONNX file cannot run on torch" if kind == "onnx" else None)]
    elif device == "auto":
        skipped.append("GPU backends: torch sees no CUDA GPU")
    cpu_ort_reason = None if available_providers() else "onnxruntime is not installed (pip install 'vae-rt[cpu]')"
    if device != "cuda":  # "auto" falls back to the CPU; an explicit "cuda" never does
        candidates += [("ort", "cpu", cpu_ort_reason or no_bf16_onnx)]
        candidates += [("torch", "cpu", "an ONNX file cannot run on torch" if kind == "onnx" else None)]
    for name, dev, reason in candidates:
        if reason is None:
            because = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            return name, dev, f"chose {name} on {dev}{because}"
        skipped.append(f"{name} on {dev}: {reason}")
    raise UserError("no backend can run this model here: " + "; ".join(skipped))


def _create(
    backend: str, path: Path, kind: str, precision: str | None, device: str, cuda_graphs: bool, serving_batch: int
) -> BaseBackend:
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "torch":
        if kind != "checkpoint":
            raise UserError(f"--backend torch needs a checkpoint (.pth), got {path}")
        return get_backend("torch", checkpoint=path, precision=precision or ("fp16" if on_gpu else "fp32"),
                           device=device, cuda_graphs=cuda_graphs)
    if backend == "ort":
        if kind == "plan":
            raise UserError(f"--backend ort needs a checkpoint or an ONNX file, got the TensorRT plan {path}")
        ort_on_gpu = on_gpu and CUDA_EP in available_providers()
        onnx_path = path if kind == "onnx" else cached_onnx(path, precision or ("fp16" if ort_on_gpu else "fp32"))
        return get_backend("ort", onnx_path=onnx_path, precision=precision, device=device)
    reason = engine_skip_reason()
    if reason:
        raise UserError(f"--backend trt: {reason}")
    engine_path = path if kind == "plan" else cached_engine(path, kind, serving_batch)
    return get_backend("trt", engine_path=engine_path, precision=precision, device=device, cuda_graphs=cuda_graphs)


def cached_onnx(checkpoint: Path, precision: str) -> Path:
    """The ONNX export of `checkpoint`, made once per checkpoint content and precision."""
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--backend ort serves fp32 or fp16 models, not {precision}")
    digest = sha256_file(checkpoint)
    out_dir = cache_dir() / "onnx"
    path = onnx_path_for(out_dir, digest[:16], precision)
    manifest = read_manifest(path)
    if path.is_file() and manifest and manifest.get("source_checkpoint", {}).get("sha256") == digest:
        return path
    log.info("exporting %s to %s (once; cached)", checkpoint, path)
    return export_onnx(checkpoint, out_dir, precision, name=digest[:16]).path


def cached_engine(path: Path, kind: str, serving_batch: int) -> Path:
    """A TensorRT plan for a checkpoint or ONNX file, built once per content, GPU, TensorRT version and batch size.

    The profile's opt batch is the batch that will serve (the backend chunks at the profile max):
    TensorRT picks its kernels for that one size.
    """
    onnx_path = path if kind == "onnx" else cached_onnx(path, "fp16")
    engine_dir = Path(os.environ.get(ENGINE_DIR_ENV) or cache_dir() / "engines")
    opt_batch = min(serving_batch, DEFAULT_MAX_BATCH)
    name = f"{onnx_path.name.removesuffix('.onnx')}.opt{opt_batch}"  # one file per opt batch: no rebuild when sizes alternate
    return build_engine(onnx_path, engine_dir, name, opt_batch, opt_batch_is="the sampler's batch size")[0]


def manifold_latents(grid: int, z_dim: int) -> torch.Tensor:
    """float32 [grid * grid, 2]: the plane at the standard normal's quantiles (5%..95%), rows top to bottom."""
    if z_dim != 2:
        raise UserError(f"the manifold picture needs a 2-D latent space; this model has z_dim={z_dim}")
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, grid))
    z1, z0 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")
    return torch.stack([z0.flatten(), z1.flatten()], dim=1)
