"""The quality gate of a reduced-precision decoder: the model's own test loss, not pixel error.

A generative model is judged by what it scores: the negative ELBO per test image with the fp32
encoder and the same seeded noise, once through the fp32 decoder and once through the candidate.
Max abs error says little here (bf16 is off by 0.04 in a pixel and +0.01 nats in the loss, while a
decoder that rounds one confident pixel to exactly 0 is off by 1e-7 and costs tens of nats).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vae_rt.evaluate import Decode, test_loss
from vae_rt.model import VAE

QUALITY_METRIC = "test_loss_nats"
QUALITY_LIMITS = {"fp16": 0.05, "bf16": 0.05, "int8": 0.5}  # nats per image above fp32, at most; fp32: none


@dataclass(frozen=True)
class QualityGate:
    """Truthy when the candidate's test loss is within `limit` of fp32's (always, without a limit)."""

    metric: str
    precision: str
    fp32: float
    this: float
    delta: float
    limit: float | None
    passed: bool
    images: int
    seed: int

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        limit = f"limit +{self.limit:g}, " if self.limit is not None else ""
        return (
            f"{verdict} {self.precision} test loss {self.this:.3f} vs fp32 {self.fp32:.3f}: "
            f"{self.delta:+.3f} nats ({limit}{self.images} test images)"
        )


def quality_gate(model: VAE, decode: Decode, precision: str, pixels: torch.Tensor, seed: int = 0) -> QualityGate:
    """Score `decode` (the decoder in `precision`) against `model`'s fp32 decoder on the same latents.

    Args:
        model: the fp32 VAE: its encoder draws the latents, its decoder is the reference.
        decode: float32 [B, z_dim] -> images [B, 784] or [B, 1, 28, 28] in [0, 1] (e.g. `Sampler.decode`,
            whose backends refuse NaN/Inf output with a RuntimeFailure).
        precision: its limit is QUALITY_LIMITS' (fp32 has none: it is held to max-abs parity).
        pixels: float32 [N, 784] in [0, 1], the MNIST test set (`evaluate.to_pixels`).
    """
    reference = test_loss(model, pixels, seed=seed)
    candidate = test_loss(model, pixels, seed=seed, decode=decode)
    limit = QUALITY_LIMITS.get(precision)
    delta = candidate - reference
    return QualityGate(
        metric=QUALITY_METRIC, precision=precision, fp32=reference, this=candidate, delta=delta, limit=limit,
        passed=limit is None or delta <= limit, images=len(pixels), seed=seed,
    )
