"""MNIST as whole uint8 tensors, through torchvision's `datasets.MNIST` (md5 check, IDX parsing).

Source, first found wins: `data_dir` (a folder with the four original `.gz` files), the environment
variable `VAE_RT_MNIST_DIR`, else torchvision's normal download. A source folder is never written to:
its files are linked into a cache folder (`VAE_RT_CACHE_DIR`, default `~/.cache/vae_rt`) where
torchvision verifies and unpacks them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from vae_rt.errors import UserError

MNIST_DIR_ENV = "VAE_RT_MNIST_DIR"
CACHE_DIR_ENV = "VAE_RT_CACHE_DIR"


class DataError(UserError):
    """The MNIST files are missing, incomplete or corrupt."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "vae_rt")


def load_mnist(data_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both MNIST splits as uint8 tensors: train [60000, 28, 28], test [10000, 28, 28].

    Raises:
        DataError: a file is missing or its md5 differs from the published one.
    """
    from torchvision.datasets import MNIST

    source = data_dir or os.environ.get(MNIST_DIR_ENV)
    root = cache_dir() / "mnist"
    raw = root / "MNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        if source is not None:
            _link_verified(Path(source), raw, MNIST.resources)
        return tuple(MNIST(str(root), train=train, download=True).data for train in (True, False))
    except DataError:
        raise
    except (OSError, RuntimeError, AssertionError, ValueError) as err:
        reason = " ".join(str(err).split())  # torchvision's download errors span lines; the cause is on the last
        offline = "" if source is not None else f"; offline? pass --data-dir or set {MNIST_DIR_ENV} to the four MNIST .gz files"
        raise DataError(f"MNIST could not be loaded into {root}: {reason}{offline}") from err


def _link_verified(source: Path, raw: Path, resources: list[tuple[str, str]]) -> None:
    """Check each `.gz` in `source` against its md5, then link it into torchvision's raw folder."""
    if not source.is_dir():
        raise DataError(f"MNIST folder {source} does not exist")
    for url, md5 in resources:
        name = url.rsplit("/", 1)[-1]
        src = source / name
        if not src.is_file():
            raise DataError(f"MNIST folder {source} has no {name} (it needs the four original .gz files)")
        if hashlib.md5(src.read_bytes()).hexdigest() != md5:
            raise DataError(f"{src} is corrupt or incomplete: its md5 is not the published {md5}")
        link = raw / name
        if link.is_symlink() or link.exists():
            if link.resolve() == src.resolve():
                continue
            link.unlink()
            (raw / name.removesuffix(".gz")).unlink(missing_ok=True)  # unpacked from another source
        link.symlink_to(src.resolve())
