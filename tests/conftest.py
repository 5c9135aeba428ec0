"""Shared fixtures: the real MNIST files, a private cache folder, and small checkpoints to test against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vae_rt.checkpoint import BUNDLED_CHECKPOINT, save_checkpoint
from vae_rt.model import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


MNIST_DIR = Path(os.environ.get("VAE_RT_MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The four original MNIST .gz files: $VAE_RT_MNIST_DIR, else ../shared/data/mnist beside the project."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST files not found in {MNIST_DIR}; set VAE_RT_MNIST_DIR to a folder holding the four .gz files")
    return MNIST_DIR


SMALL_TRAIN_IMAGES = 2048


@pytest.fixture
def small_mnist(mnist_dir, monkeypatch) -> int:
    """The trainer on 2048 training and 512 test images: the bookkeeping of a run in a second per epoch."""
    import vae_rt.train as train_module
    from vae_rt.data import load_mnist

    images = load_mnist(mnist_dir)[0]
    monkeypatch.setattr(train_module, "load_mnist", lambda data_dir: (images[:SMALL_TRAIN_IMAGES], images[-512:]))
    return SMALL_TRAIN_IMAGES // 128  # batches per epoch


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unpacked MNIST and cached exports go to a temporary folder, never the user's ~/.cache.

    $VAE_RT_MNIST_DIR names the real files, as a user's would: fp16 and int8 exports made on the way
    (cached ONNX files) need the test set for their quality gate, and nothing may be downloaded.
    """
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VAE_RT_CACHE_DIR", str(path))
    mp.setenv("VAE_RT_MNIST_DIR", str(MNIST_DIR))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vae-rt checkpoint of the default net with seeded random weights."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("ckpt") / "random.pth"
    save_checkpoint(path, VAE(VAEConfig()))
    return path


@pytest.fixture(scope="session")
def tutorial_state_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain `state_dict`, as the tutorial saves it (`torch.save(model.state_dict(), 'checkpoint_8.pth')`)."""
    torch.manual_seed(8)
    path = tmp_path_factory.mktemp("tutorial") / "checkpoint_8.pth"
    torch.save(VAE(VAEConfig(z_dim=2)).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def bundled() -> Path:
    return BUNDLED_CHECKPOINT


@pytest.fixture(autouse=True)
def no_failed_exports_from_other_tests(monkeypatch):
    """`cached_onnx` remembers failed exports for the rest of the process: each test starts without them."""
    import vae_rt.resolve

    monkeypatch.setattr(vae_rt.resolve, "FAILED_EXPORTS", {})
