"""How each int8 quantization choice scores: the quality gate (test loss vs fp32) and the worst pixel.

Every row quantizes the same fp32 graph (exact sigmoid) with onnxruntime.quantization and decodes
on the ORT CPU provider; the row marked * is what `vae-rt export --precision int8` ships.

    python bench/int8_calibration.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

from vae_rt.checkpoint import load_checkpoint
from vae_rt.data import load_mnist
from vae_rt.evaluate import to_pixels
from vae_rt.export import ReducedDecoder, _torch_export
from vae_rt.model import INPUT_NAME
from vae_rt.parity import parity_latents, tail_latents
from vae_rt.quality import quality_gate
from vae_rt.quantize import _LatentReader, _quiet_root_logger, calibration_latents, quantize_int8

FIRST_GEMM = "node_linear"  # torch.onnx's name for fc4, the layer z enters
KEEP_LOGITS = {"OpTypesToExcludeOutputQuantization": ["Gemm"]}
SYMMETRIC = {**KEEP_LOGITS, "ActivationSymmetric": True}
MINMAX, PERCENTILE = CalibrationMethod.MinMax, CalibrationMethod.Percentile


def variants() -> list[tuple[str, bool, dict]]:
    """(label, calibrate with tail points too, quantize_static options)."""
    common = {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": ["Gemm"], "per_channel": True}
    no_fc4 = {**common, "nodes_to_exclude": [FIRST_GEMM]}
    return [
        ("naive: every Gemm and its output, per-tensor", True, {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": ["Gemm"]}),
        ("per-channel, logits fp32, z int8", False, {**common, "extra_options": KEEP_LOGITS}),
        ("per-channel, logits fp32, fc4 fp32 (asymmetric)", False, {**no_fc4, "extra_options": KEEP_LOGITS}),
        ("  ... symmetric, tails in calibration", True, {**no_fc4, "extra_options": SYMMETRIC}),
        ("  ... symmetric, percentile 99.99", False,
         {**no_fc4, "calibrate_method": PERCENTILE, "extra_options": {**SYMMETRIC, "CalibPercentile": 99.99}}),
        ("  ... symmetric, per-tensor weights", False, {**no_fc4, "per_channel": False, "extra_options": SYMMETRIC}),
    ]


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def score(path: Path, model, test_pixels, prior, tails) -> str:
    run = session(path).run

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run(None, {INPUT_NAME: z.numpy()})[0])

    gate = quality_gate(model, decode, "int8", test_pixels)
    with torch.no_grad():
        worst = [float((decode(z) - model.decode(z)).abs().max()) for z in (prior, tails)]
    return f"{gate.delta:+8.3f}  {'pass' if gate else 'FAIL'}  {worst[0]:6.3f}  {worst[1]:6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    model, _ = load_checkpoint(None)
    train, test = (to_pixels(images) for images in load_mnist(args.data_dir))
    latents = calibration_latents(model, train)
    with_tails = torch.cat([latents, tail_latents(model.config.z_dim)])
    prior, tails = parity_latents(model.config.z_dim)[:1000], tail_latents(model.config.z_dim)
    print(f"{'variant':50s}  Δ nats  gate  worst pixel: prior  tails")
    with tempfile.TemporaryDirectory() as work:
        fp32 = Path(work) / "fp32.onnx"
        _torch_export(ReducedDecoder(model.decoder(), torch.float32), model.config.z_dim, fp32)
        print(f"{'fp32 ONNX (exact sigmoid)':50s}  {score(fp32, model, test, prior, tails)}")
        out = Path(work) / "int8.onnx"
        with _quiet_root_logger():
            quantize_dynamic(str(fp32), str(out), per_channel=True)
        print(f"{'dynamic (MatMulInteger), per-channel':50s}  {score(out, model, test, prior, tails)}")
        for label, tails_too, options in variants():
            with _quiet_root_logger():
                quantize_static(str(fp32), str(out), _LatentReader(with_tails if tails_too else latents), **options)
            print(f"{label:50s}  {score(out, model, test, prior, tails)}")
        quantize_int8(fp32, out, latents)
        print(f"{'* shipped: symmetric, min-max of posterior draws':50s}  {score(out, model, test, prior, tails)}")


if __name__ == "__main__":
    main()
