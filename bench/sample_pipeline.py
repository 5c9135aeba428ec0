"""End-to-end sampling against decode alone: how much of the decoder's speed reaches the disk.

Times, at the sampler's own batch size: (1) decoding n seeded latents and dropping the images,
(2) `vae-rt sample -n N --out x.npy` (latents, decode, conversion, streamed write; not fsync'ed,
as `vae-rt sample` does not). The two alternate for `--rounds` rounds, so that the drift of a shared
machine hits both alike; each round's ratio is printed, then the median.

Each round writes a new file: the previous round's is deleted before the clock starts. Replacing a
file frees the old one's blocks inside the final rename (~0.7 s for 3 GB on ext4 here): a cost of
the old file, paid alike by any program that overwrites it, not a cost of sampling.

Run: `python bench/sample_pipeline.py -n 1000000 [--backend auto] [--dtype float32] [--dir /tmp] [--rounds 3]`
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vae_rt import open_sampler
from vae_rt.output import RING_SIZE, stream_npy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "uint8"])
    parser.add_argument("--dir", type=Path, default=None, help="where the .npy is written (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ratios = []
    with open_sampler(backend=args.backend) as sampler, tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"{sampler.describe()}, batch {sampler.batch_size}, n = {args.n:,}, {args.dtype}")
        for round_ in range(1, args.rounds + 1):
            started = time.perf_counter()
            for _ in sampler.iter_samples(args.n, seed=0):
                pass
            decode_only = args.n / (time.perf_counter() - started)
            target = Path(folder) / "x.npy"
            target.unlink(missing_ok=True)
            started = time.perf_counter()
            stream_npy(sampler.iter_samples(args.n, 0, reuse=RING_SIZE), args.n, target, args.dtype)
            end_to_end = args.n / (time.perf_counter() - started)
            ratios.append(end_to_end / decode_only)
            print(f"round {round_}: decode only {decode_only:,.0f} samples/s, to .npy {end_to_end:,.0f} samples/s: {ratios[-1]:.0%}")
    print(f"to .npy / decode only, median of {args.rounds}: {statistics.median(ratios):.0%}")


if __name__ == "__main__":
    main()
