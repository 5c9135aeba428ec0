"""End-to-end sampling against decode alone: how much of the decoder's speed reaches the disk.

Times, in one run and at the sampler's own batch size: (1) decoding n seeded latents and dropping
the images, (2) `vae-rt sample -n N --out x.npy` (latents, decode, conversion, streamed write;
not fsync'ed, as `vae-rt sample` does not), then prints both rates and their ratio.

Run: `python bench/sample_pipeline.py -n 1000000 [--backend auto] [--dtype float32] [--dir /tmp]`
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    with open_sampler(backend=args.backend) as sampler:
        started = time.perf_counter()
        for _ in sampler.iter_samples(args.n, seed=0):
            pass
        decode_only = args.n / (time.perf_counter() - started)
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            started = time.perf_counter()
            stream_npy(sampler.iter_samples(args.n, 0, reuse=RING_SIZE), args.n, Path(folder) / "x.npy", args.dtype)
            end_to_end = args.n / (time.perf_counter() - started)
        print(f"{sampler.describe()}, batch {sampler.batch_size}, n = {args.n:,}, {args.dtype}")
    print(f"decode only: {decode_only:,.0f} samples/s")
    print(f"to .npy:     {end_to_end:,.0f} samples/s ({end_to_end / decode_only:.0%} of decode only)")


if __name__ == "__main__":
    main()
