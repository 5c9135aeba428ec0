"""The API's own cost at batch 1: `Sampler.decode` against the raw `InferenceSession.run` it wraps.

Both calls go to the same ONNX Runtime session (the one inside an `ort` sampler), so the difference
is vae-rt's code alone: the latents' checks, dispatch, and wrapping the result as a torch tensor.
The two alternate in `--rounds` rounds (the drift of a shared machine hits both alike); each
round's ratio is printed, then the median. A third call, `decode` through `--backend auto`, shows
what the per-batch-size dispatch adds; a fourth, latents given as a numpy array, what checking and
converting a torch tensor adds.

Run: `python bench/api_cost.py [--rounds 7] [--calls 20000]`
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from vae_rt import open_sampler
from vae_rt.model import INPUT_NAME, OUTPUT_NAME
from vae_rt.sampler import draw_latents
from vae_rt.timing import SETTLE_SECONDS


def per_call(fn: Callable[[], Any], calls: int) -> float:
    """Mean seconds per call, after a pause that outlasts the spinning of the session timed before
    (`auto` runs its own ORT session)."""
    time.sleep(SETTLE_SECONDS)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    z = draw_latents(1, 2, seed=1)
    feed = {INPUT_NAME: z.numpy()}
    with open_sampler(None, "ort", "fp32", "cpu") as ort_sampler, open_sampler(None, "auto", None, "cpu") as auto:
        session = ort_sampler.backend._session  # the very session the sampler calls
        timed = {
            "raw session.run": lambda: session.run([OUTPUT_NAME], feed),
            "Sampler.decode (ort)": lambda: ort_sampler.decode(z),
            "Sampler.decode (ort, numpy latents)": lambda: ort_sampler.decode(feed[INPUT_NAME]),
            f"Sampler.decode (auto: {auto.backend.engine_for(1)})": lambda: auto.decode(z),
        }
        ratios: dict[str, list[float]] = {name: [] for name in list(timed)[1:]}
        for round_ in range(1, args.rounds + 1):
            seconds = {name: per_call(fn, args.calls) for name, fn in timed.items()}
            raw = seconds["raw session.run"]
            for name, collected in ratios.items():
                collected.append(seconds[name] / raw)
            print(f"round {round_}: " + ", ".join(f"{name} {s * 1e6:.1f} us" for name, s in seconds.items()))
    for name, values in ratios.items():
        print(f"median of {args.rounds}: {name} = {statistics.median(values):.3f}x the raw call")


if __name__ == "__main__":
    main()
