"""MNIST as whole uint8 tensors, through torchvision's `datasets.MNIST` (md5 check, IDX parsing).

Source, first found wins: `data_dir` (a folder with the four original `.gz` files), the environment
variable `VAE_RT_MNIST_DIR`, else torchvision's normal download. A source folder is never written to:
its files are linked into a cache folder (`VAE_RT_CACHE_DIR`, default `~/.cache/vae_rt`) where
torchvision verifies and unpacks them; the unpacked files are checked against MNIST's on every load.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from vae_rt.cache import cache_folder, describe
from vae_rt.errors import UserError
from vae_rt.files import sha256_file

log = logging.getLogger(__name__)

MNIST_DIR_ENV = "VAE_RT_MNIST_DIR"
UNPACKED_SHA256 = {  # of the files torchvision unpacks from the published .gz (whose md5 it checks): read as they are
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class DataError(UserError):
    """The MNIST files are missing, incomplete or corrupt."""


def load_mnist(data_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both MNIST splits as uint8 tensors: train [60000, 28, 28], test [10000, 28, 28].

    Raises:
        DataError: a file is missing or its md5 differs from the published one.
    """
    from torchvision.datasets import MNIST

    source = data_dir or os.environ.get(MNIST_DIR_ENV) or None  # set but empty counts as unset, as for the cache folder
    raw = cache_folder("mnist/MNIST/raw")
    root = raw.parents[1]
    try:
        if source is not None:
            _link_verified(Path(source), raw, MNIST.resources)
        _drop_altered(raw)
        return tuple(MNIST(str(root), train=train, download=True).data for train in (True, False))
    except DataError:
        raise
    except (OSError, RuntimeError, AssertionError, ValueError) as err:
        reason = " ".join(str(err).split())  # torchvision's download errors span lines; the cause is on the last
        offline = "" if source is not None else f"; offline? pass --data-dir or set {MNIST_DIR_ENV} to the four MNIST .gz files"
        raise DataError(f"MNIST could not be loaded into {describe(root)}: {reason}{offline}") from err


def _drop_altered(raw: Path) -> None:
    """Delete unpacked files that are not MNIST's (edited, truncated), so torchvision unpacks them again.

    torchvision checks the md5 of a `.gz` only when it unpacks it; later runs read the unpacked copy unchecked.
    """
    for name, digest in UNPACKED_SHA256.items():
        path = raw / name
        if path.is_file() and sha256_file(path) != digest:
            log.warning("%s differs from the published MNIST data: unpacking it again", describe(path))
            path.unlink()


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
