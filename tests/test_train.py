import json

import pytest
import torch

import vae_rt.train as train_module
from vae_rt.checkpoint import load_checkpoint
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.train import TrainOptions, train

LOSS_KEYS = ("epoch", "lr", "train_loss", "test_loss")


def _losses(history):
    return [{k: m[k] for k in LOSS_KEYS} for m in history]


def test_two_epochs_follow_the_tutorial(tmp_path, mnist_dir):
    full = train(tmp_path, TrainOptions(epochs=2), data_dir=mnist_dir, device="cpu")
    # The tutorial's published test losses after epochs 1 and 2 (batch 128): 164.07 and 156.23.
    assert full[0]["test_loss"] == pytest.approx(164.07, abs=3)
    assert full[1]["test_loss"] == pytest.approx(156.23, abs=3)
    assert full[1]["train_loss"] < full[0]["train_loss"]
    _, ckpt = load_checkpoint(tmp_path / "model.pth")
    assert "optimizer" not in ckpt and ckpt["metrics"][-1]["test_loss"] == full[1]["test_loss"]


def test_a_resumed_run_is_identical_to_an_uninterrupted_one(tmp_path, small_mnist):
    full = train(tmp_path / "full", TrainOptions(epochs=2), device="cpu")
    run = tmp_path / "resumed"
    train(run, TrainOptions(epochs=1), device="cpu")  # as if killed after epoch 1
    resumed = train(run, TrainOptions(epochs=2), device="cpu", resume=True)
    assert _losses(resumed) == _losses(full)

    for name in ("checkpoint_2.pth", "reconstruction_2.png", "sample_2.png", "model.pth"):
        assert (run / name).is_file(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    _, ckpt = load_checkpoint(run / "model.pth")
    assert "optimizer" not in ckpt and ckpt["metrics"][-1]["test_loss"] == full[1]["test_loss"]


def test_old_epoch_checkpoints_are_pruned(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setattr(train_module._Run, "_train", lambda *args: 100.0)  # no gradient steps: only the bookkeeping
    train(tmp_path, TrainOptions(epochs=3, keep=1), data_dir=mnist_dir, device="cpu")
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_3.pth"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, small_mnist, monkeypatch):
    real_step = train_module.elbo_backward
    steps = {"n": 0}

    def step_that_explodes_in_epoch_2(*args):
        steps["n"] += 1
        loss = real_step(*args)
        return loss * float("nan") if steps["n"] > small_mnist else loss

    monkeypatch.setattr(train_module, "elbo_backward", step_that_explodes_in_epoch_2)
    with pytest.raises(RuntimeFailure, match=r"loss is nan at epoch 2, batch 1; the last good checkpoint is .*checkpoint_1.pth"):
        train(tmp_path, TrainOptions(epochs=3), device="cpu")
    assert load_checkpoint(tmp_path / "checkpoint_1.pth")[1]["metrics"][-1]["epoch"] == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (TrainOptions(epochs=0), "--epochs must be between 1 and 10000"),
        (TrainOptions(lr=float("nan")), "--lr must be a positive finite number"),
        (TrainOptions(lr=-1e-3), "--lr must be a positive finite number"),
        (TrainOptions(batch_size=0), "--batch-size must be between 1 and 60000"),
        (TrainOptions(lr_decay="step"), "lr_decay must be"),
        (TrainOptions(ema=1.0), "--ema must be in"),
        (TrainOptions(weight_decay=float("inf")), "--weight-decay must be"),
    ],
)
def test_bad_options_are_rejected_before_any_work(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        train(tmp_path / "never", options, data_dir=tmp_path / "no-data")
    assert not (tmp_path / "never").exists()


def test_moving_average_run_resumes_identically(tmp_path, small_mnist):
    """With --ema the saved weights are the average, and resume restores both the average and the raw weights."""
    options = TrainOptions(epochs=2, ema=0.9)
    full = train(tmp_path / "full", options, device="cpu")
    train(tmp_path / "resumed", TrainOptions(epochs=1, ema=0.9), device="cpu")
    resumed = train(tmp_path / "resumed", TrainOptions(epochs=2), device="cpu", resume=True)
    assert _losses(resumed) == _losses(full)
    ckpt = torch.load(tmp_path / "full" / "checkpoint_2.pth", weights_only=True)
    assert not torch.equal(ckpt["state_dict"]["fc1.weight"], ckpt["train_state_dict"]["fc1.weight"])


def test_cosine_decay_reaches_zero_at_the_end():
    options = TrainOptions(epochs=4, lr=1e-3, lr_decay="cosine")
    lrs = [options.lr_at(e) for e in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5e-4) and lrs[4] == pytest.approx(0, abs=1e-12)
    assert torch.tensor(lrs).diff().le(0).all()
