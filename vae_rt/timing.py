"""Latencies of repeated calls: a warm-up, then a minimum duration and count, summarised by median and spread.

Shared by the benchmark and by `auto`'s tuning run, so both measure the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A pause before each interleaved slice: ONNX Runtime's threads spin for about 30 ms after its last
# call and slow whatever runs next on the same cores by up to 1.6x (docs/benchmarks.md).
SETTLE_SECONDS = 0.04


@dataclass(frozen=True)
class Timing:
    """Latencies of repeated calls, in seconds."""

    latencies: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def cv(self) -> float:
        mean = statistics.fmean(self.latencies)
        return statistics.pstdev(self.latencies) / mean if mean > 0 else 0.0



def time_calls(
    fn: Callable[[], Any], warmup: float = 0.2, min_duration: float = 1.0, min_iterations: int = 10, settle: float = 0.0
) -> Timing:
    """Sleep `settle` seconds, call `fn` for `warmup` seconds untimed, then until both the duration and the count are reached."""
    time.sleep(settle)
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < min_iterations or time.perf_counter() - started < min_duration:
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)
    return Timing(latencies)
