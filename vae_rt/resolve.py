"""From a model path and options to an opened-ready backend: the artifact's kind, the auto choice, the cache.

Artifacts a backend needs (an ONNX file, a TensorRT engine) are exported or built once and cached,
keyed by the checkpoint's sha256. This is the one module that joins builders and backends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vae_rt.artifacts import inspect_onnx, manifest_mismatch, onnx_path_for
from vae_rt.backends import (
    BACKEND_CHOICES,
    DEVICES,
    OPENVINO_ONNX_FOR_PRECISION,
    PRECISIONS,
    BaseBackend,
    check_choice,
    get_backend,
    resolve_device,
)
from vae_rt.cache import cache_error, cache_folder, describe, onnx_entry_problem
from vae_rt.capabilities import CUDA_EP, available_providers, engine_skip_reason, native_bf16
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, read_checkpoint
from vae_rt.engine import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, build_engine
from vae_rt.errors import RuntimeFailure, UserError, notice
from vae_rt.export import EXPORT_PRECISIONS, export_onnx
from vae_rt.files import sha256_file

log = logging.getLogger(__name__)

ENGINE_DIR_ENV = "VAE_RT_ENGINE_DIR"
PRECISION_CHOICES = (*PRECISIONS, "auto")  # auto: the fastest precision whose quality gate passed (CPU)
FAILED_EXPORTS: dict[Path, str] = {}  # cache entry -> why its export failed in this process (its file named)
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
        check_choice("precision", precision, PRECISION_CHOICES)
    if precision == "auto" and backend != "auto":
        raise UserError("precision auto needs backend auto")
    path = Path(model) if model is not None else BUNDLED_CHECKPOINT
    kind = artifact_kind(path)
    why = None
    if backend == "auto":
        # precision 'auto' on a GPU is its default already: fp16, the fastest that passes parity
        backend, device, why = choose_backend(kind, None if precision == "auto" else precision, device)
        if device == "cpu" and kind != "plan":
            chosen, why = cpu_auto_backend(path, kind, precision)
        else:
            chosen = create_backend(backend, path, kind, precision, device, cuda_graphs, serving_batch)
        log.info("backend auto: %s", why)
        return chosen, why
    return create_backend(backend, path, kind, precision, device, cuda_graphs, serving_batch), why


def cpu_auto_backend(path: Path, kind: str, precision: str | None) -> tuple[BaseBackend, str]:
    """`auto` on the CPU, and why: the engines that can serve `precision` here, chosen per batch size by a cached timing run.

    With precision 'auto', reduced-precision engines join fp32 once their quality gate passed on this
    model; the gate scores the test set through the model's encoder, so it needs the checkpoint.
    """
    from vae_rt.backends.auto import AutoBackend
    from vae_rt.tuning import candidate_engines, requested_precisions

    installed = {"torch"} | ({"ort"} if available_providers() else set()) | ({"openvino"} if _installed("openvino") else set())
    z_dim, stored = latent_size_and_precision(path, kind)
    if stored != "fp32":  # the file holds one precision: that one, or a refusal, as every backend says
        if precision not in (None, "auto", stored):
            raise UserError(f"{path} is an {stored} model, not {precision}")
        precisions = [stored]
    elif precision == "auto" and kind != "checkpoint":
        notice.info("precision auto: %s is not a checkpoint, and a reduced precision is judged through its encoder: fp32 only", path)
        precisions = ["fp32"]
    else:
        precisions = requested_precisions(precision, native_bf16())
    engines = candidate_engines(precisions, kind, stored, installed, native_bf16())
    if not engines:
        raise UserError(f"no CPU backend can run {path} in {', '.join(precisions)} here")

    def make(backend: str, engine_precision: str) -> BaseBackend:
        return create_backend(backend, path, kind, engine_precision, "cpu", cuda_graphs=False)

    digest = sha256_file(path)
    gate_lines: list[str] = []
    if precision == "auto" and len(precisions) > 1:
        from vae_rt.gates import passing_engines

        engines, gate_lines = passing_engines(engines, make, path, digest)
    gates = f"; quality gates: {'; '.join(gate_lines)}" if gate_lines else ""
    if len(engines) == 1:  # nothing to choose between, nothing to time
        return make(*engines[0]), f"{' '.join(engines[0])} is the only CPU engine for {', '.join(precisions)} here{gates}"
    auto = AutoBackend(engines, make, digest, z_dim).open()
    return auto, auto.why + gates


def latent_size_and_precision(path: Path, kind: str) -> tuple[int, str]:
    """(z_dim, stored precision) of a checkpoint or an ONNX file, read without opening an engine."""
    if kind == "onnx":
        z_dim, _, stored = inspect_onnx(path)
        return z_dim, stored
    return read_checkpoint(path)["config"].z_dim, "fp32"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def artifact_kind(path: Path) -> str:
    """'checkpoint', 'onnx' or 'plan', from the file's extension. The file must exist, and an ONNX file
    with a manifest beside it must be the file that manifest describes (its quality gate and parity
    were recorded for that file only)."""
    if path.suffix not in KINDS:
        raise UserError(f"model {path}: unknown kind of file; expected .pth (checkpoint), .onnx or .plan")
    if not path.is_file():
        raise UserError(f"model {path}: no such file")
    kind = KINDS[path.suffix]
    if kind == "onnx" and (mismatch := manifest_mismatch(path)):
        raise UserError(f"model {path}: {mismatch}; export it again, or delete the manifest to serve the file as it is")
    return kind


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
    no_bf16_onnx = "vae-rt exports ONNX in fp32, fp16 and int8 only" if precision == "bf16" else None
    no_torch_int8 = "torch has no int8 decoder" if precision == "int8" else None
    if gpu:
        trt_reason = engine_skip_reason() or ("trt serves fp16 only" if precision not in (None, "fp16") else None)
        candidates += [("trt", "cuda", trt_reason)]
        ort_reason = None if CUDA_EP in available_providers() else "onnxruntime has no CUDAExecutionProvider"
        int8_on_cpu = "the int8 model is checked and served on the CPU provider" if precision == "int8" else None
        candidates += [("ort", "cuda", ort_reason or no_bf16_onnx or int8_on_cpu)]
        candidates += [("torch", "cuda", "an ONNX file cannot run on torch" if kind == "onnx" else no_torch_int8)]
    elif device == "auto":
        skipped.append("GPU backends: torch sees no CUDA GPU")
    cpu_ort_reason = None if available_providers() else "onnxruntime is not installed (pip install 'vae-rt[cpu]')"
    if device != "cuda":  # "auto" falls back to the CPU; an explicit "cuda" never does
        candidates += [("ort", "cpu", cpu_ort_reason or no_bf16_onnx)]
        openvino_reason = None if _installed("openvino") else "openvino is not installed (pip install 'vae-rt[cpu]')"
        candidates += [("openvino", "cpu", openvino_reason or ("openvino serves fp32, bf16 and int8" if precision == "fp16" else None))]
        candidates += [("torch", "cpu", "an ONNX file cannot run on torch" if kind == "onnx" else no_torch_int8)]
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
    if backend == "openvino":
        if kind == "plan":
            raise UserError(f"backend openvino needs a checkpoint or an ONNX file, got the TensorRT plan {path}")
        from vae_rt.backends.openvino import check_request

        check_request(precision, device)  # before a slow export for a request it would refuse
        onnx_path = path if kind == "onnx" else cached_onnx(path, OPENVINO_ONNX_FOR_PRECISION[precision or "fp32"])
        return get_backend("openvino", onnx_path=onnx_path, precision=precision, device=device)
    reason = engine_skip_reason()
    if reason:
        raise UserError(f"backend trt: {reason}")
    engine_path = path if kind == "plan" else cached_engine(path, kind, serving_batch)
    return get_backend("trt", engine_path=engine_path, precision=precision, device=device, cuda_graphs=cuda_graphs)


def cached_onnx(checkpoint: Path, precision: str) -> Path:
    """The ONNX export of `checkpoint`, made once per checkpoint content and precision."""
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f"backend ort serves {', '.join(EXPORT_PRECISIONS)} models, not {precision}")
    digest = sha256_file(checkpoint)
    out_dir = cache_folder("onnx")
    path = onnx_path_for(out_dir, digest[:16], precision)
    if path.exists():
        problem = onnx_entry_problem(path, digest, precision)
        if problem is None:
            return path
        log.warning("%s cannot be used (%s): exporting it again", describe(path), problem)
    if path in FAILED_EXPORTS:  # e.g. an int8 that failed its gate, asked for again by another int8 engine
        raise RuntimeFailure(_named_by(checkpoint, precision, path, FAILED_EXPORTS[path]))
    read_checkpoint(checkpoint)  # a bad checkpoint is refused before the notice of an export that cannot start
    notice.info("exporting %s to ONNX %s (once; cached in %s)", checkpoint.name, precision, out_dir)
    try:
        return export_onnx(checkpoint, out_dir, precision, name=digest[:16]).path
    except OSError as err:  # a full or read-only cache: the variable is what the user can change
        raise cache_error(path, err.strerror or str(err)) from err
    except RuntimeFailure as err:
        FAILED_EXPORTS[path] = str(err)  # the message only: the error's frames hold the training set
        raise RuntimeFailure(_named_by(checkpoint, precision, path, str(err))) from err


def _named_by(checkpoint: Path, precision: str, entry: Path, message: str) -> str:
    """A failed export's message about the cache entry, naming the checkpoint the user gave instead of its digest."""
    return message.replace(entry.name, f"the {precision} export of {checkpoint.name}")


def cached_engine(path: Path, kind: str, serving_batch: int = DEFAULT_OPT_BATCH) -> Path:
    """A TensorRT plan for a checkpoint or ONNX file, built once per content, GPU, TensorRT version and batch size.

    The profile's opt batch is the batch that will serve (the backend chunks at the profile max):
    TensorRT picks its kernels for that one size.
    """
    onnx_path = path if kind == "onnx" else cached_onnx(path, "fp16")
    engine_dir = Path(os.environ[ENGINE_DIR_ENV]) if os.environ.get(ENGINE_DIR_ENV) else cache_folder("engines")
    opt_batch = min(serving_batch, DEFAULT_MAX_BATCH)
    name = f"{onnx_path.name.removesuffix('.onnx')}.opt{opt_batch}"  # one file per opt batch: no rebuild when sizes alternate
    plan, built = build_engine(onnx_path, engine_dir, name, opt_batch, opt_batch_is="the sampler's batch size")
    if built:
        notice.info("built the TensorRT engine %s (once; cached)", plan)
    return plan
