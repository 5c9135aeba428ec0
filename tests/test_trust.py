"""Off the happy path (issue 14): verified artifacts, protected runs, bounded work, clean signals.

Each test stands for a class of faults, not one case: every artifact read from a cache, every backend's
`out=`, every command's limits and --device rule.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_runner import assert_one_line_error, run
from onnx import TensorProto, helper, numpy_helper

import vae_rt.output as output_module
import vae_rt.train as train_module
from vae_rt.artifacts import OnnxModelError
from vae_rt.backends import get_backend
from vae_rt.backends.ort import OrtBackend
from vae_rt.cache import onnx_entry_problem
from vae_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vae_rt.data import load_mnist
from vae_rt.errors import RuntimeFailure, Terminated, UserError, sigterm_as_interrupt
from vae_rt.files import (
    STAGING_PREFIX,
    TEMPORARY_SUFFIX,
    atomic_path,
    new_folder,
    remove_leftovers,
    sha256_file,
    staging_dir,
)
from vae_rt.model import VAE, VAEConfig
from vae_rt.output import check_output, stream_npy
from vae_rt.resolve import cached_onnx
from vae_rt.sampler import Sampler, latent_batches, open_sampler
from vae_rt.train import DEFAULTS, TrainOptions, resume_point, train

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "vae_rt"]


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[bool]:
    """A tmpfs at `path` with mount `options` (yields True), or False where this process may not mount one."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        yield False
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", str(path)], check=False)


# ---------------------------------------------------------------- 1. silent wrong answers


ENDINGS = {  # the last nodes of a tiny decoder, from its logits "h" to "image": (op, inputs, output)
    "sigmoid": [("Sigmoid", ["h"], "image")],
    "sigmoid-flatten": [("Sigmoid", ["h"], "p"), ("Flatten", ["p"], "image")],
    "reciprocal": [("Exp", ["h"], "e"), ("Add", ["one", "e"], "d"), ("Reciprocal", ["d"], "image")],
    "div": [("Exp", ["h"], "e"), ("Add", ["e", "one"], "d"), ("Div", ["one", "d"], "image")],
    "logits": [("Identity", ["h"], "image")],
    "relu": [("Relu", ["h"], "image")],
    "reciprocal-of-exp": [("Exp", ["h"], "e"), ("Reciprocal", ["e"], "image")],
}


def _tiny_onnx(path: Path, z_shape=("batch", 2), image_shape=("batch", 784), z_type=TensorProto.FLOAT, poison=False,
               computed_width=None, one_row=False, ending="sigmoid") -> Path:
    """A one-layer decoder written with onnx.helper (no exporter: fast), with the I/O it is told to have
    (and, given `computed_width` or `one_row`, a graph that computes images of that width, or one image
    for the whole batch, whatever it declares), ending in `ending` (a key of `ENDINGS`)."""
    weight = np.full((z_shape[1], computed_width or image_shape[1]), 0.01, np.float32)
    if poison:
        weight[0, 0] = np.nan
    nodes = [helper.make_node("Cast", ["z"], ["z32"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["z32", "W"], ["h"])]
    if one_row:
        nodes.append(helper.make_node("ReduceMean", ["h", "axis0"], ["h_mean"], keepdims=1))
    nodes += [helper.make_node(op, [{"h": "h_mean" if one_row else "h"}.get(i, i) for i in inputs], [output])
              for op, inputs, output in ENDINGS[ending]]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("z", z_type, list(z_shape))],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(image_shape))],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([0], np.int64), "axis0"),
         numpy_helper.from_array(np.array(1, np.float32), "one")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_tiny_onnx_with_the_right_io_opens(tmp_path):
    """The control for the refusals below: the hand-made decoder itself is fine."""
    with OrtBackend(_tiny_onnx(tmp_path / "ok.onnx"), device="cpu") as backend:
        assert backend.decode(torch.zeros(3, 2)).shape == (3, 1, 28, 28)


