"""The ELBO and its gradients written out by hand: the trainer's step, without an autograd graph.

Six linear layers, ReLU, a sigmoid output and a Gaussian latent have short closed-form gradients.
Computing them directly skips autograd's graph building and bookkeeping, fuses the sigmoid + BCE
gradient into `sigmoid(logits) - x`, and writes every gradient into a buffer reused from step to
step. The numbers equal autograd's to float rounding (tests/test_gradients.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vae_rt.model import VAE


@torch.no_grad()
def elbo_backward(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The negative ELBO of `x` summed over the batch; every parameter's `.grad` is set to its gradient.

    Args:
        x: float32 images [B, x_dim] in [0, 1].
        eps: the reparameterisation noise [B, z_dim] (z = mu + eps * std).
    Returns:
        the loss as a 0-d tensor: the tutorial's `elbo_loss`, with BCE computed from the logits.
    """
    m = model
    h1 = _linear(m.fc1, x).relu_()
    h2 = _linear(m.fc2, h1).relu_()
    mu, log_var = _linear(m.fc31, h2), _linear(m.fc32, h2)
    std = log_var.mul(0.5).exp_()
    z = torch.addcmul(mu, eps, std)
    h4 = _linear(m.fc4, z).relu_()
    h5 = _linear(m.fc5, h4).relu_()
    logits = _linear(m.fc6, h5)
    var = std * std
    kld = 0.5 * (mu * mu + var - log_var - 1).sum()
    loss = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") + kld

    grad = torch.sigmoid(logits).sub_(x)  # d BCE / d logits
    grad = _relu_backward(_linear_backward(m.fc6, grad, h5), h5)
    grad = _relu_backward(_linear_backward(m.fc5, grad, h4), h4)
    grad_z = _linear_backward(m.fc4, grad, z)
    grad_mu = grad_z + mu  # the decoder's part + the KL's
    grad_log_var = 0.5 * (grad_z * eps * std + var - 1)
    grad = _linear_backward(m.fc31, grad_mu, h2) + _linear_backward(m.fc32, grad_log_var, h2)
    grad = _relu_backward(grad, h2)
    grad = _relu_backward(_linear_backward(m.fc2, grad, h1), h1)
    _set_parameter_grads(m.fc1, grad, x)  # the images need no gradient
    return loss


def _linear(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return torch.addmm(layer.bias, inputs, layer.weight.t())


def _linear_backward(layer: nn.Linear, grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Set the layer's weight and bias gradients; return the gradient of its input."""
    _set_parameter_grads(layer, grad_out, inputs)
    return grad_out @ layer.weight


def _set_parameter_grads(layer: nn.Linear, grad_out: torch.Tensor, inputs: torch.Tensor) -> None:
    for param in (layer.weight, layer.bias):
        if param.grad is None:
            param.grad = torch.empty_like(param)
    torch.mm(grad_out.t(), inputs, out=layer.weight.grad)
    torch.sum(grad_out, 0, out=layer.bias.grad)


def _relu_backward(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Zero the gradient where the ReLU output is zero (what autograd does)."""
    return torch.ops.aten.threshold_backward(grad, activation, 0)
