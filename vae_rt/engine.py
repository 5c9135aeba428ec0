"""TensorRT engines: built once from the fp16 ONNX, cached in `engines/`, validated against their manifest.

A plan only runs on the TensorRT version and GPU it was built for, and TensorRT has no preflight
check: deserializing a foreign plan just returns None. So every plan has a manifest holding its
cache key (ONNX sha256, profile, TensorRT version, GPU, ...). A matching plan is reused, a
mismatched one rebuilt, and loading a mismatched one by hand says what it was built for.
The TensorRT calls are kept thin; the decisions around them are plain functions tested on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vae_rt import __version__
from vae_rt.artifacts import (
    EngineSpec,
    engine_path_for,
    inspect_onnx,
    read_manifest,
    spec_mismatches,
    timing_cache_path,
    write_manifest,
)
from vae_rt.capabilities import current_platform, last_message, process_logger
from vae_rt.errors import RuntimeFailure, UserError, require
from vae_rt.files import make_dir, sha256_file, write_atomic
from vae_rt.model import INPUT_NAME

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30
OPTIMIZATION_LEVEL = 3  # TensorRT's default; higher levels search longer for a three-layer net
DEFAULT_MAX_BATCH = 65536
DEFAULT_OPT_BATCH = 65536  # the sampler's CUDA batch size: TensorRT picks its kernels for the opt batch


def check_profile(opt_batch: int, max_batch: int) -> None:
    if max_batch < 1:
        raise UserError(f"max_batch must be at least 1, got {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"opt_batch must be between 1 and max_batch ({max_batch}), got {opt_batch}")


def build_engine(
    onnx_path: Path,
    engine_dir: Path,
    name: str,
    opt_batch: int = DEFAULT_OPT_BATCH,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch_is: str = "opt_batch",
) -> tuple[Path, bool]:
    """Build (or reuse) the engine of an ONNX decoder for this GPU: fp16 from an fp16 ONNX, strict fp32 from an fp32 one.

    Args:
        opt_batch_is: where `opt_batch` came from, recorded in the manifest (the batch TensorRT tuned for).
    Returns:
        The plan's path and whether it was built now (False: a matching cached plan was reused).
    Raises:
        MissingDependencyError / UserError: no TensorRT or no GPU. RuntimeFailure: the build failed.
    """
    check_profile(opt_batch, max_batch)
    z_dim, _, precision = inspect_onnx(onnx_path)
    platform = current_platform()
    spec = EngineSpec(
        onnx_sha256=sha256_file(onnx_path), precision=precision, z_dim=z_dim, min_batch=1, opt_batch=opt_batch,
        max_batch=max_batch, optimization_level=OPTIMIZATION_LEVEL, **asdict(platform), tf32=allows_tf32(precision),
    )
    engine_dir = make_dir(engine_dir, "engine folder")
    path = engine_path_for(engine_dir, name, platform)
    manifest = read_manifest(path)
    if path.is_file():
        reasons = spec_mismatches(manifest, spec)
        if not reasons and manifest.get("sha256") == sha256_file(path):
            log.info("reusing %s", path)
            return path, False
        log.info("rebuilding %s: %s", path, "; ".join(reasons) or "its sha256 differs from the manifest")
    plan = _build_plan(onnx_path, spec, timing_cache_path(engine_dir, platform))
    write_atomic(path, plan)
    write_manifest(path, {
        "kind": "tensorrt-plan",
        "file": path.name,
        "sha256": sha256_file(path),
        "spec": asdict(spec),
        "opt_batch_is": opt_batch_is,
        "onnx": str(onnx_path),
        "vae_rt": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return path, True


def allows_tf32(precision: str) -> bool:
    """Whether a build may keep TensorRT's default TF32: not for an fp32 network, whose results must be fp32's.

    An fp16 network needs no precision flag (FP16 is deprecated in 10.x and gone in 11.x): under strong
    typing its ONNX types decide, and TF32 touches none of its fp16 GEMMs.
    """
    return precision != "fp32"


def network_flags(trt: Any) -> int:
    """STRONGLY_TYPED where the enum still has it (opt-in on 10.x, ignored on 11.x, which may drop the name)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def configure_build(trt: Any, builder: Any, config: Any, spec: EngineSpec, timing_cache: bytes) -> Any:
    """Set up `config` for `spec`: workspace, TF32, the timing cache, one profile tuned for `spec.opt_batch`.

    Returns:
        The timing cache attached, which must outlive the build.
    """
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.builder_optimization_level = spec.optimization_level
    if not spec.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = attach_timing_cache(config, timing_cache)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (spec.min_batch, spec.z_dim), (spec.opt_batch, spec.z_dim), (spec.max_batch, spec.z_dim))
    config.add_optimization_profile(profile)
    return cache


def attach_timing_cache(config: Any, data: bytes) -> Any:
    """The saved timing cache when TensorRT verifies that it fits this GPU, else a new one (logged).

    Loaded with `ignore_mismatch=False`: a cache from another device would feed it foreign timings.
    """
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except RuntimeError as error:  # unreadable bytes
            log.info("timing cache unreadable (%s); starting a new one", error)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log.info("the saved timing cache does not fit this GPU or TensorRT; starting a new one")
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _build_plan(onnx_path: Path, spec: EngineSpec, timing_cache: Path) -> bytes:
    """The TensorRT calls: a strongly typed network (fp16 comes from the ONNX itself), one profile."""
    trt = require("tensorrt", extra="gpu")
    logger = process_logger(trt)
    with logger.collect() as messages:
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeFailure(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        cache = configure_build(trt, builder, config, spec, timing_cache.read_bytes() if timing_cache.is_file() else b"")
        plan = builder.build_serialized_network(network, config)  # `cache` is held until here: TensorRT asks so
    if plan is None:
        raise RuntimeFailure(f"TensorRT failed to build an engine from {onnx_path}: {last_message(messages)}")
    write_atomic(timing_cache, bytes(cache.serialize()))  # the build recorded its new timings into it
    return bytes(plan)
