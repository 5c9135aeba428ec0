import contextlib
import errno
import os

import numpy as np
import pytest
import torch

import vae_rt.sampler as sampler_module
from vae_rt import open_sampler, output
from vae_rt.backends import chunk_bounds, get_backend
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.files import BLOCK, block_aligned_empty
from vae_rt.output import check_output, stream_npy, to_uint8, write_png
from vae_rt.sampler import cached_onnx, choose_backend, manifold_latents

ort = pytest.importorskip("onnxruntime")


def test_chunk_bounds_cover_the_range_exactly():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(4, 4) == [(0, 4)]
    assert chunk_bounds(0, 4) == []
    with pytest.raises(ValueError):
        chunk_bounds(3, 0)


def test_decode_before_open_is_an_error(random_checkpoint):
    backend = get_backend("torch", checkpoint=random_checkpoint, precision="fp32", device="cpu")
    with pytest.raises(RuntimeError, match="before open"):
        backend.decode(torch.zeros(1, 2))
    with backend:
        assert backend.decode(np.zeros((3, 2), dtype=np.float32)).shape == (3, 1, 28, 28)
    assert not backend.is_open


@pytest.mark.parametrize(
    "z, message",
    [
        (torch.zeros(4, 3), r"shape \[B, 2\]"),
        (torch.zeros(0, 2), r"shape \[B, 2\]"),
        (torch.zeros(2), r"shape \[B, 2\]"),
        (torch.zeros(4, 2, dtype=torch.float64), "must be float32"),
        (torch.tensor([[0.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[float("inf"), 0.0]]), "NaN or Inf"),
        ([[0.0, 0.0]], "torch tensor or numpy array"),
        (torch.tensor(1.0), r"shape \[B, 2\]"),  # 0-d: no rows to count
        (np.zeros((), dtype=np.float32), r"shape \[B, 2\]"),
        (np.float32(1.0), "torch tensor or numpy array"),
        (None, "torch tensor or numpy array"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_bad_latents_are_rejected_clearly(random_checkpoint, backend, z, message):
    with open_sampler(random_checkpoint, backend, device="cpu") as sampler, pytest.raises(UserError, match=message):
        sampler.decode(z)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_numpy_latents_of_any_layout_decode_like_a_tensor(random_checkpoint, backend):
    z = np.random.default_rng(3).standard_normal((6, 2), dtype=np.float32)
    read_only = z[::-1].copy()
    read_only.flags.writeable = False
    with open_sampler(random_checkpoint, backend, device="cpu") as sampler:
        expected = sampler.decode(torch.from_numpy(z[::-1].copy()))
        for layout in (z[::-1], np.asfortranarray(z[::-1]), read_only):
            assert torch.equal(sampler.decode(layout), expected)


def test_reduced_precision_overflow_is_caught(random_checkpoint, monkeypatch):
    with open_sampler(random_checkpoint, "ort", "fp16", "cpu") as sampler:
        monkeypatch.setattr(sampler.backend, "_decode", lambda z, out: torch.full((len(z), 1, 28, 28), float("nan")))
        with pytest.raises(RuntimeFailure, match="NaN/Inf"):
            sampler.decode(torch.zeros(2, 2))


def test_auto_prefers_onnx_runtime_on_the_cpu_and_says_why(monkeypatch):
    name, device, why = choose_backend("checkpoint", None, "cpu")
    assert (name, device) == ("ort", "cpu") and "chose ort on cpu" in why
    monkeypatch.setattr(sampler_module, "available_providers", list)
    name, _, why = choose_backend("checkpoint", None, "cpu")
    assert name == "torch" and "onnxruntime is not installed" in why
    with pytest.raises(UserError, match="no backend can run"):
        choose_backend("onnx", None, "cpu")


def test_auto_on_a_machine_without_gpu_explains_the_skip():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, _, why = choose_backend("checkpoint", None, "auto")
    assert "torch sees no CUDA GPU" in why


def test_backends_refuse_files_they_cannot_run(tmp_path, random_checkpoint):
    onnx_path = cached_onnx(random_checkpoint, "fp32")
    with pytest.raises(UserError, match="--backend torch needs a checkpoint"):
        open_sampler(onnx_path, "torch")
    with pytest.raises(UserError, match="unknown kind of file"):
        open_sampler(tmp_path / "model.bin")
    with pytest.raises(UserError, match="no such file"):
        open_sampler(tmp_path / "missing.pth")
    with pytest.raises(UserError, match="--backend must be one of"):
        open_sampler(random_checkpoint, "tensorflow")
    with pytest.raises(UserError, match="--precision must be one of"):
        open_sampler(random_checkpoint, "torch", "int4")
    with pytest.raises(UserError, match="int8 runs on --backend ort"):
        open_sampler(random_checkpoint, "torch", "int8")
    with pytest.raises(UserError, match="fp32 model, not fp16"):
        open_sampler(onnx_path, "ort", "fp16")


def test_onnx_export_is_cached_by_checkpoint_content(random_checkpoint):
    first = cached_onnx(random_checkpoint, "fp16")
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(random_checkpoint, "fp16") == first and first.stat().st_mtime_ns == stamp


def test_trt_without_tensorrt_names_what_to_install(random_checkpoint):
    from vae_rt.engine import engine_skip_reason

    reason = engine_skip_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(UserError, match="--backend trt: ") as info:
        open_sampler(random_checkpoint, "trt")
    assert reason in str(info.value) and ("pip install 'vae-rt[gpu]'" in reason or "no CUDA GPU" in reason)


@pytest.mark.parametrize("direct_io", [True, False], ids=["O_DIRECT", "buffered"])
def test_npy_stream_equals_the_in_memory_samples(random_checkpoint, tmp_path, monkeypatch, direct_io):
    if not direct_io:
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
    with output._open_stream(path, chunks[0].tobytes()) as f:
        if not isinstance(f, output._DirectFile):
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
    with output._open_stream(path, bytes(BLOCK)) as f:
        if not isinstance(f, output._DirectFile):
            pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")
        for batch in batches:
            aligned = block_aligned_empty(tuple(batch.shape), torch.float32)
            f.write(aligned.copy_(batch).numpy())
        assert len(f.buffer) == BLOCK  # never grew: nothing went through it
    assert path.read_bytes() == bytes(BLOCK) + b"".join(b.numpy().tobytes() for b in batches)


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(random_checkpoint, tmp_path, monkeypatch):
    def refuse(self, data):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(output._DirectFile, "write", refuse)
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

    monkeypatch.setattr(output, "_open_stream", full_disk)
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


def test_manifold_latents_span_the_normal_quantiles():
    z = manifold_latents(3, 2)
    assert z.shape == (9, 2)
    assert z[0].tolist() == pytest.approx([-1.6449, 1.6449], abs=1e-3)  # top left: low z0, high z1
    assert z[8].tolist() == pytest.approx([1.6449, -1.6449], abs=1e-3)
    with pytest.raises(UserError, match="2-D latent space"):
        manifold_latents(3, 8)