@pytest.mark.parametrize(
    "io, has",
    [
        ({"image_shape": ("batch", 392)}, "'image' float ['batch', 392]"),
        ({"image_shape": ("batch", 1000)}, "'image' float ['batch', 1000]"),
        ({"z_shape": (1, 2), "image_shape": (1, 784)}, "'z' float [1, 2]"),
        ({"image_shape": (4, 784)}, "'image' float [4, 784]"),
        ({"z_type": TensorProto.DOUBLE}, "'z' double"),
    ],
    ids=["image-392", "image-1000", "fixed-batch", "fixed-output-batch", "float64-input"],
)
def test_onnx_whose_io_does_not_fit_is_refused_at_open_saying_what_it_has_and_needs(tmp_path, io, has):
    path = _tiny_onnx(tmp_path / "odd.onnx", **io)
    with pytest.raises(OnnxModelError) as caught:
        OrtBackend(path, device="cpu")
    message = str(caught.value)
    assert has in message and "needed float [batch, z_dim] and float [batch, 784], batch a dynamic axis" in message
    assert_one_line_error(["sample", "--model", path, "-n", 4, "--out", tmp_path / "s.npy"], has)
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("ending", ["sigmoid-flatten", "reciprocal", "div"])
def test_onnx_whose_output_is_a_sigmoid_written_another_way_opens(tmp_path, ending):
    with OrtBackend(_tiny_onnx(tmp_path / "ok.onnx", ending=ending), device="cpu") as backend:
        images = backend.decode(torch.randn(3, 2) * 100)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("ending, source", [("logits", "a MatMul node"), ("relu", "a Relu node"), ("reciprocal-of-exp", "a Reciprocal node")])
def test_onnx_whose_output_is_not_a_sigmoid_is_refused_at_open(tmp_path, ending, source):
    """Logits or any other values outside [0, 1] would be served as images: uint8 pixels would wrap around."""
    path = _tiny_onnx(tmp_path / "logits.onnx", ending=ending)
    with pytest.raises(OnnxModelError, match=f"its output 'image' comes from {source}, not a sigmoid"):
        OrtBackend(path, device="cpu")
    assert_one_line_error(["sample", "--model", path, "-n", 4, "--dtype", "uint8", "--out", tmp_path / "s.npy"], "not a sigmoid")
    assert not (tmp_path / "s.npy").exists()


def test_onnx_with_non_finite_weights_is_refused_naming_the_weight(tmp_path):
    path = _tiny_onnx(tmp_path / "nan.onnx", poison=True)
    with pytest.raises(OnnxModelError, match="weight 'W' has 1 NaN/Inf value"):
        OrtBackend(path, device="cpu")


def _poisoned(tmp_path: Path, bundled: Path, kind: str) -> Path:
    state = load_checkpoint(bundled)[0].state_dict()
    if kind == "nan":
        state["fc5.weight"][3, 7] = float("nan")
    elif kind == "inf":
        state["fc1.bias"][0] = float("-inf")
    elif kind == "meta":
        state = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    elif kind == "int":
        state["fc6.bias"] = state["fc6.bias"].long()
    path = tmp_path / f"{kind}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("nan", "fc5.weight has 1 NaN/Inf value of 131072"),
    ("inf", "fc1.bias has 1 NaN/Inf value of 512"),
    ("meta", "fc1.weight holds no values (a meta tensor"),
    ("int", "fc6.bias is torch.int64, not floating point"),
])
def test_damaged_weights_are_refused_at_load_naming_the_tensor(tmp_path, bundled, kind, message):
    path = _poisoned(tmp_path, bundled, kind)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_checkpoint(path)
    for args in (["sample", "--model", path, "-n", 4, "--out", tmp_path / "s.npy"], ["eval", path, "--limit", 10],
                 ["export", path, "--no-engine", "--out-dir", tmp_path / "ex"], ["compare", "--model", path]):
        assert_one_line_error(args, message)
    assert not (tmp_path / "s.npy").exists() and not list((tmp_path / "ex").glob("*.onnx"))


