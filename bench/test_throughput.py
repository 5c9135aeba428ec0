"""Latency of `decode` per backend x precision x batch size, through the public sampler API.

Run: `pytest --benchmark-only` (add `--benchmark-autosave`, then `--benchmark-compare` to track changes).
Results are grouped by batch size; `extra_info` holds samples/s and GFLOP/s of each row.
"""

import pytest

from vae_rt import open_sampler
from vae_rt.backends import BACKEND_CHOICES, PRECISIONS
from vae_rt.bench import bench_targets, reference_decoder
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.errors import UserError
from vae_rt.parity import compare
from vae_rt.sampler import draw_latents

BATCHES = [1, 64, 1024, 8192]
CONFIG = load_checkpoint(BUNDLED_CHECKPOINT)[0].config
# The same (backend, precision, device) list as `vae-rt bench`, for every device this machine has, and
# CUDA rows always: where they cannot run they are skipped with the reason.
TARGETS = [
    pytest.param(target, id="-".join(str(part) for part in target), marks=[pytest.mark.gpu] if target[2] == "cuda" else [])
    for target in bench_targets(list(BACKEND_CHOICES), list(PRECISIONS), "auto", include_cuda=True)
]


@pytest.fixture(scope="module")
def samplers():
    """Opened once per module, outside every timed call."""
    opened = {}
    yield opened
    for sampler in opened.values():
        sampler.close()


def _record(benchmark, batch):
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["samples_per_s"] = round(batch / seconds)
        benchmark.extra_info["gflops"] = round(batch * CONFIG.decoder_flop_per_sample / seconds / 1e9, 2)


@pytest.mark.parametrize("batch", BATCHES)
def test_torch_eager_reference(benchmark, batch):
    """The tutorial's own call (nn.Module under no_grad, fp32): the baseline of every ratio."""
    benchmark.group = f"batch {batch:>5}"
    decode = reference_decoder(BUNDLED_CHECKPOINT)
    z = draw_latents(batch, CONFIG.z_dim, seed=batch)
    images = benchmark(decode, z)
    _record(benchmark, batch)
    assert images.shape == (batch, 784)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("target", TARGETS)
def test_decode(benchmark, samplers, target, batch):
    backend, precision, device = target
    benchmark.group = f"batch {batch:>5}"
    if target not in samplers:
        try:
            samplers[target] = open_sampler(None, backend, precision, device)
        except UserError as error:
            pytest.skip(str(error))
    sampler = samplers[target]
    benchmark.extra_info["runs_on"] = sampler.describe()
    z = draw_latents(batch, CONFIG.z_dim, seed=batch)
    images = benchmark(sampler.decode, z)
    _record(benchmark, batch)
    reference = reference_decoder(BUNDLED_CHECKPOINT)(z)
    assert compare(reference, images, sampler.backend.precision).passed
