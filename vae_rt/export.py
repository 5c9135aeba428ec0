"""Decoder -> ONNX: fp32; fp16 weights with float32 I/O (for a strongly typed TensorRT build); int8 QDQ.

Every export is checked before it is renamed into place: `onnx.checker`, strict shape inference,
then ONNX Runtime (CPU provider) against the torch fp32 decoder on seeded and tail latents, and a
reduced precision must also pass its quality gate on the MNIST test set (`vae_rt.quality`). A
manifest JSON beside the file records where it came from and how well it matched.
Run it with `vae-rt export CKPT`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from vae_rt import __version__
from vae_rt.artifacts import EXPORT_REVISION, io_contract, onnx_path_for, write_manifest
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.data import load_mnist
from vae_rt.errors import RuntimeFailure, UserError, require
from vae_rt.evaluate import to_pixels
from vae_rt.files import atomic_path, new_folder, sha256_file, staging_dir
from vae_rt.model import INPUT_NAME, OUTPUT_NAME, VAE, Decoder
from vae_rt.overflow import reference_peaks
from vae_rt.parity import ParityReport, compare, parity_latents
from vae_rt.quality import QualityGate, quality_gate

log = logging.getLogger(__name__)

OPSET = 18  # torchlib's base opset: no version conversion, stable across torch releases
FP16_MAX = 65504.0
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
VALIDATION_BATCHES = (1, 7, None)  # None: every latent, tails included


class ReducedDecoder(nn.Module):
    """Layers after the first in `dtype` (`Decoder.in_precision`) behind float32 I/O, the sigmoid in float32:
    for fp16 `Gemm/Relu -> Cast -> Gemm/Relu -> Gemm -> Cast -> sigmoid` (no Cast for float32, the int8 base).

    The sigmoid is written out as 1 / (1 + exp(-x)): ONNX Runtime's CPU Sigmoid returns exactly 0
    below x = -16 and loses relative precision in 1 - p near 1, which alone costs +0.46 nats of test
    loss (docs/quality.md); an fp16 sigmoid, saturating at 1 - 2^-11, costs as much. Both would
    spend a reduced-precision model's whole quality budget.
    """

    def __init__(self, decoder: Decoder, dtype: torch.dtype):
        super().__init__()
        self.decoder = copy.deepcopy(decoder).in_precision(dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.logits(z).float()
        return torch.reciprocal(1 + torch.exp(-logits))


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    manifest_path: Path
    precision: str
    parity: ParityReport
    activation_peak: dict[str, float]
    quality: QualityGate | None = None  # None for fp32, which is held to max-abs parity instead


def export_onnx(
    checkpoint: Path | None, out_dir: Path, precision: str = "fp32", name: str | None = None, data_dir: Path | None = None
) -> ExportedModel:
    """Export the decoder of `checkpoint` (the bundled model when None) to `out_dir/<name>.<precision>.onnx`.

    fp16 and int8 need MNIST (`data_dir`, else $VAE_RT_MNIST_DIR, else a download): the test set for
    the quality gate, and for int8 the training set to calibrate on.

    Raises:
        UserError: unreadable checkpoint, unknown precision, unwritable folder, MNIST not found.
        RuntimeFailure: the exported model disagrees with torch beyond the parity tolerance (docs/backends.md),
            or fails its quality gate; nothing is written then.
    """
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    check_export_name(name)
    source = Path(checkpoint) if checkpoint is not None else BUNDLED_CHECKPOINT
    model, _ = load_checkpoint(source)
    peaks = reference_peaks(model, source.name)
    with new_folder(out_dir, "out_dir") as folder:
        path = onnx_path_for(folder, name or source.stem, precision)
        return _export_into(path, precision, model, source, peaks, data_dir)


def _export_into(
    path: Path, precision: str, model: VAE, source: Path, peaks: dict[str, float], data_dir: Path | None
) -> ExportedModel:
    """`export_onnx` once its folder exists: the file, checked and gated, then its manifest."""
    train_pixels, test_pixels = (to_pixels(images) for images in load_mnist(data_dir)) if precision != "fp32" else (None, None)
    quantization, gate = None, None
    with atomic_path(path) as tmp:
        if precision == "int8":
            quantization = _export_int8(model, tmp, train_pixels)
        else:
            decoder = model.decoder() if precision == "fp32" else ReducedDecoder(model.decoder(), torch.float16)
            _torch_export(decoder, model.config.z_dim, tmp)
        check_onnx(tmp, path.name)
        parity = validate_with_ort(tmp, model, precision)
        if not parity:
            raise RuntimeFailure(f"{path.name}: ONNX Runtime disagrees with torch: {parity.summary()}")
        if precision != "fp32":
            gate = gate_with_ort(tmp, model, precision, test_pixels)
            if not gate:
                raise RuntimeFailure(f"{path.name} not written: quality gate {gate.summary()}")
    if precision == "fp16" and max(peaks.values()) > FP16_MAX:
        log.warning("%s: activations reach %.4g, beyond fp16's %g: expect Inf/NaN", path.name, max(peaks.values()), FP16_MAX)
    manifest = {
        "kind": "onnx",
        "file": path.name,
        "sha256": sha256_file(path),
        "precision": precision,
        "opset": OPSET,
        "export_revision": EXPORT_REVISION,
        "source_checkpoint": {"path": str(source), "sha256": sha256_file(source)},
        "model_config": model.config.as_dict(),
        **io_contract(model.config.z_dim, model.config.x_dim),
        "versions": _versions(),
        "parity_vs_torch_fp32": {"provider": "CPUExecutionProvider", **parity.as_dict()},
        "activation_peak_abs": peaks,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if gate is not None:
        manifest["quality_gate"] = {"provider": "CPUExecutionProvider", **gate.as_dict()}
    if quantization is not None:
        manifest["quantization"] = quantization
    manifest_path = write_manifest(path, manifest)
    return ExportedModel(path, manifest_path, precision, parity, peaks, gate)


def check_export_name(name: str | None) -> None:
    """Refuse a base name that is not a plain file name: folders go in the output folder option."""
    if name is not None and (Path(name).name != name or name in (".", "..")):
        raise UserError(f"name must be a plain file name (no folders: they go in out_dir), got {name!r}")


def _export_int8(model: VAE, path: Path, train_pixels: torch.Tensor) -> dict[str, Any]:
    """The fp32 graph (with the exact sigmoid), quantized to static QDQ int8 into `path`; returns the settings."""
    from vae_rt.quantize import calibration_latents, quantize_int8

    with staging_dir(path.parent) as work:  # beside `path`, e.g. in the cache: cleaned up even after a SIGKILL
        fp32_path = work / "decoder.fp32.onnx"
        _torch_export(ReducedDecoder(model.decoder(), torch.float32), model.config.z_dim, fp32_path)
        return quantize_int8(fp32_path, path, calibration_latents(model, train_pixels))


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


def check_onnx(path: Path, name: str) -> None:
    """`onnx.checker` (full check) and strict shape inference of `path`, the file to be `name`; raises
    RuntimeFailure on a malformed graph."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise RuntimeFailure(f"{name}: exported ONNX is invalid: {str(err).splitlines()[0]}") from err


