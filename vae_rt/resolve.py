"""From a model path and options to an opened-ready backend: the artifact's kind, the auto choice, the cache.

Artifacts a backend needs (an ONNX file, a TensorRT engine) are exported or built once and cached,
keyed by the checkpoint's sha256. This is the one module that joins builders and backends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vae_rt.artifacts import onnx_path_for, read_manifest
from vae_rt.backends import BACKEND_CHOICES, DEVICES, PRECISIONS, BaseBackend, check_choice, get_backend, resolve_device
from vae_rt.capabilities import CUDA_EP, available_providers, engine_skip_reason
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, read_checkpoint
from vae_rt.data import cache_dir
from vae_rt.engine import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, build_engine
from vae_rt.errors import UserError
from vae_rt.export import export_onnx
from vae_rt.files import sha256_file

log = logging.getLogger(__name__)
notice = logging.getLogger("vae_rt.notice")  # slow one-time work a user should hear about even without -v

ENGINE_DIR_ENV = "VAE_RT_ENGINE_DIR"
KINDS = {".pth": "checkpoint", ".pt": "checkpoint", ".onnx": "onnx", ".plan": "plan", ".engine": "plan"}


def resolve_backend(
    model: str | Path | None, backend: str, precision: str | None, device: str, cuda_graphs: bool = True,
    serving_batch: int = DEFAULT_OPT_BATCH,
) -> tuple[BaseBackend, str | None]:
    """The backend that serves `model` (the bundled checkpoint when None), and why, when `backend` was 'auto'.

    Raises:
        UserError: unknown option, missing file or dependency, a combination that cannot run here.
    """
    check_choice("backend", backend, BACKEND_CHOICES)
    check_choice("device", device, DEVICES)
    if precision is not None:
        check_choice("precision", precision, PRECISIONS)
    path = Path(model) if model is not None else BUNDLED_CHECKPOINT
    kind = artifact_kind(path)
    why = None
    if backend == "auto":
        backend, device, why = choose_backend(kind, precision, device)
        log.info("backend auto: %s", why)
    return create_backend(backend, path, kind, precision, device, cuda_graphs, serving_batch), why


def artifact_kind(path: Path) -> str:
    """'checkpoint', 'onnx' or 'plan', from the file's extension; the file must exist."""
    if path.suffix not in KINDS:
        raise UserError(f"model {path}: unknown kind of file; expected .pth (checkpoint), .onnx or .plan")
    if not path.is_file():
        raise UserError(f"model {path}: no such file")
    return KINDS[path.suffix]


def choose_backend(kind: str, precision: str | None, device: str) -> tuple[str, str, str]:
    """(backend, device, explanation) of the fastest backend that can run `kind` here.

    On the CPU, ONNX Runtime beats torch's eager dispatch at small batches and matches it at large
    ones (docs/benchmarks.md), so it is preferred whenever onnxruntime is installed.
    """
    skipped = []
    gpu = resolve_device(device) == "cuda"  # an explicit 'cuda' without a GPU fails here, never falls back
    if kind == "plan":
        return "trt", "cuda", "a TensorRT plan runs only on trt"
    candidates = []
    no_bf16_onnx = "vae-rt exports ONNX in fp32 and fp16 only" if precision == "bf16" else None
    if gpu:
        trt_reason = engine_skip_reason() or ("trt serves fp16 only" if precision not in (None, "fp16") else None)
        candidates += [("trt", "cuda", trt_reason)]
        ort_reason = None if CUDA_EP in available_providers() else "onnxruntime has no CUDAExecutionProvider"
        candidates += [("ort", "cuda", ort_reason or no_bf16_onnx)]
        candidates += [("torch", "cuda", "an ONNX file cannot run on torch" if kind == "onnx" else None)]
    elif device == "auto":
        skipped.append("GPU backends: torch sees no CUDA GPU")
    cpu_ort_reason = None if available_providers() else "onnxruntime is not installed (pip install 'vae-rt[cpu]')"
    if device != "cuda":  # "auto" falls back to the CPU; an explicit "cuda" never does
        candidates += [("ort", "cpu", cpu_ort_reason or no_bf16_onnx)]
        candidates += [("torch", "cpu", "an ONNX file cannot run on torch" if kind == "onnx" else None)]
    for name, dev, reason in candidates:
        if reason is None:
            because = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            return name, dev, f"chose {name} on {dev}{because}"
        skipped.append(f"{name} on {dev}: {reason}")
    raise UserError("no backend can run this model here: " + "; ".join(skipped))


