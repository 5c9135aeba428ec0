"""Test-set scores of a trained VAE: the ELBO loss per image and the importance-weighted -log p(x)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vae_rt.errors import RuntimeFailure
from vae_rt.model import VAE, elbo_loss, importance_weighted_nll, reparameterize


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784] in [0, 1] (not binarised, as in the tutorial)."""
    return images.reshape(images.shape[0], -1).float().div_(255)


Decode = Callable[[torch.Tensor], torch.Tensor]  # float32 [B, z_dim] -> images [B, 784] or [B, 1, 28, 28]


@torch.no_grad()
def test_loss(model: VAE, pixels: torch.Tensor, batch_size: int = 1000, seed: int = 0, decode: Decode | None = None) -> float:
    """Mean negative ELBO per image (summed over the set, divided by its size, like the tutorial).

    `decode` stands in for the model's own decoder (a backend in another precision): the encoder and
    the seeded noise stay the model's, so two decoders are scored on the very same latents.
    """
    decode = decode or model.decode
    torch.manual_seed(seed)  # the reparameterisation noise, so the same model scores the same
    total = 0.0
    for start in range(0, len(pixels), batch_size):
        x = pixels[start : start + batch_size]
        mu, log_var = model.encode(x)
        recon = decode(reparameterize(mu, log_var)).reshape(x.shape).to(x.device)
        if not bool(torch.isfinite(recon).all()):  # a backend's decode checks this itself; the model's own does not
            raise RuntimeFailure("the decoder gives NaN/Inf images for test latents: its weights overflow")
        total += elbo_loss(recon, x, mu, log_var).item()
    return total / len(pixels)


@torch.no_grad()
def iw_nll(
    model: VAE, pixels: torch.Tensor, k: int, batch_size: int = 100, seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Mean importance-weighted estimate of -log p(x) with k samples per image (nats).

    `on_batch(images)` is called after each batch of images is scored (a progress bar).
    """
    torch.manual_seed(seed)
    total = 0.0
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        total += importance_weighted_nll(model, batch, k).sum().item()
        if on_batch:
            on_batch(len(batch))
    if not math.isfinite(total):
        raise RuntimeFailure("the importance-weighted estimate is NaN/Inf: the model's weights overflow")
    return total / len(pixels)
