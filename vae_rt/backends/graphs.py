"""One CUDA-graph policy for the torch and TensorRT backends: which batch sizes replay a graph.

A graph freezes one batch size, so each size gets its own. Graphs pin device memory, so at most
GRAPH_CACHE_SIZE are kept (least recently used evicted), and none above GRAPH_MAX_BATCH, where one
launch is a rounding error next to the GEMMs. A failed capture is survived, as in TensorRT's
`sampleInference.cpp`: that batch size runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from vae_rt.errors import first_line

log = logging.getLogger(__name__)

GRAPH_MAX_BATCH = 16384
GRAPH_CACHE_SIZE = 8
T = TypeVar("T")


class CaptureFailed(RuntimeError):
    """Work could not be recorded into a CUDA graph; the message says why."""


class GraphCache(Generic[T]):
    """Captured graphs by batch size, made on first use by `capture(batch)`, which raises CaptureFailed to decline."""

    def __init__(self, capture: Callable[[int], T], capacity: int = GRAPH_CACHE_SIZE, max_batch: int = GRAPH_MAX_BATCH):
        self._capture = capture
        self.capacity, self.max_batch = capacity, max_batch
        self._entries: OrderedDict[int, T] = OrderedDict()
        self.eager: set[int] = set()  # batch sizes whose capture failed

    def get(self, batch: int) -> T | None:
        """The graph entry for `batch` (captured now on first use), or None: run this batch eagerly."""
        if batch > self.max_batch or batch in self.eager:
            return None
        entry = self._entries.get(batch)
        if entry is not None:
            self._entries.move_to_end(batch)
            return entry
        try:
            entry = self._capture(batch)
        except CaptureFailed as failure:
            log.warning("CUDA graph capture failed at batch %d (%s); that batch size runs without a graph", batch, failure)
            self.eager.add(batch)
            return None
        self._entries[batch] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def cached(self) -> list[int]:
        """Batch sizes holding a graph, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.eager.clear()


def capture_graph(record: Callable[[], T], stream: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, T]:
    """A CUDA graph of the work `record()` enqueues on `stream`, and what `record` returned.

    Thread-local mode: the `.npy` writer thread waits on CUDA events meanwhile, and in torch's default
    global mode a CUDA call from any other thread invalidates the capture.

    Raises:
        CaptureFailed: naming the first error; torch's own error at the capture's end would hide it.
        torch.OutOfMemoryError: unchanged, so that the sampler can halve its batch.
    """
    graph = torch.cuda.CUDAGraph()
    try:
        # The outer context restores the caller's stream: when capture_end raises, torch skips its own restore.
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            result = record()
    except RuntimeError as error:
        _clear_generator_capture_mark()
        cause = root_cause(error)
        if isinstance(cause, torch.OutOfMemoryError):
            raise cause from None
        raise CaptureFailed(first_line(cause)) from error
    return graph, result


def _clear_generator_capture_mark() -> None:
    """Clear the mark a failed capture leaves on torch's default CUDA generator.

    torch clears it only when a capture ends well. Until then every CUDA random op in the process,
    and the replay of every graph captured before, fails with "Offset increment outside graph capture
    encountered unexpectedly". A capture of one trivial kernel that ends well clears it; the
    generator's seed and offset are untouched.
    """
    try:  # never in place of the error being handled: after an OOM even this allocation can fail
        scratch = torch.empty(1, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream, capture_error_mode="thread_local"):
            scratch.zero_()
    except RuntimeError as error:  # torch's CUDA errors, out-of-memory included
        log.warning("after a failed CUDA graph capture, CUDA random numbers may fail in this process: %s", first_line(error))


def root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain: what went wrong before the cleanup that raised `error`."""
    while error.__context__ is not None:
        error = error.__context__
    return error

