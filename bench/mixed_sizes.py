"""`auto` under batch sizes that change from call to call, as a server's dynamic batching makes them.

One seeded sequence of `--calls` batch sizes, log-uniform between 1 and `--max-batch`, is decoded back
to back by: `auto` (its dispatch: the fastest engine per size, a switch put off while another engine
still spins, `vae_rt.dispatch`); the fastest engine per size at every call, always switching (the
engines of auto's own tuning table, each in a sampler of its own); and each of those engines alone.
The runs alternate for `--rounds` rounds, each round starting one run later, with a pause before
each run; each round's milliseconds per sequence are printed, then the medians against auto's.

Run: `python bench/mixed_sizes.py [--calls 200] [--max-batch 2048] [--rounds 5] [--precision auto]`
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from vae_rt import open_sampler
from vae_rt.sampler import Sampler, draw_latents
from vae_rt.timing import SETTLE_SECONDS


def batch_sizes(calls: int, max_batch: int, seed: int = 0) -> list[int]:
    """Log-uniform sizes in [1, max_batch]: as many small batches as large ones, as under a varying load."""
    exponents = np.random.default_rng(seed).uniform(0, np.log2(max_batch), calls)
    return [int(2**e) for e in exponents]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default=None, help="auto's precision: fp32 (default) or auto")
    args = parser.parse_args()
    sizes = batch_sizes(args.calls, args.max_batch)
    pool = draw_latents(args.max_batch, 2, seed=1)
    with open_sampler(None, "auto", args.precision, "cpu") as auto:
        labels = sorted({auto.backend.engine_for(rows) for rows in sizes})
        alone = {label: open_sampler(None, *label.split(), "cpu") for label in labels}
        print(f"{len(sizes)} calls, {sum(sizes):,} latents, sizes 1..{args.max_batch}; {auto.describe()}")

        def sequence(sampler_for: Callable[[int], Sampler]) -> Callable[[], None]:
            """The whole sequence, each call decoded by `sampler_for(its size)`."""

            def run() -> None:
                for rows in sizes:
                    sampler_for(rows).decode(pool[:rows])

            return run

        runs = {
            "auto": sequence(lambda rows: auto),
            "fastest per size, always switching": sequence(lambda rows: alone[auto.backend.engine_for(rows)]),
        }
        runs |= {f"{label} alone": sequence(lambda rows, sampler=sampler: sampler) for label, sampler in alone.items()}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for round_ in range(1, args.rounds + 1):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # each round starts one run later
                time.sleep(SETTLE_SECONDS)
                started = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
            print(f"round {round_}: " + ", ".join(f"{name} {s[-1] * 1e3:.1f} ms" for name, s in seconds.items()))
        for sampler in alone.values():
            sampler.close()
    ours = statistics.median(seconds["auto"])
    for name, values in seconds.items():
        print(f"median of {args.rounds}: {name} {statistics.median(values) * 1e3:.1f} ms, auto is {statistics.median(values) / ours:.2f}x as fast")


if __name__ == "__main__":
    main()