@pytest.fixture(scope="module")
def private_onnx_cache(tmp_path_factory, random_checkpoint) -> Iterator[Path]:
    """A cache folder of its own holding the export of `random_checkpoint`: the tests below damage it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VAE_RT_CACHE_DIR", str(tmp_path_factory.mktemp("onnx-cache")))
    yield cached_onnx(random_checkpoint, "fp32")
    mp.undo()


def _damage(path: Path, how: str, tmp_path: Path) -> None:
    manifest_path = path.with_name(path.name + ".json")
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "replaced":  # another valid decoder with the same I/O: only its own sha256 tells
        _tiny_onnx(tmp_path / "other.onnx")
        shutil.copy(tmp_path / "other.onnx", path)
    elif how == "no-manifest":
        manifest_path.unlink()
    elif how == "manifest-io":  # the manifest rewritten to match the file, but not the I/O the file has
        manifest = json.loads(manifest_path.read_text())
        manifest["outputs"][0]["shape"] = ["batch", 392]
        manifest_path.write_text(json.dumps(manifest))
    elif how == "manifest-malformed":
        manifest = json.loads(manifest_path.read_text())
        manifest["source_checkpoint"] = None
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["truncated", "replaced", "no-manifest", "manifest-io", "manifest-malformed"])
def test_a_damaged_cache_entry_is_never_served(private_onnx_cache, random_checkpoint, tmp_path, how):
    entry = tmp_path / "entry" / private_onnx_cache.name
    entry.parent.mkdir()
    shutil.copy(private_onnx_cache, entry)
    shutil.copy(private_onnx_cache.with_name(entry.name + ".json"), entry.with_name(entry.name + ".json"))
    digest = sha256_file(random_checkpoint)
    assert onnx_entry_problem(entry, digest, "fp32") is None
    _damage(entry, how, tmp_path)
    assert onnx_entry_problem(entry, digest, "fp32") is not None


def test_a_replaced_cache_file_is_made_again_with_one_warning_naming_the_cache(private_onnx_cache, random_checkpoint, tmp_path, caplog):
    _damage(private_onnx_cache, "replaced", tmp_path)
    with caplog.at_level(logging.WARNING), open_sampler(random_checkpoint, "ort", device="cpu") as sampler:
        images = sampler.decode(torch.ones(4, 2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(private_onnx_cache) in warnings[0] and "$VAE_RT_CACHE_DIR" in warnings[0], warnings
    assert sha256_file(private_onnx_cache) == json.loads(private_onnx_cache.with_name(private_onnx_cache.name + ".json").read_text())["sha256"]
    with torch.no_grad():
        expected = load_checkpoint(random_checkpoint)[0].decode(torch.ones(4, 2))
    torch.testing.assert_close(images.view(4, -1), expected, atol=1e-5, rtol=0)


def test_an_altered_unpacked_mnist_file_is_unpacked_again(tmp_path, mnist_dir, monkeypatch, caplog):
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))
    test_images = load_mnist(mnist_dir)[1].clone()
    unpacked = tmp_path / "mnist" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(unpacked.read_bytes())
    data[5000:5100] = bytes(100)  # a few pixels of the first test image, blanked: still a valid IDX file
    unpacked.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = load_mnist(mnist_dir)[1]
    assert torch.equal(again, test_images)
    assert any("t10k-images-idx3-ubyte" in r.getMessage() and "$VAE_RT_CACHE_DIR" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 2. crashes


BAD_OUTS = {
    "too-few-rows": lambda: torch.empty(2, 1, 28, 28),
    "too-many-rows": lambda: torch.empty(8, 1, 28, 28),
    "flat": lambda: torch.empty(4, 784),
    "float64": lambda: torch.empty(4, 1, 28, 28, dtype=torch.float64),
    "int32": lambda: torch.empty(4, 1, 28, 28, dtype=torch.int32),
    "float16": lambda: torch.empty(4, 1, 28, 28, dtype=torch.float16),
    "other-device": lambda: torch.empty(4, 1, 28, 28, device="meta"),
    "not-contiguous": lambda: torch.empty(28, 28, 1, 4).permute(3, 2, 0, 1),
    "not-a-tensor": lambda: np.empty((4, 1, 28, 28), np.float32),
}


@pytest.fixture(scope="module")
def cpu_backends(random_checkpoint, private_onnx_cache):
    opened = [get_backend("torch", checkpoint=random_checkpoint, device="cpu").open(),
              get_backend("ort", onnx_path=private_onnx_cache, device="cpu").open()]
    yield opened
    for backend in opened:
        backend.close()


@pytest.mark.parametrize("bad", list(BAD_OUTS))
def test_every_backend_refuses_an_out_it_cannot_write_into(cpu_backends, bad):
    for backend in cpu_backends:  # trt shares the check: it is the base class's, run before any engine sees `out`
        with pytest.raises(UserError, match="^out "):
            backend.decode(torch.zeros(4, 2), out=BAD_OUTS[bad]())
        good = torch.empty(4, 1, 28, 28)
        assert backend.decode(torch.zeros(4, 2), out=good).data_ptr() == good.data_ptr()


def test_the_sampler_checks_out_before_splitting_it_into_batches(cpu_backends):
    sampler = Sampler(cpu_backends[1], batch_size=3)
    with pytest.raises(UserError, match=r"shape \[12, 1, 28, 28\], needed \[10, 1, 28, 28\]"):
        sampler.decode(torch.zeros(10, 2), out=torch.empty(12, 1, 28, 28))


def test_a_model_of_other_images_than_mnist_is_refused_by_every_command(tmp_path):
    path = tmp_path / "x100.pth"
    save_checkpoint(path, VAE(VAEConfig(x_dim=100)))
    message = "a model of 100-pixel images; vae-rt serves 28x28 MNIST images (x_dim 784)"
    for args in (["sample", "--model", path, "-n", 4, "--out", tmp_path / "s.png"], ["manifold", "--model", path, "--out", tmp_path / "m.png"],
                 ["eval", path, "--limit", 10], ["export", path, "--no-engine", "--out-dir", tmp_path / "ex"]):
        assert_one_line_error(args, message)


@pytest.mark.parametrize("seed", [2**63, 2**64, -1])
def test_seeds_outside_64_bits_signed_are_refused_by_every_command(tmp_path, seed):
    with pytest.raises(UserError, match=r"seed must be between 0 and 2\*\*63-1"):
        next(latent_batches(4, 2, seed, 4))
    with pytest.raises(UserError, match=r"--seed must be between 0 and 2\*\*63-1"):
        train(tmp_path / "run", TrainOptions(seed=seed), data_dir=tmp_path / "no-data")
    for args in (["sample", "-n", 4, "--out", tmp_path / "s.png"], ["eval", "--limit", 10], ["compare", "-n", 4],
                 ["train", "--epochs", 1, "--out", tmp_path / "run"]):
        assert_one_line_error([*args, "--seed", seed], "'--seed'", "9223372036854775807" if seed > 0 else "greater than or equal to 0")


def test_the_largest_seed_works_everywhere_including_the_trainers_per_epoch_seeds(tmp_path, monkeypatch, mnist_dir):
    assert next(latent_batches(4, 2, 2**63 - 1, 4)).shape == (4, 2)
    images = load_mnist(mnist_dir)[0]
    monkeypatch.setattr(train_module, "load_mnist", lambda data_dir: (images[:256], images[-64:]))
    history = train(tmp_path / "run", TrainOptions(epochs=1, seed=2**63 - 1), device="cpu")
    assert len(history) == 1


def test_batches_are_made_as_they_are_needed_whatever_n(random_checkpoint):
    from vae_rt.backends import chunk_bounds

    assert not isinstance(chunk_bounds(10, 3), list)  # a list of every batch of -n 10**12 filled the memory
    with open_sampler(random_checkpoint, "torch", device="cpu", batch_size=16) as sampler:
        first = next(sampler.iter_samples(10**12, seed=0))
    assert first.shape == (16, 1, 28, 28)


# ---------------------------------------------------------------- 3. work lost


def _fake_checkpoint(path: Path, epoch: int, **options) -> None:
    """A resumable checkpoint as the trainer writes it, without training: the resume logic reads no more."""
    recorded = asdict(TrainOptions(**options).resolved())
    save_checkpoint(path, VAE(VAEConfig(z_dim=recorded["z_dim"])), metrics=[{"epoch": e} for e in range(1, epoch + 1)],
                    train_options=recorded, optimizer={"state": {}, "param_groups": []})


def test_training_afresh_into_a_folder_with_a_run_is_refused_and_nothing_is_touched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _fake_checkpoint(run_dir / "checkpoint_3.pth", 3)
    (run_dir / "model.pth").write_bytes(b"the finished model")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(UserError, match=r"holds a training run \(model.pth, checkpoint_3.pth\); continue it with --resume, or give another --out"):
        train(run_dir, TrainOptions(epochs=1), data_dir=tmp_path / "no-data", device="cpu")
    assert_one_line_error(["train", "--epochs", 1, "--out", run_dir], "continue it with --resume")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_resume_with_options_that_contradict_the_run_says_which(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint_1.pth", 1)
    with pytest.raises(UserError) as caught:
        train(tmp_path, TrainOptions(z_dim=16, lr=0.5, epochs=4), data_dir=tmp_path / "no-data", device="cpu", resume=True)
    assert "--z-dim 16 (the run has 2)" in str(caught.value) and "--lr 0.5 (the run has 0.001)" in str(caught.value)
    assert "epochs" not in str(caught.value)  # more epochs is what resuming is for
    assert_one_line_error(["train", "--out", tmp_path, "--resume", "--z-dim", 16], "--z-dim 16 (the run has 2)")
    recorded = DEFAULTS
    assert TrainOptions(z_dim=2, epochs=20, keep=1).resolved(recorded) == TrainOptions(**{**asdict(DEFAULTS), "epochs": 20, "keep": 1})


def test_resume_falls_back_to_the_newest_readable_checkpoint_with_a_warning(tmp_path, caplog):
    for epoch in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint_{epoch}.pth", epoch)
    last = tmp_path / "checkpoint_3.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        path, ckpt = resume_point(tmp_path)
    assert path == tmp_path / "checkpoint_2.pth" and len(ckpt["metrics"]) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint_2.pth" in warning and "checkpoint_3.pth" in warning
    damaged = torch.load(tmp_path / "checkpoint_2.pth", weights_only=True)
    damaged["optimizer"] = {}  # read fine, but no optimizer state to resume
    torch.save(damaged, tmp_path / "checkpoint_2.pth")
    assert resume_point(tmp_path)[0] == tmp_path / "checkpoint_1.pth"
    for epoch in (1, 2):
        (tmp_path / f"checkpoint_{epoch}.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed from"):
        resume_point(tmp_path)


def test_sigterm_is_handled_like_ctrl_c_the_temporary_file_is_removed(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt(), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_sample_sent_sigterm_mid_write_exits_143_and_leaves_nothing(tmp_path):
    proc = subprocess.Popen(CLI + ["sample", "--backend", "torch", "-n", "3000000", "--out", "big.npy"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(p.stat().st_size > 10 << 20 for p in tmp_path.glob(".big.npy.*.tmp")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert stderr.decode().strip().splitlines()[-1].startswith("terminated: the file being written was removed")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_train_says_which_checkpoint_is_on_disk(tmp_path, monkeypatch, mnist_dir):
    images = load_mnist(mnist_dir)[0]
    monkeypatch.setattr(train_module, "load_mnist", lambda data_dir: (images[:256], images[-64:]))
    real_train = train_module._Run._train

    def interrupted_in_epoch_2(self, epoch, progress):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_train(self, epoch, progress)

    monkeypatch.setattr(train_module._Run, "_train", interrupted_in_epoch_2)
    code, output = run("train", "--epochs", 3, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 130, output
    assert "interrupted: training stopped; " in output and "checkpoint_1.pth holds the last finished epoch; continue with --resume" in output
    assert "nothing was written" not in output


def test_folders_a_failed_run_created_are_removed_again_and_no_others(tmp_path):
    with pytest.raises(KeyboardInterrupt), new_folder(tmp_path / "new" / "deeper", "out_dir"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeFailure), new_folder(tmp_path / "kept" / "written" / "empty", "out_dir") as made:
        (made.parent / "result.txt").write_text("written before the failure")
        raise RuntimeFailure("late failure")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["kept", "kept/written", "kept/written/result.txt"]
    with pytest.raises(KeyboardInterrupt), new_folder(tmp_path / "up" / ".." / "over", "out_dir"):
        raise KeyboardInterrupt
    assert not (tmp_path / "up").exists() and not (tmp_path / "over").exists()


@pytest.mark.parametrize("command", [["export", "--precision", "fp32,int8", "--out-dir"], ["train", "--epochs", 1, "--out"]])
def test_a_run_refused_for_missing_mnist_leaves_no_folder_it_made(tmp_path, monkeypatch, command):
    monkeypatch.setenv("VAE_RT_MNIST_DIR", str(tmp_path / "no-mnist"))
    assert_one_line_error([*command, tmp_path / "new" / "deeper"], "no-mnist does not exist")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 4. unbounded work


def test_a_npy_the_disk_cannot_hold_is_refused_before_any_work_with_both_numbers(tmp_path):
    with pytest.raises(UserError, match=r"needs 3\.1 PB, the file system has .* free"):
        check_output(tmp_path / "x.npy", 10**12, "float32")
    assert_one_line_error(["sample", "-n", 10**12, "--out", tmp_path / "x.npy"], "needs 3.1 PB", "free")
    assert list(tmp_path.iterdir()) == []


def test_decoding_stops_at_the_first_failed_write(tmp_path, monkeypatch):
    produced = []

    def batches():
        for _ in range(1000):
            produced.append(1)
            yield torch.zeros(64, 1, 28, 28)

    with mounted_tmpfs(tmp_path / "small", "size=1m") as mounted:
        if not mounted:  # no tmpfs here: a stream whose writes fail the way a full disk's do
            monkeypatch.setattr(output_module, "open_append_stream", _full_after_one_megabyte)
        with pytest.raises(RuntimeFailure, match="No space left on device"):
            stream_npy(batches(), 64000, tmp_path / "small" / "x.npy")
        assert len(produced) < 20, f"decoded {len(produced)} batches after the disk filled up"
        assert list((tmp_path / "small").iterdir()) == []


def test_an_export_that_fills_the_disk_names_the_folder_and_leaves_it_empty(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=1500k") as mounted:  # room for the checks, not for the 2.1 MB file
        if not mounted:
            pytest.skip("needs a small tmpfs: root on Linux")
        assert_one_line_error(["export", "--precision", "fp32", "--no-engine", "--out-dir", tmp_path / "small"],
                              f"{tmp_path / 'small'}: No space left on device")
        assert list((tmp_path / "small").iterdir()) == []


@contextlib.contextmanager
def _full_after_one_megabyte(path: Path, header: bytes) -> Iterator[object]:
    class FullStream:
        size = 0

        def write(self, data) -> None:
            self.size += memoryview(data).nbytes
            if self.size > 1 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    yield FullStream()


@pytest.mark.parametrize("args, fragments", [
    (["eval", "--iw-samples", 10**9], ["'--iw-samples'", "100000"]),
    (["bench", "--duration", "inf"], ["--duration must be between 0 and 600 seconds"]),
    (["bench", "--duration", "nan"], ["--duration must be between 0 and 600 seconds"]),
    (["bench", "--duration", 1e9], ["--duration must be between 0 and 600 seconds"]),
    (["bench", "--batch-sizes", 100_000_000], ["--batch-sizes must be integers between 1 and 4194304"]),
    (["compare", "-n", 10**12], ["'-n' / '--count'", "1000000"]),
    (["train", "--epochs", 10**9], ["'--epochs'", "10000"]),
    (["train", "--z-dim", 10**9], ["'--z-dim'", "4096"]),
    (["train", "--batch-size", 10**9], ["'--batch-size'", "60000"]),
])
def test_absurd_amounts_of_work_are_refused_with_their_limit(tmp_path, args, fragments):
    extra = ["--out", tmp_path / "run"] if args[0] == "train" else []
    assert_one_line_error([*args, *extra], *fragments)


@pytest.mark.parametrize("call, message", [
    (lambda: TrainOptions(epochs=10**9).resolved().check(), "--epochs must be between 1 and 10000"),
    (lambda: TrainOptions(z_dim=10**9).resolved().check(), "--z-dim must be between 1 and 4096"),
    (lambda: TrainOptions(batch_size=10**9).resolved().check(), "--batch-size must be between 1 and 60000"),
])
def test_the_library_refuses_the_same_amounts(call, message):
    with pytest.raises(UserError, match=message):
        call()


# ---------------------------------------------------------------- 5. messages that mislead


@pytest.mark.parametrize("problem", ["a-file", "read-only", "full"])
def test_cache_folder_problems_name_the_variable(tmp_path, monkeypatch, random_checkpoint, problem):
    cache = tmp_path / "cache"
    with contextlib.ExitStack() as stack:
        if problem == "a-file":
            cache.write_text("not a folder")
        else:
            options = "ro,size=1m" if problem == "read-only" else "size=1m"  # the ONNX export is 1.6 MB
            if not stack.enter_context(mounted_tmpfs(cache, options)):
                if problem == "read-only" or os.geteuid() == 0:
                    pytest.skip("cannot mount a tmpfs here, and root ignores permissions")
                cache.chmod(0o500)
        monkeypatch.setenv("VAE_RT_CACHE_DIR", str(cache))
        output = assert_one_line_error(["sample", "--model", random_checkpoint, "--backend", "ort", "-n", 4, "--out", tmp_path / "s.png"],
                                       "VAE_RT_CACHE_DIR")
        assert "--out-dir" not in output
        if problem != "full":
            assert_one_line_error(["eval", "--limit", 10], "VAE_RT_CACHE_DIR")


def test_export_name_with_a_folder_is_refused_before_the_work(tmp_path):
    assert_one_line_error(["export", "--name", "a/b", "--no-engine", "--out-dir", tmp_path / "ex"], "name must be a plain file name")
    assert not (tmp_path / "ex").exists()


def test_bench_json_where_nothing_can_be_written_fails_before_timing(tmp_path):
    assert_one_line_error(["bench", "--json", "/proc/x.json", "--batch-sizes", 1], "--json /proc/x.json", "not writable")
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
        if mounted:
            assert_one_line_error(["bench", "--json", tmp_path / "ro" / "b.json", "--batch-sizes", 1], "not writable (Read-only file system)")


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here (and root ignores permissions)")
        assert_one_line_error(["train", "--epochs", 1, "--out", tmp_path / "ro"], "--out", "not writable (Read-only file system)")
        assert_one_line_error(["export", "--no-engine", "--out-dir", tmp_path / "ro"], "out_dir", "not writable")


def test_a_failed_write_names_the_file_asked_for_never_the_temporary_one(tmp_path):
    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "missing" / "x.bin"):
        pass
    assert caught.value.filename == str(tmp_path / "missing")


# ---------------------------------------------------------------- 6. one rule for every command


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", [["sample", "-n", 4], ["manifold"], ["compare", "-n", 4], ["bench", "--batch-sizes", 1], ["train", "--epochs", 1]])
def test_device_cuda_without_a_gpu_exits_2_on_every_command(tmp_path, command):
    out = {"sample": ["--out", tmp_path / "s.png"], "manifold": ["--out", tmp_path / "m.png"], "train": ["--out", tmp_path / "run"]}
    assert_one_line_error([*command, *out.get(command[0], []), "--device", "cuda"], "'--device'", "torch sees no CUDA GPU")


def test_gpu_check_script_fails_when_its_steps_fail(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                          env={**os.environ, "PYTHON": "false"}, capture_output=True, text=True, check=False)
    assert done.returncode != 0, done.stdout


@pytest.mark.parametrize("backend", ["torch", "ort", "openvino"])
def test_weights_that_overflow_to_nan_images_fail_in_fp32_too(tmp_path, random_checkpoint, backend):
    pytest.importorskip("onnxruntime" if backend == "ort" else "openvino" if backend == "openvino" else "torch")
    model, _ = load_checkpoint(random_checkpoint)
    with torch.no_grad():
        model.fc4.weight.fill_(3e38)  # finite weights whose products overflow: NaN images, not a load error
    save_checkpoint(tmp_path / "huge.pth", model)
    code, output = run("sample", "--model", tmp_path / "huge.pth", "--backend", backend, "-n", 4, "--out", tmp_path / "x.npy")
    assert code == 1 and ("output has NaN/Inf" in output or "NaN" in output) and "Traceback" not in output, output
    assert not (tmp_path / "x.npy").exists()
    assert_one_line_error(["eval", tmp_path / "huge.pth", "--limit", 100], "NaN/Inf images", code=1)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_logits_that_overflow_to_saturated_images_are_refused_on_every_backend(tmp_path, random_checkpoint, backend):
    """Infinite logits give exact 0/1 images, finite, so no NaN scan sees them: export refuses such a
    decoder, and so does the torch backend that serves the same checkpoint."""
    model, _ = load_checkpoint(random_checkpoint)
    with torch.no_grad():
        model.fc6.weight.fill_(3e38)  # ReLU inputs are >= 0: logits +inf, never inf - inf
    save_checkpoint(tmp_path / "loud.pth", model)
    code, output = run("sample", "--model", tmp_path / "loud.pth", "--backend", backend, "-n", 4, "--out", tmp_path / "x.npy")
    assert code == 1 and "NaN/Inf from layer fc6_logits" in output and "Traceback" not in output, output
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("lie", [{"computed_width": 100}, {"one_row": True}], ids=["width-100", "one-row"])
@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_an_onnx_that_computes_another_shape_than_it_declares_fails_in_one_line(tmp_path, backend, lie):
    """One row for the whole batch must fail too: copied into [B, 784] it would broadcast, B equal images."""
    pytest.importorskip("onnxruntime" if backend == "ort" else "openvino")
    model = _tiny_onnx(tmp_path / "lie.onnx", **lie)  # declares [batch, 784]
    assert_one_line_error(["sample", "--model", model, "--backend", backend, "-n", 4, "--out", tmp_path / "x.npy"],
                          "failed", code=1)
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_an_onnx_without_an_opset_is_refused_alike_by_every_backend(tmp_path, backend):
    """A file cut short by a few bytes can lose its opset and still parse: OpenVINO ran such a model."""
    pytest.importorskip("onnxruntime" if backend == "ort" else "openvino")
    model = onnx.load(str(_tiny_onnx(tmp_path / "whole.onnx")))
    del model.opset_import[:]
    onnx.save(model, str(tmp_path / "no-opset.onnx"))
    assert_one_line_error(["sample", "--model", tmp_path / "no-opset.onnx", "--backend", backend, "-n", 4, "--out", tmp_path / "x.npy"],
                          "not a valid ONNX model", "opset_import")


def test_an_onnx_whose_weights_are_in_an_external_file_reads_them_from_beside_it(tmp_path, monkeypatch):
    model = onnx.load(str(_tiny_onnx(tmp_path / "inline.onnx")))
    onnx.save_model(model, str(tmp_path / "external.onnx"), save_as_external_data=True, location="external.data", size_threshold=0)
    monkeypatch.chdir(tmp_path.parent)  # not the working folder
    z = torch.randn(5, 2)
    with OrtBackend(tmp_path / "inline.onnx", device="cpu") as inline, OrtBackend(tmp_path / "external.onnx", device="cpu") as external:
        assert torch.equal(external.decode(z), inline.decode(z))
    (tmp_path / "external.data").unlink()
    with pytest.raises(OnnxModelError, match=r"not a readable ONNX model .*external\.data"):
        OrtBackend(tmp_path / "external.onnx", device="cpu")


@pytest.mark.parametrize("make", [lambda: torch.zeros(4, 2, dtype=torch.bfloat16), lambda: torch.zeros(4, 2).to_sparse(),
                                  lambda: torch.zeros(4, 2, device="meta"), lambda: torch.zeros(4, 2, dtype=torch.complex64).conj()],
                         ids=["bf16", "sparse", "meta", "conj"])
def test_latents_of_another_dtype_or_layout_are_refused_before_any_conversion(random_checkpoint, make):
    with open_sampler(random_checkpoint, "torch", device="cpu") as sampler, pytest.raises(UserError, match="latents must be"):
        sampler.decode(make())


def test_counts_sizes_and_seeds_must_be_integers_numpy_ones_included(random_checkpoint):
    with open_sampler(random_checkpoint, "torch", device="cpu") as sampler:
        assert torch.equal(sampler.sample(3, seed=np.int64(3)), sampler.sample(3, seed=3))
        with pytest.raises(UserError, match="n must be an integer at least 1, got 2.5"):
            sampler.sample(2.5)
    with pytest.raises(UserError, match="batch_size must be an integer between 1 and"):
        open_sampler(random_checkpoint, "torch", device="cpu", batch_size=2.5)


def test_a_device_or_pipe_is_never_replaced_by_an_output_file(tmp_path):
    assert_one_line_error(["sample", "-n", 4, "--out", "/dev/null"], "is not a regular file")
    assert Path("/dev/null").is_char_device()


def test_a_cache_record_that_cannot_be_written_names_the_cache_variable(tmp_path, monkeypatch):
    from vae_rt.cache import record_path, save_record

    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))
    (tmp_path / "tuning").write_text("a file in the way")
    with pytest.raises(UserError, match=r"cannot write .*VAE_RT_CACHE_DIR"):
        save_record(record_path("tuning", {"k": 1}), {"k": 1}, {"v": 2})


@pytest.mark.parametrize("args", [["export", "--no-engine", "--max-batch", 10**23], ["serve", "--max-batch", 10**12],
                                  ["serve", "--max-queue-delay-us", 10**12], ["serve", "--threads", 100_000]],
                         ids=["export-max-batch", "serve-max-batch", "serve-delay", "serve-threads"])
def test_serving_and_export_sizes_are_bounded(tmp_path, args):
    assert_one_line_error(args, "Invalid value")


def test_a_write_removes_what_a_killed_run_left_and_only_that(tmp_path):
    """Leftovers that no process holds locked and older than a minute go; a live writer's, a fresh one,
    another file's and a foreign file stay."""
    import fcntl

    hour_ago = time.time() - 3600
    leftover = tmp_path / f".m.onnx.abc123{TEMPORARY_SUFFIX}"
    held = tmp_path / f".m.onnx.def456{TEMPORARY_SUFFIX}"
    fresh = tmp_path / f".m.onnx.ghi789{TEMPORARY_SUFFIX}"
    other_file = tmp_path / f".n.onnx.abc123{TEMPORARY_SUFFIX}"
    foreign = tmp_path / ".m.onnx.backup.tmp"
    staging = tmp_path / f"{STAGING_PREFIX}xyz"
    for path in (leftover, held, fresh, other_file, foreign):
        path.write_bytes(b"partial")
    (staging / "sub").mkdir(parents=True)
    for path in (leftover, held, other_file, foreign, staging):
        os.utime(path, (hour_ago, hour_ago))
    with open(held, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # as a live writer in another process holds it
        with atomic_path(tmp_path / "m.onnx") as tmp:
            tmp.write_bytes(b"done")
    assert not leftover.exists() and held.exists() and fresh.exists() and other_file.exists() and foreign.exists()
    with staging_dir(tmp_path) as mine:
        assert not staging.exists() and mine.exists()
        os.utime(mine, (hour_ago, hour_ago))  # a long export: its own staging folder is locked, so kept
        remove_leftovers(tmp_path, STAGING_PREFIX)
        assert mine.exists()
    with atomic_path(tmp_path / "m.onnx") as tmp:
        tmp.write_bytes(b"again")
        os.utime(tmp, (hour_ago, hour_ago))  # a long write: its own temporary file is locked, so kept
        remove_leftovers(tmp_path, ".m.onnx.", TEMPORARY_SUFFIX)
        assert tmp.exists()
    assert (tmp_path / "m.onnx").read_bytes() == b"again"
    fifo = tmp_path / f".m.onnx.fifo{TEMPORARY_SUFFIX}"
    os.mkfifo(fifo)
    os.utime(fifo, (hour_ago, hour_ago))
    remove_leftovers(tmp_path, ".m.onnx.", TEMPORARY_SUFFIX)  # not opened (it would block), not removed
    assert fifo.exists()


def test_ctrl_c_after_the_command_has_ended_does_not_kill_the_exiting_process():
    """The exit of a process that ran torch and the engines takes a second or more of native teardown."""
    interrupt_after_the_command = (
        "import os, signal, sys, types\n"
        "def command():\n"
        "    print('done')\n"
        "    sys.exit(0)\n"
        "sys.modules['vae_rt.cli'] = types.SimpleNamespace(main=command)  # the real one takes seconds to import\n"
        "from vae_rt.entry import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # as the interpreter exits\n"
    )
    result = subprocess.run([sys.executable, "-c", interrupt_after_the_command], check=False, capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "")


def test_ctrl_c_while_the_cli_loads_is_one_line_and_exit_130():
    interrupt_the_import = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vae_rt.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from vae_rt.entry import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", interrupt_the_import], check=False, capture_output=True, text=True)
    assert result.returncode == 130 and result.stderr.splitlines()[-1] == "interrupted: while loading, before anything was done"
    assert "Traceback" not in result.stderr
