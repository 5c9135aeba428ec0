"""Parity report across backends (Polygraphy-style): each backend/precision against torch fp32, same latents.

Beside the pixel errors, each pair's quality gate (`vae_rt.quality`) when test images are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vae_rt.backends import resolve_device
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.limits import MAX_COMPARE_COUNT, check_between
from vae_rt.parity import ParityReport, compare, tail_latents
from vae_rt.quality import QualityGate, quality_gate
from vae_rt.resolve import artifact_kind
from vae_rt.sampler import draw_latents, open_sampler


@dataclass(frozen=True)
class Comparison:
    backend: str
    precision: str
    runs_on: str = ""
    report: ParityReport | None = None
    skipped: str | None = None  # why this pair could not run here
    quality: QualityGate | None = None
    failed: str | None = None  # why this pair failed before a report: an export that fails its checks, NaN output, ...

    @property
    def passed(self) -> bool:
        return self.failed is None and bool(self.report) and (self.quality is None or self.quality.passed)


def run_comparisons(
    model: Path | None, backends: list[str], precisions: list[str], device: str, n: int, seed: int,
    test_pixels: torch.Tensor | None = None,
) -> list[Comparison]:
    """Decode n seeded normal latents plus the tail points on every pair that can run here.

    With `test_pixels` (float32 [N, 784], `evaluate.to_pixels`), each pair's quality gate too.
    """
    resolve_device(device)  # --device cuda without a GPU: an error, as in every command, not a report of skipped rows
    check_between("n", n, 1, MAX_COMPARE_COUNT)
    checkpoint = Path(model) if model is not None else BUNDLED_CHECKPOINT
    if artifact_kind(checkpoint) != "checkpoint":
        raise UserError(f"compare needs a checkpoint (.pth) for its torch fp32 reference, got {checkpoint}")
    reference_model, _ = load_checkpoint(checkpoint)
    z_dim = reference_model.config.z_dim
    latents = torch.cat([draw_latents(n, z_dim, seed), tail_latents(z_dim)])
    with torch.no_grad():
        reference = reference_model.decode(latents)
    results = []
    for backend in backends:
        for precision in precisions:
            try:
                with open_sampler(checkpoint, backend, precision, device) as sampler:
                    images = sampler.decode(latents)
                    runs_on = sampler.describe()
                    quality = None if test_pixels is None else quality_gate(reference_model, sampler.decode, precision, test_pixels)
            except UserError as error:
                results.append(Comparison(backend, precision, skipped=str(error)))
                continue
            except RuntimeFailure as error:  # e.g. an int8 export that fails its gate, NaN output: a FAIL row, not the end
                results.append(Comparison(backend, precision, failed=str(error)))
                continue
            results.append(Comparison(backend, precision, runs_on, compare(reference, images, precision), quality=quality))
    return results
