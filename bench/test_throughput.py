"""Latency of `decode` per backend x precision x batch size, through the public sampler API.

Run: `pytest --benchmark-only` (add `--benchmark-autosave`, then `--benchmark-compare` to track changes).
Results are grouped by batch size; `extra_info` holds samples/s and GFLOP/s of each row.
"""

import pytest
import torch

from vae_rt import open_sampler
from vae_rt.backends.ort import CUDA_EP, available_providers
from vae_rt.bench import reference_decoder
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.engine import engine_skip_reason
from vae_rt.parity import compare
from vae_rt.sampler import draw_latents

BATCHES = [1, 64, 1024, 8192]
CONFIG = load_checkpoint(BUNDLED_CHECKPOINT)[0].config
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
NO_ORT = pytest.mark.skipif(not available_providers(), reason="needs onnxruntime: pip install 'vae-rt[cpu]'")
NO_ORT_CUDA = pytest.mark.skipif(CUDA_EP not in available_providers(), reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
NO_TRT = pytest.mark.skipif(engine_skip_reason() is not None, reason=f"needs TensorRT and a GPU: {engine_skip_reason()}")

TARGETS = [
    pytest.param(("torch", "fp32", "cpu"), id="torch-fp32-cpu"),
    pytest.param(("ort", "fp32", "cpu"), marks=NO_ORT, id="ort-fp32-cpu"),
    pytest.param(("ort", "fp16", "cpu"), marks=NO_ORT, id="ort-fp16-cpu"),
    pytest.param(("torch", "bf16", "cpu"), id="torch-bf16-cpu"),
    pytest.param(("auto", None, "cpu"), id="auto-cpu"),
    pytest.param(("torch", "fp32", "cuda"), marks=[pytest.mark.gpu, NO_GPU], id="torch-fp32-cuda"),
    pytest.param(("torch", "fp16", "cuda"), marks=[pytest.mark.gpu, NO_GPU], id="torch-fp16-cuda"),
    pytest.param(("ort", "fp16", "cuda"), marks=[pytest.mark.gpu, NO_GPU, NO_ORT_CUDA], id="ort-fp16-cuda"),
    pytest.param(("trt", "fp16", "cuda"), marks=[pytest.mark.gpu, NO_TRT], id="trt-fp16-cuda"),
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
        samplers[target] = open_sampler(None, backend, precision, device)
    sampler = samplers[target]
    benchmark.extra_info["runs_on"] = sampler.describe()
    z = draw_latents(batch, CONFIG.z_dim, seed=batch)
    images = benchmark(sampler.decode, z)
    _record(benchmark, batch)
    reference = reference_decoder(BUNDLED_CHECKPOINT)(z)
    assert compare(reference, images, sampler.backend.precision).passed
