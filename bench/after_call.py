"""What a library call costs as the first thing after an engine call, against the same call alone.

An engine call fills the caches with its own code and data, so the first torch or numpy call after it
runs several times slower than in a hot loop (docs/benchmarks.md, "Per-call cost right after an engine
call"). For each statement this times one call right after the raw engine call (the engine inside a
vae-rt sampler), many times over, and the same statement in a loop of its own; medians in µs.

Run: `python bench/after_call.py [--engine ort|openvino] [--precision fp32] [--batch 64] [--calls 2000]`
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vae_rt import open_sampler
from vae_rt.backends import check_latents, latent_extent
from vae_rt.model import IMAGE_SHAPE, INPUT_NAME
from vae_rt.sampler import draw_latents


def statements(z: torch.Tensor, pixels: np.ndarray) -> dict[str, Callable[[], Any]]:
    """The pieces of a decode, as a user's tensor `z` and an engine's output `pixels` meet them."""
    z_array = z.numpy()
    return {
        "z.numpy(force=True)": lambda: z.numpy(force=True),
        "z.detach().numpy()": lambda: z.detach().numpy(),
        "check_latents(tensor)": lambda: check_latents(z, z.shape[1]),
        "check_latents(array)": lambda: check_latents(z_array, z.shape[1]),
        "latent_extent(array)": lambda: latent_extent(z_array),
        "torch.from_numpy(output reshaped)": lambda: torch.from_numpy(pixels.reshape(len(pixels), *IMAGE_SHAPE)),
        "np.empty(output)": lambda: np.empty(pixels.shape, np.float32),
    }


def median_us(statement: Callable[[], Any], calls: int, before: Callable[[], Any] = lambda: None) -> float:
    """Median µs of `statement` timed alone, each time right after `before` (an engine call, or nothing)."""
    clock, times = time.perf_counter_ns, []
    for _ in range(calls):
        before()
        started = clock()
        statement()
        times.append(clock() - started)
    return statistics.median(times) / 1e3


def raw_engine_call(sampler: Any, z: np.ndarray) -> Callable[[], Any]:
    """The engine under the sampler, called as a user of that engine would."""
    backend = sampler.backend
    if backend.name == "ort":
        session = backend._session
        return lambda: session.run(None, {INPUT_NAME: z})
    request = backend._request.get_compiled_model().create_infer_request()
    return lambda: request.infer(z, share_inputs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ort", "openvino"), default="ort")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    z = draw_latents(args.batch, 2, seed=1)
    with open_sampler(None, args.engine, args.precision, "cpu") as sampler:
        engine_call = raw_engine_call(sampler, z.numpy())
        pixels = sampler.decode(z).numpy().reshape(args.batch, -1)
        print(f"{sampler.describe()}, batch {args.batch}: µs right after the engine call (alone)")
        for label, statement in statements(z, pixels).items():
            print(f"{median_us(statement, args.calls, engine_call):8.2f} ({median_us(statement, args.calls):6.2f})  {label}")


if __name__ == "__main__":
    main()
