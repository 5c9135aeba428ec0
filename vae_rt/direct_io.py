"""Appending to a file past the page cache (O_DIRECT), for `.npy` streams of gigabytes.

Copying gigabytes into the page cache costs a core the decoder needs (docs/benchmarks.md); with
O_DIRECT the disk's DMA reads the buffers instead. Systems and file systems that refuse it get an
ordinary buffered file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from vae_rt.files import BLOCK, block_aligned_empty


@contextlib.contextmanager
def open_append_stream(path: Path, header: bytes) -> Iterator[DirectFile | BinaryIO]:
    """`path` holding `header`, open for appending: past the page cache where the system allows it."""
    direct = open_direct(path, header)
    if direct is not None:
        with direct:
            yield direct
    else:
        with open(path, "wb") as f:
            f.write(header)
            yield f


def open_direct(path: Path, header: bytes) -> DirectFile | None:
    """An O_DIRECT file holding `header`, or None: some systems refuse O_DIRECT on open, others on the first write."""
    try:
        direct = DirectFile(os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_DIRECT))  # no os.O_DIRECT off Linux
    except (AttributeError, OSError):
        return None
    try:
        direct.write(header)
    except OSError:
        direct.close(complete=False)
        return None
    return direct


class DirectFile:
    """Appends bytes to an O_DIRECT file descriptor, in whole blocks from block-aligned memory.

    Aligned data of whole blocks goes to the disk as it is: the sampler's ring buffers, when a
    batch holds a multiple of 64 float32 images (256 uint8). Other data is copied into an aligned
    staging buffer and written in whole blocks; the remainder waits for the next write. On close
    the last partial block is written zero-padded and the file cut back to the exact size.
    """

    def __init__(self, fd: int):
        self.fd, self.size, self.pending = fd, 0, 0  # bytes written in all; bytes in the buffer not yet written
        self.buffer = _aligned_bytes(BLOCK)

    def write(self, data: np.ndarray | bytes) -> None:
        raw = np.frombuffer(data, np.uint8)  # a byte view of the same memory
        if not self.pending and len(raw) % BLOCK == 0 and raw.ctypes.data % BLOCK == 0:
            _write_all(self.fd, memoryview(raw))
            self.size += len(raw)
            return
        end = self.pending + len(raw)
        if end > len(self.buffer):  # grows to the largest batch, once
            grown = _aligned_bytes(-(-end // BLOCK) * BLOCK)
            grown[: self.pending] = self.buffer[: self.pending]
            self.buffer = grown
        self.buffer[self.pending : end] = raw
        whole = end - end % BLOCK
        if whole:
            _write_all(self.fd, memoryview(self.buffer[:whole]))
            self.buffer[: end - whole] = self.buffer[whole:end]  # the remainder (< BLOCK, after `whole`)
        self.pending, self.size = end - whole, self.size + len(raw)

    def close(self, complete: bool = True) -> None:
        """Write what is pending (when `complete`: not after a failure) and close the file."""
        try:
            if self.pending and complete:
                self.buffer[self.pending : BLOCK] = 0
                _write_all(self.fd, memoryview(self.buffer[:BLOCK]))
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        self.close(complete=error_type is None)


def _aligned_bytes(size: int) -> np.ndarray:
    return block_aligned_empty((size,), torch.uint8).numpy()


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]
