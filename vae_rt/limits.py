"""Upper bounds on the work a command may be asked for, checked before any of it starts.

A typo (`-n 10**12`, `--duration inf`, `--iw-samples 10**9`) must end in one line naming the limit,
not in hours of work or a MemoryError. The limits are generous for real use.
"""

from __future__ import annotations

import math

from vae_rt.errors import UserError

MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; the trainer derives per-epoch seeds from it, kept in range
MAX_COMPARE_COUNT = 1_000_000  # compare holds every image of every backend in memory: 3 GB per copy at the limit
MAX_IW_SAMPLES = 100_000  # Burda et al. use 5000; the cost grows linearly with it
MAX_BENCH_DURATION = 600.0  # seconds per row
MAX_EPOCHS = 10_000
MAX_Z_DIM = 4096  # the latent space of a 784-pixel image: anything larger is a typo


def check_between(option: str, value: float, low: float, high: float) -> None:
    """Refuse `value` outside [low, high] (NaN included) with a one-line error naming `option` and the limits."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise UserError(f"{option} must be between {low} and {high}, got {value}")


def check_seed(seed: int, option: str = "seed") -> int:
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise UserError(f"{option} must be between 0 and 2**63-1 ({MAX_SEED}), got {seed}")
    return seed
