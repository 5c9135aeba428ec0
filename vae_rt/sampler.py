"""One sampling API over every backend: `open_sampler(...)` -> `sample(n, seed)` / `decode(z)`.

Latents are drawn on the host from a seeded `torch.Generator` in fixed blocks, so a seed gives the
same z whatever the backend, the batch size or n (`sample(1000)` is the first 1000 rows of
`sample(4096)`): outputs are comparable across backends. Which backend serves a model is
`resolve.py`'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vae_rt.backends import BaseBackend, check_out, chunk_bounds, empty_images, latent_rows
from vae_rt.errors import UserError
from vae_rt.files import block_aligned_empty
from vae_rt.limits import MAX_BATCH, check_integer, check_seed
from vae_rt.model import IMAGE_SHAPE
from vae_rt.resolve import resolve_backend

log = logging.getLogger(__name__)

LATENT_BLOCK = 4096  # rows drawn per generator call; fixed, so z never depends on the batch size
DEFAULT_BATCH = {"cpu": 2048, "cuda": 65536}  # CPU: measured best across engines (docs/benchmarks.md); GPU: the engine profile's max


class Sampler:
    """A backend plus the batching and seeded latents around it; close it, or use `with`."""

    def __init__(self, backend: BaseBackend, batch_size: int | None = None, chosen_because: str | None = None):
        self.chosen_because = chosen_because  # why backend="auto" picked this backend
        self.batch_size = check_integer("batch_size", DEFAULT_BATCH[backend.device] if batch_size is None else batch_size, 1, MAX_BATCH)
        self.backend = backend.open()

    @property
    def z_dim(self) -> int:
        return self.backend.z_dim

    def describe(self) -> str:
        return self.backend.describe()

    def decode(self, z: torch.Tensor | np.ndarray, out: torch.Tensor | None = None, check_inputs: bool = True) -> torch.Tensor:
        """float32 [B, z_dim] -> float32 [B, 1, 28, 28] in [0, 1] on the backend's device, in batches.

        `out`, when given, receives the images (contiguous, on the backend's device). A batch that
        runs out of device memory is split in halves and retried (with a warning), and the smaller
        batch size is kept for the calls that follow. `check_inputs=False` is for latents drawn here.
        """
        rows = latent_rows(z)
        while True:
            try:
                if rows <= self.batch_size:
                    return self.backend.decode(z, out, check_inputs)
                if out is not None:
                    check_out(out, rows, self.backend.device)  # the backend sees only slices of it
                images = out if out is not None else empty_images(rows, self.backend.device)
                for a, b in chunk_bounds(rows, self.batch_size):
                    self.backend.decode(z[a:b], images[a:b], check_inputs)  # straight into place: no concatenation
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
        (z,) = latent_batches(n, self.z_dim, seed, n)  # all n at once: `decode` chunks them straight into one result
        return self.decode(z, check_inputs=False)

    def iter_samples(self, n: int, seed: int = 0, reuse: int = 0) -> Iterator[torch.Tensor]:
        """The images of `sample(n, seed)` one batch at a time, so n can exceed memory.

        With `reuse=k`, batches are decoded into a ring of k buffers allocated once, and each yielded
        tensor is overwritten k batches later: for a consumer (a writer) that is done with a batch by
        then. Fresh multi-MB allocations cost page faults on every batch; the ring costs none. On the
        host the buffers are block-aligned, so an O_DIRECT writer takes them without a copy.
        """
        ring = [self._ring_buffer() for _ in range(reuse)]
        for index, z in enumerate(latent_batches(n, self.z_dim, seed, self.batch_size)):
            yield self.decode(z, ring[index % reuse][: len(z)] if ring else None, check_inputs=False)

    def _ring_buffer(self) -> torch.Tensor:
        if self.backend.device == "cpu":
            return block_aligned_empty((self.batch_size, *IMAGE_SHAPE), torch.float32)
        return empty_images(self.batch_size, self.backend.device)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OOM, or a backend's allocation failure worded the CUDA way."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def latent_batches(n: int, z_dim: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """float32 [<= batch_size, z_dim] batches of the seed's latent stream, n rows in all."""
    n = check_integer("n", n, 1)
    generator = torch.Generator().manual_seed(check_seed(seed))
    pending = torch.empty(0, z_dim)
    for start, stop in chunk_bounds(n, batch_size):
        need = stop - start
        blocks, have = [pending], len(pending)
        while have < need:
            blocks.append(torch.randn(LATENT_BLOCK, z_dim, generator=generator))
            have += LATENT_BLOCK
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
        batch_size: rows per engine call (default per device).
    Raises:
        UserError: unknown option, missing file or dependency, a combination that cannot run here.
    """
    serving = batch_size or DEFAULT_BATCH["cuda"]  # what a trt engine built now is tuned for (trt runs on CUDA only)
    chosen, why = resolve_backend(model, backend, precision, device, cuda_graphs, serving)
    return Sampler(chosen, batch_size, why)


def manifold_latents(grid: int, z_dim: int) -> torch.Tensor:
    """float32 [grid * grid, 2]: the plane at the standard normal's quantiles (5%..95%), rows top to bottom."""
    if z_dim != 2:
        raise UserError(f"the manifold picture needs a 2-D latent space; this model has z_dim={z_dim}")
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, grid))
    z1, z0 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")
    return torch.stack([z0.flatten(), z1.flatten()], dim=1)
