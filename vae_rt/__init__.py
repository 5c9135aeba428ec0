"""vae-rt: the tutorial MNIST VAE, trained fast and served through torch, ONNX Runtime and TensorRT."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # commands report their time from here, so slow imports and exports count

__version__ = "0.1.0"
__all__ = ["Sampler", "__version__", "open_sampler"]


def __getattr__(name: str):
    # Lazy, so `import vae_rt.checkpoint` (which reads __version__) never imports the sampler stack.
    if name in ("Sampler", "open_sampler"):
        from vae_rt import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module 'vae_rt' has no attribute {name!r}")
