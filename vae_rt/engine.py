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

from vae_rt import __version__
from vae_rt.artifacts import EngineSpec, engine_path_for, inspect_onnx, read_manifest, spec_mismatches, write_manifest
from vae_rt.capabilities import capturing_logger, current_platform
from vae_rt.errors import RuntimeFailure, UserError, require
from vae_rt.files import make_dir, sha256_file, write_atomic
from vae_rt.model import INPUT_NAME

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 1 << 30
OPTIMIZATION_LEVEL = 3  # TensorRT's default; higher levels search longer for a three-layer net
DEFAULT_MAX_BATCH = 65536
DEFAULT_OPT_BATCH = 1024


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
) -> tuple[Path, bool]:
    """Build (or reuse) the engine of an fp16 ONNX decoder for this GPU.

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
        max_batch=max_batch, optimization_level=OPTIMIZATION_LEVEL, **asdict(platform),
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
    timing_cache = engine_dir / f"timing-cache.trt{platform.tensorrt}.sm{platform.compute_capability}.bin"
    plan = _build_plan(onnx_path, spec, timing_cache)
    write_atomic(path, plan)
    write_manifest(path, {
        "kind": "tensorrt-plan",
        "file": path.name,
        "sha256": sha256_file(path),
        "spec": asdict(spec),
        "onnx": str(onnx_path),
        "vae_rt": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return path, True


def _build_plan(onnx_path: Path, spec: EngineSpec, timing_cache: Path) -> bytes:
    """The TensorRT calls: a strongly typed network (fp16 comes from the ONNX itself), one profile."""
    trt = require("tensorrt", extra="gpu")
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: opt-in on 10.x (fp16 flag deprecated), always on and ignored on 11.x; correct on both.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeFailure(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.builder_optimization_level = spec.optimization_level
    old_cache = timing_cache.read_bytes() if timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(old_cache), ignore_mismatch=True)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (spec.min_batch, spec.z_dim), (spec.opt_batch, spec.z_dim), (spec.max_batch, spec.z_dim))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeFailure(f"TensorRT failed to build an engine from {onnx_path}: {logger.last_error()}")
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
