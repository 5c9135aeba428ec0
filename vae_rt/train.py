"""The tutorial's training recipe (Adam, batch 128, BCE + KL), fast: MNIST sits in memory as one tensor
and each step computes its gradients in closed form (`gradients.py`) instead of through autograd.

Every epoch writes `checkpoint_{epoch}.pth` (optimizer state included, for `resume`), a
reconstruction grid, a grid of random samples and `metrics.jsonl`; the end of the run writes
`model.pth` (weights, config and metrics only), the file to export, sample from or bundle.
Run it with `vae-rt train --epochs 10 --out runs/z2`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import save_image

from vae_rt.backends import resolve_device
from vae_rt.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from vae_rt.data import load_mnist
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.evaluate import test_loss, to_pixels
from vae_rt.files import atomic_path, make_dir, write_atomic
from vae_rt.gradients import elbo_backward
from vae_rt.model import VAE, VAEConfig

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)\.pth$")
GRID_SAMPLES = 64
DEFAULT_EPOCHS = 10
LR_DECAYS = ("none", "cosine")


@dataclass(frozen=True)
class TrainOptions:
    epochs: int | None = None  # None: DEFAULT_EPOCHS, or the resumed run's own count
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: str = "none"  # "cosine": lr follows half a cosine from `lr` to 0 over `epochs`
    z_dim: int = 2
    seed: int = 0
    keep: int = 3  # epoch checkpoints kept on disk; older ones are deleted
    ema: float = 0.0  # > 0: score and save an exponential moving average of the weights (e.g. 0.999)
    weight_decay: float = 0.0  # decoupled (AdamW); 0 is exactly the tutorial's Adam

    def check(self) -> None:
        """Reject options that cannot train, before any work is done."""
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive finite number, got {self.lr}")
        if self.z_dim < 1:
            raise UserError(f"--z-dim must be at least 1, got {self.z_dim}")
        if self.lr_decay not in LR_DECAYS:
            raise UserError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if self.keep < 1:
            raise UserError(f"--keep must be at least 1, got {self.keep}")
        if not 0 <= self.ema < 1:
            raise UserError(f"--ema must be in [0, 1), got {self.ema}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch `epoch` (1-based); stateless, so a resumed run follows the same curve."""
        if self.lr_decay == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / self.epochs))
        return self.lr


Progress = Callable[[int, int, int], None]  # (epoch, batches done, batches in the epoch)
EpochDone = Callable[[dict[str, Any]], None]


def train(
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    data_dir: Path | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch: EpochDone | None = None,
) -> list[dict[str, Any]]:
    """Train (or resume) a VAE into `out_dir`; returns the metrics of every epoch so far.

    Raises:
        UserError: bad options or data. RuntimeFailure: the loss became NaN/Inf (the last good
        checkpoint stays on disk).
    """
    # Adam's moments of parameters whose gradient is 0 (dead ReLU units) decay into denormal floats
    # within an epoch or two, and x86 CPUs process those many times slower (docs/benchmarks.md).
    # Flushing them to zero costs no accuracy. The flag is per thread, and
    # torch's worker threads copy it when they are created: so it is set before any parallel op runs
    # (in a process that has run one already, the workers keep computing with denormals: slower, not wrong).
    flushed = torch.set_flush_denormal(True)
    try:
        return _run(out_dir, options, data_dir, device, resume, progress, on_epoch)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _run(
    out_dir: Path,
    options: TrainOptions,
    data_dir: Path | None,
    device: str,
    resume: bool,
    progress: Progress | None,
    on_epoch: EpochDone | None,
) -> list[dict[str, Any]]:
    out_dir = Path(out_dir)
    last = latest_checkpoint(out_dir) if resume else None
    ckpt = read_checkpoint(last) if last is not None else None
    if ckpt is not None:
        if "optimizer" not in ckpt or "train_options" not in ckpt:
            raise CheckpointError(f"{last}: has no optimizer state, so training cannot resume from it")
        recorded = TrainOptions(**ckpt["train_options"])  # the run keeps its options; only epochs may grow
        options = replace(recorded, epochs=recorded.epochs if options.epochs is None else options.epochs)
        log.info("resuming from %s", last)
    elif resume:
        log.info("no checkpoint in %s: starting from scratch", out_dir)
    if options.epochs is None:
        options = replace(options, epochs=DEFAULT_EPOCHS)
    options.check()
    dev = torch.device(resolve_device(device))
    make_dir(out_dir, "--out")
    train_u8, test_u8 = load_mnist(data_dir)
    x_train, x_test = to_pixels(train_u8).to(dev), to_pixels(test_u8).to(dev)

    torch.manual_seed(options.seed)  # the initial weights; a resumed run overwrites them anyway
    run = _Run(VAE(VAEConfig(x_dim=x_train.shape[1], z_dim=options.z_dim)).to(dev), options, out_dir, x_train, x_test)
    if ckpt is not None:
        run.restore(ckpt)
    for epoch in range(len(run.history) + 1, options.epochs + 1):
        metrics = run.epoch(epoch, progress)
        if on_epoch is not None:
            on_epoch(metrics)
    save_checkpoint(out_dir / "model.pth", run.scored.cpu(), metrics=run.history, train_options=asdict(options))
    return run.history


