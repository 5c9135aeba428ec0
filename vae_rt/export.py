"""Decoder -> ONNX (fp32, and fp16 weights with float32 I/O for a strongly typed TensorRT build).

Every export is checked before it is renamed into place: `onnx.checker`, strict shape inference,
then ONNX Runtime (CPU provider) against the torch fp32 decoder on seeded and tail latents. A
manifest JSON beside the file records where it came from and how well it matched.
Run it with `vae-rt export CKPT`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch
from torch import nn

from vae_rt import __version__
from vae_rt.artifacts import onnx_path_for, write_manifest
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.errors import RuntimeFailure, UserError, require
from vae_rt.files import atomic_path, make_dir, sha256_file
from vae_rt.model import INPUT_NAME, OUTPUT_NAME, VAE, Decoder
from vae_rt.parity import ParityReport, compare, parity_latents

log = logging.getLogger(__name__)

OPSET = 18  # torchlib's base opset: no version conversion, stable across torch releases
FP16_MAX = 65504.0
EXPORT_PRECISIONS = ("fp32", "fp16")
VALIDATION_BATCHES = (1, 7, None)  # None: every latent, tails included


class HalfDecoder(nn.Module):
    """fp16 weights and arithmetic behind float32 I/O: `Cast -> Gemm/Relu x3 -> Sigmoid -> Cast` in ONNX."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = copy.deepcopy(decoder).half()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.half()).float()


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    manifest_path: Path
    precision: str
    parity: ParityReport
    activation_peak: dict[str, float]


def export_onnx(checkpoint: Path | None, out_dir: Path, precision: str = "fp32", name: str | None = None) -> ExportedModel:
    """Export the decoder of `checkpoint` (the bundled model when None) to `out_dir/<name>.<precision>.onnx`.

    Raises:
        UserError: unreadable checkpoint, unknown precision, unwritable folder.
        RuntimeFailure: the exported model disagrees with torch beyond the parity tolerance (docs/backends.md).
    """
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    source = Path(checkpoint) if checkpoint is not None else BUNDLED_CHECKPOINT
    model, _ = load_checkpoint(source)
    out_dir = make_dir(out_dir, "out_dir")
    path = onnx_path_for(out_dir, name or source.stem, precision)
    decoder = model.decoder() if precision == "fp32" else HalfDecoder(model.decoder())
    with atomic_path(path) as tmp:
        _torch_export(decoder, model.config.z_dim, tmp)
        check_onnx(tmp)
        parity = validate_with_ort(tmp, model, precision)
        if not parity:
            raise RuntimeFailure(f"{path.name}: ONNX Runtime disagrees with torch: {parity.summary()}")
    peaks = activation_peaks(model, parity_latents(model.config.z_dim))
    if precision == "fp16" and max(peaks.values()) > FP16_MAX:
        log.warning("%s: activations reach %.4g, beyond fp16's %g: expect Inf/NaN", path.name, max(peaks.values()), FP16_MAX)
    manifest = {
        "kind": "onnx",
        "file": path.name,
        "sha256": sha256_file(path),
        "precision": precision,
        "opset": OPSET,
        "source_checkpoint": {"path": str(source), "sha256": sha256_file(source)},
        "model_config": model.config.as_dict(),
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", model.config.z_dim], "dtype": "float32"}],
        "outputs": [{"name": OUTPUT_NAME, "shape": ["batch", model.config.x_dim], "dtype": "float32"}],
        "versions": _versions(),
        "parity_vs_torch_fp32": {"provider": "CPUExecutionProvider", **parity.as_dict()},
        "activation_peak_abs": peaks,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest_path = write_manifest(path, manifest)
    return ExportedModel(path, manifest_path, precision, parity, peaks)


def _torch_export(module: nn.Module, z_dim: int, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's notices about its own internals, not about this model
        torch.onnx.export(
            module.eval(),
            (torch.zeros(2, z_dim),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"z": {0: batch}},
            opset_version=OPSET,
            external_data=False,  # one self-contained file: the weights are only ~1.6 MB
            dynamo=True,
            verbose=False,
        )


def check_onnx(path: Path) -> None:
    """`onnx.checker` (full check) and strict shape inference; raises RuntimeFailure on a malformed graph."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise RuntimeFailure(f"{path}: exported ONNX is invalid: {str(err).splitlines()[0]}") from err


def validate_with_ort(path: Path, model: VAE, precision: str) -> ParityReport:
    """Decode seeded normal and tail latents on the ORT CPU provider and compare with torch fp32.

    Batches of 1, 7 and all ~1000 latents each run on their own (the dynamic batch axis is part of
    the contract); the report covers all of their outputs together.
    """
    ort = require("onnxruntime", extra="cpu")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    latents = parity_latents(model.config.z_dim)  # 1000 normal draws, then the tail points
    reference, candidate = [], []
    with torch.no_grad():
        for batch in VALIDATION_BATCHES:
            z = latents[:batch]
            reference.append(model.decode(z))
            (images,) = session.run([OUTPUT_NAME], {INPUT_NAME: z.numpy()})
            candidate.append(torch.from_numpy(images))
    return compare(torch.cat(reference), torch.cat(candidate), precision)


@torch.no_grad()
def activation_peaks(model: VAE, z: torch.Tensor) -> dict[str, float]:
    """Largest |pre-activation| of each decoder layer in fp32: above 65504 an fp16 engine overflows."""
    decoder = model.decoder()
    names = [name for name, _ in decoder.named_children()]
    names[-1] += "_logits"  # the manifest's key for the sigmoid's input
    return {name: float(t.abs().max()) for name, t in zip(names, decoder.pre_activations(z), strict=True)}


def _versions() -> dict[str, str]:
    versions = {"vae_rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions
