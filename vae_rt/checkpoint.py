"""Checkpoint I/O: vae-rt checkpoints and the tutorial's plain `state_dict` files, loaded without unpickling code."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_rt import __version__
from vae_rt.errors import UserError
from vae_rt.files import atomic_path
from vae_rt.model import VAE, X_DIM, VAEConfig

BUNDLED_CHECKPOINT = Path(__file__).parent / "weights" / "vae_z2.pth"


class CheckpointError(UserError):
    """The file is missing, unreadable, unsafe, or not a checkpoint of this VAE."""


def save_checkpoint(path: Path, model: VAE, **extra: Any) -> None:
    """Write `{format, version, config, state_dict, **extra}` atomically (temporary file, then rename)."""
    payload = {
        "format": "vae-rt",
        "version": __version__,
        "config": model.config.as_dict(),
        "state_dict": model.state_dict(),
        **extra,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


NOT_CHECKPOINTS = {".onnx": "an ONNX model", ".plan": "a TensorRT plan", ".engine": "a TensorRT plan"}  # said by name when unreadable


def read_checkpoint(path: Path | None) -> dict[str, Any]:
    """Load a checkpoint file as a dict with at least `config` (VAEConfig) and `state_dict`.

    A plain tutorial `state_dict` is wrapped, its dimensions inferred from the weight shapes.
    Loading uses `weights_only=True`: a file whose unpickling would run code is refused.

    Raises:
        CheckpointError: missing, corrupt or unsafe file, wrong keys, or mismatched shapes.
    """
    path = Path(path) if path is not None else BUNDLED_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # garbage can look like an exotic pickle protocol; the error says enough
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
            # a sparse tensor gets a note on how torch validates it; it is refused below, in one line
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants", category=UserWarning)
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # random bytes fail the unpickler in many ways: IndexError, KeyError, ...
        unsafe = isinstance(err, pickle.UnpicklingError) and re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", str(err))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused to load: unpickling it would call {unsafe.group(1)} "
                "(only tensors and plain data are loaded; never unpickle untrusted code)"
            ) from err
        if path.suffix in NOT_CHECKPOINTS:
            raise CheckpointError(f"{path}: {NOT_CHECKPOINTS[path.suffix]}, not a PyTorch checkpoint; use the .pth") from err
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?)") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    if "state_dict" in raw:
        state_dict = raw["state_dict"]
        extra = {k: v for k, v in raw.items() if k not in ("state_dict", "config")}
    else:
        state_dict, extra = raw, {}
    config = infer_config(path, state_dict)
    check_values(path, state_dict)
    if isinstance(raw.get("config"), dict) and VAEConfig(**_known(raw["config"])) != config:
        raise CheckpointError(f"{path}: its config {raw['config']} does not match its weights {config.as_dict()}")
    check_weights(path, config, state_dict)
    if config.x_dim != X_DIM:
        raise CheckpointError(f"{path}: a model of {config.x_dim}-pixel images; vae-rt serves 28x28 MNIST images (x_dim {X_DIM})")
    return {"config": config, "state_dict": state_dict, **extra}


def load_checkpoint(path: Path | None = None) -> tuple[VAE, dict[str, Any]]:
    """Build the VAE stored in `path` (the bundled model when None), in eval mode.

    Returns:
        The model and the checkpoint dict (metrics, version, ... where present).
    """
    ckpt = read_checkpoint(path)
    model = VAE(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def infer_config(path: Path, state_dict: Any) -> VAEConfig:
    """Dimensions from the shapes of fc1 (x, h1), fc2 (h2) and fc31 (z); loading the weights checks the rest."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of names to tensors")
    try:
        (h1, x), (h2, _), (z, _) = (state_dict[f"{name}.weight"].shape for name in ("fc1", "fc2", "fc31"))
    except KeyError as err:
        raise CheckpointError(f"{path}: not a VAE checkpoint: no {err.args[0]}") from err
    except ValueError as err:
        raise CheckpointError(f"{path}: not a VAE checkpoint: its fc1, fc2 and fc31 weights are not matrices") from err
    return VAEConfig(x_dim=x, h1_dim=h1, h2_dim=h2, z_dim=z)


def check_weights(path: Path, config: VAEConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Every key of the VAE, no other, each of the right shape: torch's strict load, said in one line."""
    try:
        VAE(config).load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{path}: not a checkpoint of this VAE: {' '.join(problems) or err}") from err


def check_values(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse, naming the tensor, weights that would decode garbage: no data (meta), not dense, not floats, NaN or Inf."""
    for name, tensor in state_dict.items():
        if tensor.is_meta:
            raise CheckpointError(f"{path}: {name} holds no values (a meta tensor: saved before the weights existed)")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"{path}: {name} is stored as a {tensor.layout} tensor, not a dense one")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {name} is {tensor.dtype}, not floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{path}: {name} has {bad} NaN/Inf value{'s' if bad > 1 else ''} of {tensor.numel()}; the weights are damaged")


def _known(config: dict[str, Any]) -> dict[str, Any]:
    fields = VAEConfig.__dataclass_fields__
    return {k: v for k, v in config.items() if k in fields}