def create_backend(
    backend: str, path: Path, kind: str, precision: str | None, device: str, cuda_graphs: bool,
    serving_batch: int = DEFAULT_OPT_BATCH,
) -> BaseBackend:
    """Backend `backend` on the artifact it needs, exported or built (and cached) from a checkpoint when needed."""
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "torch":
        if kind != "checkpoint":
            raise UserError(f"backend torch needs a checkpoint (.pth), got {path}")
        return get_backend("torch", checkpoint=path, precision=precision or ("fp16" if on_gpu else "fp32"),
                           device=device, cuda_graphs=cuda_graphs)
    if backend == "ort":
        if kind == "plan":
            raise UserError(f"backend ort needs a checkpoint or an ONNX file, got the TensorRT plan {path}")
        ort_on_gpu = on_gpu and CUDA_EP in available_providers()
        onnx_path = path if kind == "onnx" else cached_onnx(path, precision or ("fp16" if ort_on_gpu else "fp32"))
        return get_backend("ort", onnx_path=onnx_path, precision=precision, device=device)
    reason = engine_skip_reason()
    if reason:
        raise UserError(f"backend trt: {reason}")
    engine_path = path if kind == "plan" else cached_engine(path, kind, serving_batch)
    return get_backend("trt", engine_path=engine_path, precision=precision, device=device, cuda_graphs=cuda_graphs)


def cached_onnx(checkpoint: Path, precision: str) -> Path:
    """The ONNX export of `checkpoint`, made once per checkpoint content and precision."""
    if precision not in ("fp32", "fp16"):
        raise UserError(f"backend ort serves fp32 or fp16 models, not {precision}")
    digest = sha256_file(checkpoint)
    out_dir = cache_dir() / "onnx"
    path = onnx_path_for(out_dir, digest[:16], precision)
    manifest = read_manifest(path)
    if path.is_file() and manifest and manifest.get("source_checkpoint", {}).get("sha256") == digest:
        return path
    read_checkpoint(checkpoint)  # a bad checkpoint is refused before the notice of an export that cannot start
    notice.info("exporting %s to ONNX %s (once; cached in %s)", checkpoint.name, precision, out_dir)
    return export_onnx(checkpoint, out_dir, precision, name=digest[:16]).path


def cached_engine(path: Path, kind: str, serving_batch: int = DEFAULT_OPT_BATCH) -> Path:
    """A TensorRT plan for a checkpoint or ONNX file, built once per content, GPU, TensorRT version and batch size.

    The profile's opt batch is the batch that will serve (the backend chunks at the profile max):
    TensorRT picks its kernels for that one size.
    """
    onnx_path = path if kind == "onnx" else cached_onnx(path, "fp16")
    engine_dir = Path(os.environ.get(ENGINE_DIR_ENV) or cache_dir() / "engines")
    opt_batch = min(serving_batch, DEFAULT_MAX_BATCH)
    name = f"{onnx_path.name.removesuffix('.onnx')}.opt{opt_batch}"  # one file per opt batch: no rebuild when sizes alternate
    plan, built = build_engine(onnx_path, engine_dir, name, opt_batch, opt_batch_is="the sampler's batch size")
    if built:
        notice.info("built the TensorRT engine %s (once; cached)", plan)
    return plan
