import pytest
import torch

from vae_rt.gradients import elbo_backward
from vae_rt.model import VAE, VAEConfig, elbo_loss


@pytest.mark.parametrize("config", [VAEConfig(), VAEConfig(x_dim=20, h1_dim=12, h2_dim=8, z_dim=3)])
def test_hand_written_gradients_equal_autograd(config):
    torch.manual_seed(0)
    model = VAE(config)
    x, eps = torch.rand(32, config.x_dim), torch.randn(32, config.z_dim)
    x[0, :5] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5])  # exact 0/1 pixels, as MNIST has
    mu, log_var = model.encode(x)
    expected_loss = elbo_loss(model.decode(mu + eps * torch.exp(0.5 * log_var)), x, mu, log_var)
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    for _ in range(2):  # the second call reuses the gradient buffers the first one allocated
        loss = elbo_backward(model, x, eps)

    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    for name, param in model.named_parameters():
        scale = expected[name].abs().max()
        assert (param.grad - expected[name]).abs().max() <= 1e-5 * scale, name
    assert not loss.requires_grad
