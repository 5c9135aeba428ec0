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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vae_rt.backends import resolve_device
from vae_rt.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from vae_rt.data import load_mnist
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.evaluate import test_loss, to_pixels
from vae_rt.files import new_folder, write_atomic
from vae_rt.gradients import elbo_backward
from vae_rt.limits import MAX_EPOCHS, MAX_Z_DIM, check_between, check_seed
from vae_rt.model import IMAGE_SHAPE, VAE, VAEConfig
from vae_rt.output import write_png

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)\.pth$")
GRID_SAMPLES = 64
LR_DECAYS = ("none", "cosine")


@dataclass(frozen=True)
class TrainOptions:
    """What a run trains with. A field left None takes its default (DEFAULTS), or on resume the run's own value."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_decay: str | None = None  # "cosine": lr follows half a cosine from `lr` to 0 over `epochs`
    z_dim: int | None = None
    seed: int | None = None
    keep: int | None = None  # epoch checkpoints kept on disk; older ones are deleted
    ema: float | None = None  # > 0: score and save an exponential moving average of the weights (e.g. 0.999)
    weight_decay: float | None = None  # decoupled (AdamW); 0 is exactly the tutorial's Adam

    def resolved(self, recorded: TrainOptions | None = None) -> TrainOptions:
        """Every field set: this one's where given, else the resumed run's (`recorded`), else the default.

        Raises:
            UserError: a given option contradicts the resumed run (only --epochs and --keep may change).
        """
        given = {k: v for k, v in asdict(self).items() if v is not None}
        if recorded is not None:
            clashes = [f"--{k.replace('_', '-')} {v} (the run has {getattr(recorded, k)})"
                       for k, v in given.items() if k not in RESUME_MAY_CHANGE and v != getattr(recorded, k)]
            if clashes:
                raise UserError(
                    f"--resume: the run was trained with other options: {', '.join(clashes)}; drop them to continue "
                    "it, or train a new run into another --out"
                )
        return replace(recorded or DEFAULTS, **given)

    def check(self) -> None:
        """Reject options that cannot train, or would train for years, before any work is done."""
        check_between("--epochs", self.epochs, 1, MAX_EPOCHS)
        check_between("--batch-size", self.batch_size, 1, MNIST_TRAIN_SIZE)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive finite number, got {self.lr}")
        check_between("--z-dim", self.z_dim, 1, MAX_Z_DIM)
        check_seed(self.seed, "--seed")
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


DEFAULTS = TrainOptions(epochs=10, batch_size=128, lr=1e-3, lr_decay="none", z_dim=2, seed=0, keep=3, ema=0.0, weight_decay=0.0)
RESUME_MAY_CHANGE = ("epochs", "keep")  # the others shape the weights or the data order: changing them is another run
RUN_FILES = ("model.pth", "metrics.jsonl")  # with checkpoint_*.pth: what says a folder holds a run
MNIST_TRAIN_SIZE = 60_000

Progress = Callable[[int, int, int], None]  # (epoch, batches done, batches in the epoch)
EpochDone = Callable[[dict[str, Any]], None]


def train(
    out_dir: Path,
    options: TrainOptions = TrainOptions(),  # all defaults, or the resumed run's options
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
        with new_folder(out_dir, "--out") as folder:  # removed again if the run stops before writing into it
            return _run(folder, options, data_dir, device, resume, progress, on_epoch)
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
    start = resume_point(out_dir) if resume else None
    ckpt = start[1] if start is not None else None
    if ckpt is not None:
        recorded = TrainOptions(**_known_options(ckpt["train_options"])).resolved()
        options = options.resolved(recorded)
        log.info("resuming from %s", start[0])
    else:
        refuse_existing_run(out_dir)  # with --resume too: a model.pth without checkpoints cannot be continued
        if resume:
            log.info("no checkpoint in %s: starting from scratch", out_dir)
        options = options.resolved()
    options.check()
    dev = torch.device(resolve_device(device))
    train_u8, test_u8 = load_mnist(data_dir)
    x_train, x_test = to_pixels(train_u8).to(dev), to_pixels(test_u8).to(dev)

    torch.manual_seed(options.seed)  # the initial weights; a resumed run overwrites them anyway
    run = _Run(VAE(VAEConfig(x_dim=x_train.shape[1], z_dim=options.z_dim)).to(dev), options, out_dir, x_train, x_test)
    if ckpt is not None:
        run.restore(ckpt)
    try:
        for epoch in range(len(run.history) + 1, options.epochs + 1):
            metrics = run.epoch(epoch, progress)
            if on_epoch is not None:
                on_epoch(metrics)
        save_checkpoint(out_dir / "model.pth", run.scored.cpu(), metrics=run.history, train_options=asdict(options))
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: say what is on disk, not only what is not
        last = latest_checkpoint(out_dir)
        kept = f"{last} holds the last finished epoch; continue with --resume" if last else "no epoch finished, so no checkpoint was written"
        raise type(stop)(f"training stopped; {kept}") from None
    return run.history


def refuse_existing_run(out_dir: Path) -> None:
    """Raise when `out_dir` holds a run: training afresh would overwrite its model and mix its checkpoints with new ones."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()] + [p.name for p in _checkpoints(out_dir)]
    if found:
        raise UserError(
            f"--out {out_dir} holds a training run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
            "continue it with --resume, or give another --out"
        )


def resume_point(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, contents) of the newest checkpoint in `out_dir` that can be resumed from; None when there is none.

    A newer one that cannot be read (a crash mid-copy, a full disk) is passed over with a warning.
    """
    unusable = []
    for path in reversed(_checkpoints(out_dir)):
        try:
            ckpt = read_checkpoint(path)
            if "optimizer" not in ckpt or "train_options" not in ckpt:
                raise CheckpointError(f"{path}: has no optimizer state, so training cannot resume from it")
            optimizer, options = ckpt["optimizer"], ckpt["train_options"]
            if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= optimizer.keys() and isinstance(options, dict)):
                raise CheckpointError(f"{path}: its optimizer state or training options are damaged")
        except CheckpointError as error:
            unusable.append(str(error))
            continue
        if unusable:
            log.warning("resuming from %s, the newest usable checkpoint; passed over: %s", path, "; ".join(unusable))
        return path, ckpt
    if unusable:
        raise CheckpointError(f"--resume: no checkpoint in {out_dir} can be resumed from: {'; '.join(unusable)}")
    return None


def _known_options(recorded: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(TrainOptions)}
    return {k: v for k, v in recorded.items() if k in names}


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
        torch.manual_seed((options.seed * 1_000_003 + epoch) % 2**64)  # torch seeds are 64-bit
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
    write_png(pixels.view(-1, *IMAGE_SHAPE), path, nrow)


def _checkpoints(out_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out_dir.glob("checkpoint_*.pth") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = _checkpoints(Path(out_dir))
    return found[-1] if found else None

