import math

import pytest
import torch
import torch.nn.functional as F

from vae_rt.model import VAE, VAEConfig, elbo_loss, importance_weighted_nll


def test_shapes_and_parameter_names():
    model = VAE(VAEConfig(z_dim=3))
    recon, mu, log_var = model(torch.rand(5, 1, 28, 28))
    assert recon.shape == (5, 784) and mu.shape == (5, 3) and log_var.shape == (5, 3)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"fc1", "fc2", "fc31", "fc32", "fc4", "fc5", "fc6"}
    assert 0 <= recon.min() and recon.max() <= 1


def test_decoder_shares_the_vae_layers():
    model = VAE()
    decoder = model.decoder()
    z = torch.randn(4, 2)
    assert torch.equal(decoder(z), model.decode(z))
    with torch.no_grad():
        model.fc6.bias.add_(1.0)
    assert torch.equal(decoder(z), model.decode(z))


def test_loss_is_the_hand_computed_formula():
    recon = torch.tensor([[0.9, 0.2], [0.5, 0.7]])
    x = torch.tensor([[1.0, 0.0], [0.25, 1.0]])
    mu = torch.tensor([[0.5], [-1.0]])
    log_var = torch.tensor([[0.0], [math.log(0.25)]])
    bce = 0.0
    for r, t in zip(recon.flatten().tolist(), x.flatten().tolist()):
        bce -= t * math.log(r) + (1 - t) * math.log(1 - r)
    kld = -0.5 * ((1 + 0 - 0.25 - 1) + (1 + math.log(0.25) - 1 - 0.25))
    assert elbo_loss(recon, x, mu, log_var).item() == pytest.approx(bce + kld, rel=1e-6)


def test_decoder_flop_count_matches_design():
    assert VAEConfig().decoder_flop_per_sample == 1_065_984


def test_importance_weighted_bound_is_tighter_than_the_elbo():
    torch.manual_seed(0)
    model = VAE().eval()
    x = torch.rand(16, 784).round()
    with torch.no_grad():
        mu, log_var = model.encode(x)
        recon = model.decode(mu + torch.randn(64, *mu.shape) * torch.exp(0.5 * log_var))
        bce = F.binary_cross_entropy(recon, x.expand_as(recon), reduction="none").sum(-1).mean(0)
        kld = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(-1)
        elbo_nll = bce + kld
        iw = importance_weighted_nll(model, x, k=64, chunk=16)
    assert iw.shape == (16,)
    assert (iw <= elbo_nll + 1e-3).all()  # log-mean-exp >= mean-log (Jensen), per image
