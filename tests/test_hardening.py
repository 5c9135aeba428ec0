"""Nothing lost, bounded memory, safe under concurrency and out-of-memory: proved with real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_runner import assert_one_line_error

from vae_rt.backends import BaseBackend
from vae_rt.files import STAGING_PREFIX, TEMPORARY_SUFFIX, remove_leftovers, sha256_file
from vae_rt.sampler import Sampler, draw_latents

CLI = [sys.executable, "-m", "vae_rt"]


def _start(args, tmp_path, env=None):
    return subprocess.Popen(
        CLI + [str(a) for a in args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sample_killed_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    proc = _start(["sample", "--backend", "torch", "-n", 3_000_000, "--out", "big.npy"], tmp_path)
    try:
        assert _wait_for(lambda: any(p.stat().st_size > 10 << 20 for p in tmp_path.glob(".big.npy.*.tmp")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (tmp_path / "big.npy").exists()
    (leftover,) = tmp_path.glob(".big.npy.*")
    os.utime(leftover, (time.time() - 3600,) * 2)  # an hour later
    remove_leftovers(tmp_path, ".big.npy.", TEMPORARY_SUFFIX)  # what the next write of big.npy does first
    assert not leftover.exists()


def test_export_killed_mid_write_leaves_no_file_under_the_final_name(tmp_path, random_checkpoint):
    proc = _start(["export", random_checkpoint, "--out-dir", "out", "--precision", "fp32", "--no-engine"], tmp_path)
    try:
        assert _wait_for(lambda: any((tmp_path / "out").glob(".vae-rt-staging.*/.random.fp32.onnx.*.tmp")), timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    final = tmp_path / "out" / "random.fp32.onnx"
    assert not final.exists() and not (tmp_path / "out" / "random.fp32.onnx.json").exists()
    (staging,) = (tmp_path / "out").iterdir()
    os.utime(staging, (time.time() - 3600,) * 2)  # an hour later
    remove_leftovers(tmp_path / "out", STAGING_PREFIX)  # what the next export into out does first
    assert not staging.exists()


def test_onnx_with_other_io_names_exits_2(tmp_path):
    path = tmp_path / "other.onnx"
    io = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", 2]) for name in ("x", "y")]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "other", io[:1], io[1:])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    assert_one_line_error(["sample", "--model", path, "--backend", "ort", "--out", tmp_path / "s.png"], "expected one input 'z'")


# The CLI on the first 12288 training images: an epoch of 0.4-2 s on the machines here, so a kill lands inside one.
SMALL_TRAIN_CLI = [
    sys.executable, "-c",
    (
        "import sys, vae_rt.train\n"
        "train, test = vae_rt.train.load_mnist(None)\n"
        "vae_rt.train.load_mnist = lambda data_dir: (train[:12288], test[:512])\n"
        "from vae_rt.cli import main\n"
        "sys.argv[0] = 'vae-rt'\n"
        "main()\n"
    ),
]


def test_training_killed_mid_epoch_resumes_losing_at_most_that_epoch(tmp_path):
    args = SMALL_TRAIN_CLI + ["train", "--epochs", "2", "--out", "run", "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: (tmp_path / "run" / "checkpoint_1.pth").exists())
        time.sleep(0.1)  # inside epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (tmp_path / "run" / "checkpoint_2.pth").exists()
    done = subprocess.run(args + ["--resume"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_two_processes_exporting_the_same_cache_entry_end_with_one_valid_file(tmp_path, random_checkpoint):
    env = {"VAE_RT_CACHE_DIR": str(tmp_path / "cache")}
    code = f"from vae_rt.resolve import cached_onnx; print(cached_onnx(__import__('pathlib').Path({str(random_checkpoint)!r}), 'fp32'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE) for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    (path,) = paths
    onnx.checker.check_model(onnx.load(path), full_check=True)
    manifest = json.loads(Path(path + ".json").read_text())
    assert manifest["sha256"] == sha256_file(path)
    leftovers = [p.name for p in (tmp_path / "cache" / "onnx").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_streaming_a_large_npy_keeps_resident_memory_bounded(tmp_path):
    n = 200_000  # 627 MB (598 MiB) of float32 images, more than twice the bound below
    script = (
        "import resource, sys\n"
        "from vae_rt.cli import main\n"
        "import vae_rt.sampler, vae_rt.backends.pt\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"sys.argv = ['vae-rt', 'sample', '--backend', 'torch', '-n', '{n}', '--out', 'x.npy']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    before, after = (int(kib) / 1024 for kib in done.stdout.strip().splitlines()[-1].split())
    output_mib = (tmp_path / "x.npy").stat().st_size / 2**20
    assert output_mib > 590
    # Peak resident memory grows by a few batches, not with the output. (The libraries themselves,
    # torch + onnxruntime + onnx, take 0.7-1 GiB before any sampling, depending on the machine.)
    assert after - before < 256, f"peak RSS grew {after - before:.0f} MiB (from {before:.0f}) for {output_mib:.0f} MiB of output"
    images = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert images.shape == (n, 1, 28, 28) and 0 <= float(images[-1].min()) and float(images[-1].max()) <= 1


class _SmallMemoryBackend(BaseBackend):
    """A backend whose 'device' fits at most `capacity` images per call, like a GPU running out of memory."""

    name = "fake"

    def __init__(self, capacity: int):
        super().__init__("fp32", "cpu")
        self.capacity, self.z_dim, self.calls = capacity, 2, []

    def _open(self):
        pass

    def _close(self):
        pass

    def _decode(self, z, out):
        self.calls.append(len(z))
        if len(z) > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        images = torch.as_tensor(z).sum(dim=1).view(-1, 1, 1, 1).expand(-1, 1, 28, 28)  # host latents come as numpy
        return images.clone() if out is None else out.copy_(images)


def test_out_of_memory_halves_the_batch_and_retries(caplog):
    backend = _SmallMemoryBackend(capacity=300)
    sampler = Sampler(backend, batch_size=1000)
    z = draw_latents(1000, 2, seed=0)
    images = sampler.decode(z)
    assert torch.equal(images.view(1000, -1)[:, 0], z.sum(dim=1))
    assert sampler.batch_size == 250 and backend.calls[:3] == [1000, 500, 250]
    assert "retrying with batch size 250" in caplog.text
    backend.calls.clear()
    assert sampler.sample(600, seed=1).shape == (600, 1, 28, 28)
    assert max(backend.calls) <= 250


def test_out_of_memory_at_batch_one_is_raised():
    sampler = Sampler(_SmallMemoryBackend(capacity=0), batch_size=4)
    with pytest.raises(torch.OutOfMemoryError):
        sampler.decode(torch.zeros(4, 2))


def test_other_errors_are_not_mistaken_for_out_of_memory():
    backend = _SmallMemoryBackend(capacity=10)

    def broken(z, out):
        raise ValueError("not a memory problem")

    backend._decode = broken
    with pytest.raises(ValueError, match="not a memory problem"):
        Sampler(backend, batch_size=4).decode(torch.zeros(2, 2))


def test_unwritable_output_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere: permissions cannot be tested")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    assert_one_line_error(["sample", "-n", 4, "--out", folder / "x.png"], "is not writable")


def test_output_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(["sample", "-n", 4, "--out", tmp_path / "afile" / "x.png"], "does not exist")


@pytest.mark.parametrize("suffix", [".pth", ".onnx", ".plan"])
@pytest.mark.parametrize("content", [b"", np.random.default_rng(7).bytes(4096)], ids=["empty", "random"])
def test_empty_or_random_model_files_exit_2(tmp_path, suffix, content):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    backend = {".pth": "torch", ".onnx": "ort", ".plan": "trt"}[suffix]
    assert_one_line_error(["sample", "--model", path, "--backend", backend, "--out", tmp_path / "x.png"])
