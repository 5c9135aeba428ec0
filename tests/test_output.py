"""Where images go: the .npy stream (O_DIRECT and buffered), block-aligned memory, PNG grids, --out checks."""

import contextlib
import errno
import os

import numpy as np
import pytest
import torch

from vae_rt import direct_io, open_sampler, output
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.files import BLOCK, block_aligned_empty
from vae_rt.output import check_output, stream_npy, to_uint8, write_png


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_npy_stream_equals_the_in_memory_samples(random_checkpoint, tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)  # as on systems without it
    with open_sampler(random_checkpoint, "torch", device="cpu", batch_size=100) as sampler:
        expected = sampler.sample(250, seed=9)
        stream_npy(sampler.iter_samples(250, seed=9), 250, tmp_path / "x.npy", "float32")
        stream_npy(sampler.iter_samples(250, seed=9), 250, tmp_path / "x8.npy", "uint8")
    assert np.array_equal(np.load(tmp_path / "x.npy"), expected.numpy())
    as_uint8 = np.load(tmp_path / "x8.npy")
    assert as_uint8.dtype == np.uint8 and np.array_equal(as_uint8, to_uint8(expected).numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "x8.npy"]


def test_direct_writes_keep_every_byte_whatever_the_sizes(tmp_path):
    path = tmp_path / "raw.bin"
    path.touch()
    chunks = [np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8) for size in (1, 4095, 5000, 1, 12288, 3)]
    with direct_io.open_append_stream(path, chunks[0].tobytes()) as f:
        if not isinstance(f, direct_io.DirectFile):
            pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")
        for chunk in chunks[1:]:
            f.write(chunk)
    assert path.read_bytes() == np.concatenate(chunks).tobytes()


@pytest.mark.parametrize("shape, dtype", [((3,), torch.uint8), ((64, 1, 28, 28), torch.float32), ((5, 7), torch.float64)])
def test_block_aligned_memory(shape, dtype):
    tensor = block_aligned_empty(shape, dtype)
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    assert tensor.data_ptr() % BLOCK == 0


def test_aligned_batches_go_to_the_disk_without_a_copy(random_checkpoint, tmp_path):
    path = tmp_path / "raw.bin"
    path.touch()
    with open_sampler(random_checkpoint, "torch", device="cpu", batch_size=64) as sampler:
        batches = [batch.clone() for batch in sampler.iter_samples(192, seed=2, reuse=2)]
        ring_batch = next(sampler.iter_samples(64, seed=2, reuse=2))
    assert ring_batch.data_ptr() % BLOCK == 0  # what the sampler hands a writer
    with direct_io.open_append_stream(path, bytes(BLOCK)) as f:
        if not isinstance(f, direct_io.DirectFile):
            pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")
        for batch in batches:
            aligned = block_aligned_empty(tuple(batch.shape), torch.float32)
            f.write(aligned.copy_(batch).numpy())
        assert len(f.buffer) == BLOCK  # never grew: nothing went through it
    assert path.read_bytes() == bytes(BLOCK) + b"".join(b.numpy().tobytes() for b in batches)


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(random_checkpoint, tmp_path, monkeypatch):
    def refuse(self, data):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(direct_io.DirectFile, "write", refuse)
    with open_sampler(random_checkpoint, "torch", device="cpu") as sampler:
        stream_npy(sampler.iter_samples(30, seed=1), 30, tmp_path / "x.npy")
        assert np.array_equal(np.load(tmp_path / "x.npy"), sampler.sample(30, seed=1).numpy())


def test_a_full_disk_is_one_clear_failure(tmp_path, monkeypatch):
    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def full_disk(path, header):
        yield FullDisk()

    monkeypatch.setattr(output, "open_append_stream", full_disk)
    with pytest.raises(RuntimeFailure, match=r"writing .*x.npy failed: No space left on device"):
        stream_npy([torch.zeros(4, 1, 28, 28)], 4, tmp_path / "x.npy")
    assert list(tmp_path.iterdir()) == []


def test_npy_header_is_one_block_and_numpy_reads_it(tmp_path):
    header = output.npy_header("uint8", (2, 1, 28, 28))
    pixels = np.arange(2 * 784, dtype=np.uint8).reshape(2, 1, 28, 28)
    (tmp_path / "x.npy").write_bytes(header + pixels.tobytes())
    assert len(header) == output.BLOCK
    assert np.array_equal(np.load(tmp_path / "x.npy"), pixels)
    assert np.array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), pixels)


def test_a_failing_decode_leaves_no_npy_behind(tmp_path):
    def batches():
        yield torch.zeros(10, 1, 28, 28)
        raise RuntimeFailure("backend broke")

    with pytest.raises(RuntimeFailure):
        stream_npy(batches(), 20, tmp_path / "x.npy")
    assert list(tmp_path.iterdir()) == []


def test_png_grid(tmp_path):
    from PIL import Image

    write_png(torch.rand(16, 1, 28, 28), tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (4 * 30 + 2, 4 * 30 + 2)


@pytest.mark.parametrize(
    "name, n, message",
    [
        ("x.jpg", 4, "unsupported extension"),
        ("missing/x.png", 4, "does not exist"),
        ("x.png", 10_001, "at most 10000 images"),
    ],
)
def test_output_checks(tmp_path, name, n, message):
    with pytest.raises(UserError, match=message):
        check_output(tmp_path / name, n, "float32")

