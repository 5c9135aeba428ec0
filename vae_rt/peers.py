"""What a user would call instead of vae-rt, set up the way each library's own documentation does it.

Timed by `vae-rt bench --peers` in the same run and the same interleaved rounds as vae-rt's rows:
torch.compile, a raw ONNX Runtime session, raw OpenVINO in f32 and bf16, and ONNX Runtime and OpenVINO
on an int8 model (the exported one when it exists, else ONNX Runtime's own dynamic quantization, made now).
Each peer's input is converted to its own form once, outside the timed call, as a hot loop would do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae_rt.backends.openvino import int8_layers
from vae_rt.cache import describe, onnx_entry_problem
from vae_rt.capabilities import native_bf16, openvino_core
from vae_rt.checkpoint import load_checkpoint
from vae_rt.files import sha256_file
from vae_rt.model import INPUT_NAME

log = logging.getLogger(__name__)

PEERS = {  # name -> (the rows' backend column, precision)
    "torch.compile": ("peer torch.compile", "fp32"),
    "ort": ("peer ort", "fp32"),
    "openvino-f32": ("peer openvino", "fp32"),
    "openvino-bf16": ("peer openvino", "bf16"),
    "ort-int8": ("peer ort", "int8"),
    "openvino-int8": ("peer openvino", "int8"),
}


@dataclass(frozen=True)
class Peer:
    name: str  # the row's backend column, e.g. 'peer ort'
    precision: str
    runs_on: str
    prepare: Callable[[torch.Tensor], Callable[[], Any]]  # latents -> the timed call, on inputs already converted


def open_peers(names: tuple[str, ...], checkpoint: Path, onnx_fp32: Path, work_dir: Path) -> tuple[list[Peer], list[tuple[str, str, str]]]:
    """The peers in `names` that can run here, and (name, precision, why) for those that cannot."""
    int8 = functools.cache(lambda: int8_model(checkpoint, onnx_fp32, work_dir))  # one file for both int8 peers, made once
    makers = {
        "torch.compile": lambda: _torch_compile(checkpoint),
        "ort": lambda: _ort_session("fp32", onnx_fp32),
        "openvino-f32": lambda: _openvino(onnx_fp32, "f32"),
        "openvino-bf16": lambda: _openvino(onnx_fp32, "bf16"),
        "ort-int8": lambda: _ort_session("int8", int8()),
        "openvino-int8": lambda: _openvino(int8(), "int8"),
    }
    peers, skipped = [], []
    for name in names:
        try:
            peers.append(makers[name]())
        except (ImportError, PeerUnavailable) as why:
            skipped.append((*PEERS[name], str(why)))
    return peers, skipped


class PeerUnavailable(Exception):
    """This peer cannot run on this machine (the reason is the message)."""


def _torch_compile(checkpoint: Path) -> Peer:
    decoder = torch.compile(load_checkpoint(checkpoint)[0].decoder().eval())

    def prepare(z: torch.Tensor) -> Callable[[], Any]:
        def call() -> torch.Tensor:
            with torch.no_grad():
                return decoder(z)

        return call

    return Peer("peer torch.compile", "fp32", "torch.compile(decoder), inductor, no_grad", prepare)


def _ort_session(precision: str, path: Path) -> Peer:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # the library's defaults

    def prepare(z: torch.Tensor) -> Callable[[], Any]:
        feed = {INPUT_NAME: z.numpy()}
        return lambda: session.run(None, feed)

    return Peer("peer ort", precision, f"onnxruntime InferenceSession.run on {path.name}", prepare)


def _openvino(path: Path, precision: str) -> Peer:
    """OpenVINO at hint `precision` ('f32' or 'bf16'), or an int8 model ('int8') whose layers must really run in int8."""
    import openvino as ov
    import openvino.properties.hint as hints

    core = openvino_core()
    if precision == "bf16" and not native_bf16():
        raise PeerUnavailable("this CPU has no native bf16 (OpenVINO would run f32)")
    # int8: what is not quantized in fp32, as vae-rt runs it (the plugin's default is bf16 on a bf16 CPU)
    compiled = core.compile_model(str(path), "CPU", {hints.inference_precision: ov.Type.f32 if precision == "int8" else getattr(ov.Type, precision)})
    if precision == "int8" and not int8_layers(compiled.get_runtime_model()):
        raise PeerUnavailable(f"openvino runs no layer of {path.name} in int8 here (export the static int8 model: vae-rt export)")

    def prepare(z: torch.Tensor) -> Callable[[], Any]:
        array = z.numpy()
        return lambda: compiled(array)  # CompiledModel.__call__ reuses one infer request

    hint = "f32" if precision == "int8" else precision
    return Peer("peer openvino", PEERS[f"openvino-{precision}"][1], f"openvino CompiledModel on {path.name}, hint {hint}", prepare)


def int8_model(checkpoint: Path, onnx_fp32: Path, work_dir: Path) -> Path:
    """The cached int8 export of `checkpoint` beside its fp32 one, when there is one and it checks out
    (`cache.onnx_entry_problem`), else ONNX Runtime's dynamic quantization of the fp32 file."""
    exported = onnx_fp32.with_name(onnx_fp32.name.replace(".fp32.onnx", ".int8.onnx"))
    if exported.exists() and exported != onnx_fp32:
        problem = onnx_entry_problem(exported, sha256_file(checkpoint), "int8")
        if problem is None:
            return exported
        log.warning("int8 peers: %s cannot be used (%s); quantizing dynamically instead", describe(exported), problem)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = Path(work_dir) / "decoder.dynamic-int8.onnx"
    quantize_dynamic(onnx_fp32, quantized, per_channel=True, weight_type=QuantType.QInt8)
    log.info("int8 peers: no exported int8 model; quantized %s dynamically into %s", onnx_fp32, quantized)
    return quantized
