"""The Sampler and the backends' shared contract: latents checked, batches, states, reduced-precision overflow."""

import numpy as np
import pytest
import torch

from vae_rt import open_sampler
from vae_rt.backends import chunk_bounds, get_backend
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.sampler import manifold_latents

pytest.importorskip("onnxruntime")


def test_chunk_bounds_cover_the_range_exactly():
    assert list(chunk_bounds(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_bounds(4, 4)) == [(0, 4)]
    assert list(chunk_bounds(0, 4)) == []
    with pytest.raises(ValueError):
        chunk_bounds(3, 0)


def test_decode_before_open_or_after_close_is_an_error(random_checkpoint):
    backend = get_backend("torch", checkpoint=random_checkpoint, precision="fp32", device="cpu")
    with pytest.raises(RuntimeError, match="torch backend is not open"):
        backend.decode(torch.zeros(1, 2))
    with backend:
        assert backend.decode(np.zeros((3, 2), dtype=np.float32)).shape == (3, 1, 28, 28)
    assert not backend.is_open
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        backend.decode(torch.zeros(1, 2))


@pytest.mark.parametrize(
    "z, message",
    [
        (torch.zeros(4, 3), r"shape \[B, 2\]"),
        (torch.zeros(0, 2), r"shape \[B, 2\]"),
        (torch.zeros(2), r"shape \[B, 2\]"),
        (torch.zeros(4, 2, dtype=torch.float64), "must be float32"),
        (torch.tensor([[0.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[float("inf"), 0.0]]), "NaN or Inf"),
        ([[0.0, 0.0]], "torch tensor or numpy array"),
        (torch.tensor(1.0), r"shape \[B, 2\]"),  # 0-d: no rows to count
        (np.zeros((), dtype=np.float32), r"shape \[B, 2\]"),
        (np.float32(1.0), "torch tensor or numpy array"),
        (None, "torch tensor or numpy array"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "ort", "openvino"])
def test_bad_latents_are_rejected_clearly(random_checkpoint, backend, z, message):
    with open_sampler(random_checkpoint, backend, device="cpu") as sampler, pytest.raises(UserError, match=message):
        sampler.decode(z)


@pytest.mark.parametrize("backend", ["torch", "ort", "openvino"])
def test_numpy_latents_of_any_layout_decode_like_a_tensor(random_checkpoint, backend):
    z = np.random.default_rng(3).standard_normal((6, 2), dtype=np.float32)
    read_only = z[::-1].copy()
    read_only.flags.writeable = False
    with open_sampler(random_checkpoint, backend, device="cpu") as sampler:
        expected = sampler.decode(torch.from_numpy(z[::-1].copy()))
        for layout in (z[::-1], np.asfortranarray(z[::-1]), read_only):
            assert torch.equal(sampler.decode(layout), expected)


def test_reduced_precision_overflow_is_caught(random_checkpoint, monkeypatch):
    with open_sampler(random_checkpoint, "ort", "fp16", "cpu") as sampler:
        monkeypatch.setattr(sampler.backend, "_decode", lambda z, out: torch.full((len(z), 1, 28, 28), float("nan")))
        with pytest.raises(RuntimeFailure, match="NaN/Inf"):
            sampler.decode(torch.zeros(2, 2))

def test_manifold_latents_span_the_normal_quantiles():
    z = manifold_latents(3, 2)
    assert z.shape == (9, 2)
    assert z[0].tolist() == pytest.approx([-1.6449, 1.6449], abs=1e-3)  # top left: low z0, high z1
    assert z[8].tolist() == pytest.approx([1.6449, -1.6449], abs=1e-3)
    with pytest.raises(UserError, match="2-D latent space"):
        manifold_latents(3, 8)


def test_latents_the_sampler_drew_are_not_checked_again(random_checkpoint, monkeypatch):
    import vae_rt.backends as backends_module

    def no_check(z, z_dim):
        raise AssertionError("checked")

    monkeypatch.setattr(backends_module, "check_latents", no_check)
    with open_sampler(random_checkpoint, "ort", device="cpu", batch_size=4) as sampler:
        assert sampler.sample(10, seed=2).shape == (10, 1, 28, 28)  # its own latents: straight to the engine
        with pytest.raises(AssertionError, match="checked"):
            sampler.decode(torch.zeros(1, 2))  # a caller's latents: always checked