class _Run:
    """The state of one training run: model, optimizer, optional weight average, metrics so far."""

    def __init__(self, model: VAE, options: TrainOptions, out_dir: Path, x_train: torch.Tensor, x_test: torch.Tensor):
        self.model, self.options, self.out_dir = model, options, out_dir
        self.x_train, self.x_test = x_train, x_test
        # fused: one kernel for the whole update instead of several per tensor
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay, fused=True)
        self.averaged = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(options.ema), use_buffers=True) if options.ema else None
        )
        self.history: list[dict[str, Any]] = []
        generator = torch.Generator().manual_seed(options.seed)
        self.fixed_z = torch.randn(GRID_SAMPLES, options.z_dim, generator=generator).to(x_train.device)

    @property
    def scored(self) -> VAE:
        """The weights that are evaluated and saved: the moving average when there is one."""
        return self.averaged.module if self.averaged is not None else self.model

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt.get("train_state_dict") or ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.averaged is not None:
            self.averaged.module.load_state_dict(ckpt["state_dict"])
            self.averaged.n_averaged.fill_(1)  # the average exists: do not restart it from the raw weights
        self.history = list(ckpt.get("metrics", []))

    def epoch(self, epoch: int, progress: Progress | None) -> dict[str, Any]:
        started = time.perf_counter()
        train_loss = self._train(epoch, progress)
        self.scored.eval()
        metrics = {
            "epoch": epoch,
            "lr": self.options.lr_at(epoch),
            "train_loss": train_loss,
            "test_loss": test_loss(self.scored, self.x_test, seed=self.options.seed),
            "seconds": time.perf_counter() - started,
        }
        self.history.append(metrics)
        self._write(epoch)
        return metrics

    def _train(self, epoch: int, progress: Progress | None) -> float:
        """One pass over the shuffled training set; returns the loss per image."""
        model, optimizer, options, x_train = self.model, self.optimizer, self.options, self.x_train
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = options.lr_at(epoch)
        # Seeds derived from the epoch, so a resumed run draws exactly what the uninterrupted one would.
        torch.manual_seed(options.seed * 1_000_003 + epoch)
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(options.seed + epoch))
        order = order.to(x_train.device)
        steps = math.ceil(len(x_train) / options.batch_size)
        total = 0.0
        for step in range(steps):
            x = x_train[order[step * options.batch_size : (step + 1) * options.batch_size]]
            eps = torch.randn(len(x), options.z_dim, device=x.device)
            loss = elbo_backward(model, x, eps)  # sets every .grad: no zero_grad needed
            optimizer.step()
            if self.averaged is not None:
                self.averaged.update_parameters(model)
            value = loss.item()
            if not math.isfinite(value):
                last = latest_checkpoint(self.out_dir)
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise RuntimeFailure(f"training diverged: loss is {value} at epoch {epoch}, batch {step + 1}; {kept}")
            total += value
            if progress is not None:
                progress(epoch, step + 1, steps)
        return total / len(x_train)

    def _write(self, epoch: int) -> None:
        """Grids, the epoch checkpoint (with what `resume` needs), metrics.jsonl; then prune old checkpoints."""
        scored, out_dir = self.scored, self.out_dir
        with torch.no_grad():
            originals = self.x_test[:8]
            recon = scored(originals)[0]
            _save_grid(out_dir / f"reconstruction_{epoch}.png", torch.cat([originals, recon]), nrow=8)
            _save_grid(out_dir / f"sample_{epoch}.png", scored.decode(self.fixed_z), nrow=8)
        raw = {"train_state_dict": self.model.state_dict()} if self.averaged is not None else {}
        save_checkpoint(
            out_dir / f"checkpoint_{epoch}.pth",
            scored,
            metrics=self.history,
            train_options=asdict(self.options),
            optimizer=self.optimizer.state_dict(),
            **raw,
        )
        write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.history))
        for old in _checkpoints(out_dir)[: -self.options.keep]:
            old.unlink()


def _save_grid(path: Path, pixels: torch.Tensor, nrow: int) -> None:
    with atomic_path(path) as tmp:
        save_image(pixels.view(-1, 1, 28, 28).cpu(), tmp, nrow=nrow, format="png")


def _checkpoints(out_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out_dir.glob("checkpoint_*.pth") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = _checkpoints(Path(out_dir))
    return found[-1] if found else None

