"""The int8 decoder: static QDQ quantization of an fp32 ONNX decoder (onnxruntime.quantization).

QDQ is the format TensorRT's explicit INT8 reads as well as ONNX Runtime, so one file serves both;
for TensorRT, zero points are 0 (symmetric activations). The choices, each measured in test loss
against fp32 (docs/quality.md): weights per output channel; the first layer (z -> 256, 0.1 % of
the FLOP) stays fp32, since an int8 z costs more than all the rest; Gemm outputs stay fp32, so
the logits and the sigmoid are never rounded to 8 bits; activation ranges are the min-max of
encoder posterior draws of real training images (a percentile clips the rare large activation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from vae_rt.errors import require
from vae_rt.model import INPUT_NAME, VAE, reparameterize

CALIBRATION_IMAGES = 2000  # more images or draws barely move the gate (docs/quality.md)


def calibration_latents(model: VAE, train_pixels: torch.Tensor, n: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """float32 [n, z_dim]: one draw from q(z|x) for each of n seeded-random training images.

    What the decoder sees when it reconstructs or samples (the aggregate posterior is close to the
    prior). Tail points (|z| >= 3) are left out on purpose: they stretch every range for the sake of
    latents a prior draw almost never reaches, and cost +0.7 nats.
    """
    generator = torch.Generator().manual_seed(seed)
    picked = train_pixels[torch.randperm(len(train_pixels), generator=generator)[:n]]
    with torch.no_grad():
        return reparameterize(*model.encode(picked), generator=generator)


class _LatentReader:
    """onnxruntime's CalibrationDataReader protocol (it checks for `get_next`): all latents in one batch."""

    def __init__(self, latents: torch.Tensor):
        self._batches = iter([{INPUT_NAME: np.ascontiguousarray(latents.numpy(), dtype=np.float32)}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32_path: Path, out_path: Path, latents: torch.Tensor) -> dict[str, Any]:
    """Write the static-QDQ int8 model of the fp32 decoder `fp32_path` to `out_path`.

    Returns:
        The settings, for the manifest.
    """
    require("onnxruntime", extra="cpu")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    first_layer = [node.name for node in graph.node if INPUT_NAME in node.input]
    settings = {
        "format": "QDQ", "method": "static", "weights": "int8 per output channel, symmetric",
        "activations": "int8 per tensor, symmetric (zero point 0, as TensorRT requires)",
        "calibration": f"min-max of {len(latents)} encoder posterior draws of MNIST training images",
        "kept_fp32": ["the first Gemm (z -> h)", "Gemm outputs (logits)", "the sigmoid"],
    }
    with _quiet_root_logger():  # the quantizer's advice on pre-processing, through the root logger
        quantize_static(
            str(fp32_path), str(out_path), _LatentReader(latents),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Gemm"], nodes_to_exclude=first_layer,
            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "OpTypesToExcludeOutputQuantization": ["Gemm"]},
        )
    return settings


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Errors only from the root logger; its handler keeps `logging.warning` from calling basicConfig()."""
    root, handler = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(handler)
