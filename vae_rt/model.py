"""The fully-connected MNIST VAE of the PyTorch tutorial, its ELBO loss, and its decoder alone.

Parameter names (`fc1 ... fc6`) are the tutorial's, so its plain `state_dict` files load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

INPUT_NAME = "z"  # decoder input in ONNX / TensorRT
OUTPUT_NAME = "image"  # decoder output in ONNX / TensorRT
IMAGE_SHAPE = (1, 28, 28)
X_DIM = 784  # pixels of an MNIST image: every model vae-rt loads, exports or serves has this x_dim


@dataclass(frozen=True)
class VAEConfig:
    """Layer widths: x -> h1 -> h2 -> z and back."""

    x_dim: int = 784
    h1_dim: int = 512
    h2_dim: int = 256
    z_dim: int = 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def decoder_flop_per_sample(self) -> int:
        """FLOP of one decoded sample, a multiply-add counted as 2 (biases and activations ignored)."""
        return 2 * (self.z_dim * self.h2_dim + self.h2_dim * self.h1_dim + self.h1_dim * self.x_dim)


class Decoder(nn.Module):
    """z [B, z_dim] float -> pixel probabilities [B, x_dim]: the one definition of the decoder's computation.

    Linear layers with ReLU between them and a sigmoid after the last; it shares its layers with the
    VAE it came from. Backends, the exporter and the fp16 range check all go through this module.
    """

    def __init__(self, fc4: nn.Linear, fc5: nn.Linear, fc6: nn.Linear):
        super().__init__()
        self.fc4, self.fc5, self.fc6 = fc4, fc5, fc6

    @property
    def layers(self) -> tuple[nn.Linear, ...]:
        return (self.fc4, self.fc5, self.fc6)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid output: what a BCE computed from logits needs (exact where the sigmoid saturates)."""
        return self.pre_activations(z)[-1]

    def pre_activations(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output before its activation, first to last (the last one is the logits).

        Each layer's input is cast to that layer's dtype, so a decoder from `in_precision` runs as is.
        """
        outputs: list[torch.Tensor] = []
        h = z
        for layer in self.layers:
            h = F.relu(h) if outputs else h
            if h.dtype != layer.weight.dtype:  # no Cast node in an fp32 export
                h = h.to(layer.weight.dtype)
            h = layer(h)
            outputs.append(h)
        return outputs

    def in_precision(self, dtype: torch.dtype) -> Decoder:
        """This decoder with every layer but the first cast to `dtype` in place (like `Module.to`; the
        layers are its VAE's too, so cast a copy or a decoder whose VAE is not used again).

        The first layer (0.1 % of the FLOPs) stays float32: z is a coordinate in a small latent space
        that the decoder maps steeply, and rounding z alone to fp16 moves pixels by up to 4e-3
        (docs/quality.md), most of a reduced-precision decoder's error.
        """
        for layer in self.layers[1:]:
            layer.to(dtype)
        return self


class VAE(nn.Module):
    """The tutorial's VAE: `forward(x)` returns (reconstruction, mu, log_var)."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        c = config
        self.fc1 = nn.Linear(c.x_dim, c.h1_dim)
        self.fc2 = nn.Linear(c.h1_dim, c.h2_dim)
        self.fc31 = nn.Linear(c.h2_dim, c.z_dim)
        self.fc32 = nn.Linear(c.h2_dim, c.z_dim)
        self.fc4 = nn.Linear(c.z_dim, c.h2_dim)
        self.fc5 = nn.Linear(c.h2_dim, c.h1_dim)
        self.fc6 = nn.Linear(c.h1_dim, c.x_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.fc31(h), self.fc32(h)

    def decoder(self) -> Decoder:
        return Decoder(self.fc4, self.fc5, self.fc6)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder()(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, log_var = self.encode(x.view(-1, self.config.x_dim))
        return self.decode(reparameterize(mu, log_var)), mu, log_var


def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from q(z|x) = N(mu, exp(log_var)), from `generator` (torch's global one when None)."""
    noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + noise * torch.exp(0.5 * log_var)


def elbo_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Negative ELBO summed over the batch: BCE(sum) + KL(q(z|x) || N(0, I)), as in the tutorial."""
    bce = F.binary_cross_entropy(recon, x.view(recon.shape), reduction="sum")
    kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
    return bce + kld


def importance_weighted_nll(model: VAE, x: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
    """-log p(x) per image, estimated from k importance samples (Burda et al.'s bound).

    Args:
        x: float images [B, x_dim] in [0, 1].
        k: importance samples per image; drawn `chunk` at a time so k=1000 fits in memory.
    Returns:
        float64 [B]: the estimate of -log p(x) in nats.
    """
    mu, log_var = model.encode(x)
    decoder = model.decoder()
    std = torch.exp(0.5 * log_var)
    log_weights = []
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, dtype=mu.dtype)
        z = mu + eps * std  # [k, B, z]
        logits = decoder.logits(z)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_qz_x = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + log_var).sum(-1)
        log_weights.append((log_px_z + log_pz - log_qz_x).double())
    return math.log(k) - torch.logsumexp(torch.cat(log_weights), dim=0)
