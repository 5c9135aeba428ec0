"""Upper bounds on the work a command may be asked for, checked before any of it starts.

A typo (`-n 10**12`, `--duration inf`, `--iw-samples 10**9`) must end in one line naming the limit,
not in hours of work or a MemoryError. The limits are generous for real use.
"""

from __future__ import annotations

import math
import numbers

from vae_rt.errors import UserError

MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; the trainer derives per-epoch seeds from it, kept in range
MAX_COMPARE_COUNT = 1_000_000  # compare holds every image of every backend in memory: 3 GB per copy at the limit
MAX_IW_SAMPLES = 100_000  # Burda et al. use 5000; the cost grows linearly with it
MAX_BENCH_DURATION = 600.0  # seconds per row
MAX_EPOCHS = 10_000
MAX_Z_DIM = 4096  # the latent space of a 784-pixel image: anything larger is a typo
MAX_BATCH = 1 << 22  # 4M images = 13 GB of float32 output per call: beyond that nothing gets faster
MAX_QUEUE_DELAY_US = 10_000_000  # a request held 10 s for company is a typo, not batching
MAX_THREADS = 1024  # decode threads: a typo of 10**5 exhausts the machine's threads


def check_between(option: str, value: float, low: float, high: float) -> None:
    """Refuse `value` outside [low, high] (NaN included) with a one-line error naming `option` and the limits."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise UserError(f"{option} must be between {low} and {high}, got {value}")


def is_integer(value: object) -> bool:
    """An int or numpy integer; not a bool, not a float such as 2.5 or 3.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high] (no upper bound when None), else a one-line UserError naming `name`."""
    if not (is_integer(value) and low <= value and (high is None or value <= high)):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise UserError(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


def check_seed(seed: int, option: str = "seed") -> int:
    if not (is_integer(seed) and 0 <= seed <= MAX_SEED):
        raise UserError(f"{option} must be between 0 and 2**63-1 ({MAX_SEED}), got {seed!r}")
    return int(seed)
