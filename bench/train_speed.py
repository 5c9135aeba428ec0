"""Seconds per epoch: vae-rt's trainer against the tutorial's own loop, same machine, same run.

The tutorial loop is torchvision `datasets.MNIST` + `ToTensor` + `DataLoader(batch_size=128,
shuffle=True)`, the model trained and tested exactly as in its code. Both report the test loss per
image so the loss curves can be compared too.

Run: `python bench/train_speed.py --data-dir ../shared/data/mnist [--epochs 1]`
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vae_rt.cache import cache_dir
from vae_rt.model import VAE, elbo_loss
from vae_rt.train import TrainOptions, train


def tutorial_epochs(epochs: int, root: Path) -> list[tuple[float, float]]:
    """(seconds, test loss per image) per epoch of the tutorial's DataLoader loop."""
    torch.manual_seed(0)
    to_tensor = transforms.ToTensor()
    train_loader = DataLoader(datasets.MNIST(str(root), train=True, transform=to_tensor), batch_size=128, shuffle=True)
    test_loader = DataLoader(datasets.MNIST(str(root), train=False, transform=to_tensor), batch_size=128, shuffle=False)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    results = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for data, _ in train_loader:
            optimizer.zero_grad()
            recon, mu, log_var = model(data)
            loss = elbo_loss(recon, data, mu, log_var)
            loss.backward()
            optimizer.step()
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for data, _ in test_loader:
                recon, mu, log_var = model(data)
                test_loss += elbo_loss(recon, data, mu, log_var).item()
        results.append((time.perf_counter() - started, test_loss / len(test_loader.dataset)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    # vae-rt first: it sets flush-to-zero before torch's worker threads exist, so they inherit it
    # (see train.py); the tutorial loop then runs with those same threads, which can only help it.
    with tempfile.TemporaryDirectory() as out:
        ours = train(Path(out), TrainOptions(epochs=args.epochs), data_dir=args.data_dir, device="cpu")
    tutorial = tutorial_epochs(args.epochs, cache_dir() / "mnist")  # the cache train() verified and unpacked
    print(f"torch threads: {torch.get_num_threads()}")
    for epoch, ((t_sec, t_loss), m) in enumerate(zip(tutorial, ours), start=1):
        print(
            f"epoch {epoch}: tutorial loop {t_sec:.2f}s (test loss {t_loss:.2f}), "
            f"vae-rt {m['seconds']:.2f}s (test loss {m['test_loss']:.2f}): {t_sec / m['seconds']:.2f}x faster"
        )


if __name__ == "__main__":
    main()
