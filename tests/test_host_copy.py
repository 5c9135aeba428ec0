"""Pinned host buffers for GPU batches: the ring's reuse on the CPU, the copy and its events on a GPU."""

import numpy as np
import pytest
import torch

from vae_rt.host_copy import DeviceToHost, HostRing
from vae_rt.output import RING_SIZE, stream_npy


def _counting_allocator():
    made = []

    def allocate(shape, dtype):
        made.append((shape, dtype))
        return torch.empty(shape, dtype=dtype)

    return allocate, made


def test_buffers_are_allocated_once_and_handed_out_in_turn():
    allocate, made = _counting_allocator()
    ring = HostRing(3, allocate)
    batch = torch.zeros(8, 784)
    first = [ring.take(batch).data_ptr() for _ in range(3)]
    again = [ring.take(batch).data_ptr() for _ in range(3)]
    assert again == first and len(set(first)) == 3 and len(made) == 3


def test_a_smaller_batch_reuses_a_buffer_and_a_larger_one_grows_it():
    allocate, made = _counting_allocator()
    ring = HostRing(1, allocate)
    full = ring.take(torch.zeros(8, 784))
    tail = ring.take(torch.zeros(3, 784))
    assert tail.shape == (3, 784) and tail.data_ptr() == full.data_ptr() and len(made) == 1
    assert ring.take(torch.zeros(9, 784)).shape == (9, 784) and made[-1] == ((9, 784), torch.float32)


def test_another_dtype_gets_its_own_buffer():
    allocate, made = _counting_allocator()
    ring = HostRing(1, allocate)
    ring.take(torch.zeros(8, 784))
    assert ring.take(torch.zeros(8, 784, dtype=torch.uint8)).dtype == torch.uint8 and len(made) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_device_batches_land_in_pinned_reused_buffers():
    to_host = DeviceToHost(2)
    batches = [torch.full((5, 784), float(i), device="cuda") for i in range(4)]
    copies = [to_host.copy(b) for b in batches[:2]]
    for (host, done), expected in zip(copies, batches):
        done.synchronize()
        assert host.is_pinned() and torch.equal(host, expected.cpu())
    host, done = to_host.copy(batches[2])
    assert host.data_ptr() == copies[0][0].data_ptr()  # slot 0 again
    done.synchronize()
    assert torch.equal(host, batches[2].cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_streaming_gpu_batches_writes_what_was_decoded(tmp_path, dtype):
    torch.manual_seed(0)
    images = torch.rand(3 * RING_SIZE * 64 + 5, 1, 28, 28, device="cuda")
    ring = [torch.empty(64, 1, 28, 28, device="cuda") for _ in range(RING_SIZE)]  # as Sampler.iter_samples(reuse=...)

    def batches():
        for i, start in enumerate(range(0, len(images), 64)):
            chunk = images[start : start + 64]
            yield ring[i % RING_SIZE][: len(chunk)].copy_(chunk)

    path = tmp_path / "out.npy"
    stream_npy(batches(), len(images), path, dtype)
    expected = images.cpu().numpy() if dtype == "float32" else (images * 255 + 0.5).to(torch.uint8).cpu().numpy()
    np.testing.assert_array_equal(np.load(path), expected)
