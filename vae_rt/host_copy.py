"""GPU batches copied to the host into a ring of pinned buffers, with one CUDA event per batch.

From pageable memory `non_blocking=True` does not overlap anything, and each `.cpu()` allocates
(and page-faults) a fresh multi-MB tensor. A pinned buffer takes a DMA copy on a side stream
while the host writes earlier batches, and reused buffers cost nothing after the first round.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class HostRing:
    """`slots` host buffers handed out in turn; a consumer must be done with one before it comes round again."""

    def __init__(self, slots: int, allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = pinned_empty):
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._allocate = allocate
        self._next = 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """The next buffer as a tensor of `like`'s shape and dtype, (re)allocated only when it is too small or of another dtype."""
        buffer = self._buffers[self._next]
        if buffer is None or buffer.dtype != like.dtype or buffer.shape[1:] != like.shape[1:] or len(buffer) < len(like):
            buffer = self._buffers[self._next] = self._allocate(tuple(like.shape), like.dtype)
        self._next = (self._next + 1) % len(self._buffers)
        return buffer[: len(like)]


class DeviceToHost:
    """Copies GPU batches into a HostRing on a side stream; `copy` returns the host tensor and its event."""

    def __init__(self, slots: int):
        self.ring = HostRing(slots)
        self.stream = torch.cuda.Stream()

    def copy(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start copying `images` (on a GPU) to the host; the host tensor is complete once the event has been waited for."""
        host = self.ring.take(images)
        self.stream.wait_stream(torch.cuda.current_stream())  # the decode that wrote `images` comes first
        with torch.cuda.stream(self.stream):
            host.copy_(images, non_blocking=True)
            images.record_stream(self.stream)  # its memory is not handed out again before the copy has read it
            done = torch.cuda.Event()
            done.record(self.stream)
        return host, done