def validate_with_ort(path: Path, model: VAE, precision: str) -> ParityReport:
    """Decode seeded normal and tail latents on the ORT CPU provider and compare with torch fp32.

    Batches of 1, 7 and all ~1000 latents each run on their own (the dynamic batch axis is part of
    the contract); the report covers all of their outputs together.
    """
    decode = ort_cpu_decoder(path)
    latents = parity_latents(model.config.z_dim)  # 1000 normal draws, then the tail points
    reference, candidate = [], []
    with torch.no_grad():
        for batch in VALIDATION_BATCHES:
            z = latents[:batch]
            reference.append(model.decode(z))
            candidate.append(decode(z))
    return compare(torch.cat(reference), torch.cat(candidate), precision)


def gate_with_ort(path: Path, model: VAE, precision: str, test_pixels: torch.Tensor) -> QualityGate:
    """The quality gate of the ONNX file `path`, decoded on the ORT CPU provider."""
    return quality_gate(model, ort_cpu_decoder(path), precision, test_pixels)


def ort_cpu_decoder(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """float32 [B, z_dim] -> [B, 784] through one ORT CPU session of the file `path`."""
    ort = require("onnxruntime", extra="cpu")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def decode(z: torch.Tensor) -> torch.Tensor:
        (images,) = session.run([OUTPUT_NAME], {INPUT_NAME: z.numpy()})
        return torch.from_numpy(images)

    return decode


def _versions() -> dict[str, str]:
    versions = {"vae_rt": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions
