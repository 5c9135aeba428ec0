"""The cache folder (`$VAE_RT_CACHE_DIR`, default `~/.cache/vae_rt`): unpacked MNIST, ONNX exports, engines.

Anything in it may have been altered, truncated or replaced since it was written, so an entry is
verified before it is used, and one that fails is made again after one warning, never served.
Problems with the folder itself name the variable: it is what the user controls about it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vae_rt.errors import UserError
from vae_rt.files import check_writable_folder, sha256_file, write_atomic

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "VAE_RT_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "vae_rt")


def describe(path: Path) -> str:
    """`path` as a message names it: a place under the cache folder, and the variable that sets it."""
    return f"{path} (in the cache folder, ${CACHE_DIR_ENV})"


def cache_folder(name: str) -> Path:
    """`cache_dir() / name`, created and writable, or one line naming $VAE_RT_CACHE_DIR."""
    path = cache_dir() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        check_writable_folder(path)
    except OSError as err:
        why = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
        raise cache_error(path, why) from err
    return path


def cache_error(path: Path, why: str) -> UserError:
    """The error for a cache folder that cannot be used: what went wrong and the way out."""
    return UserError(f"cache folder {cache_dir()}: cannot write {path} ({why}); set {CACHE_DIR_ENV} to a writable folder with free space")


def onnx_entry_problem(path: Path, source_sha256: str, precision: str) -> str | None:
    """Why the cached export at `path` must not be served (None: it may): its manifest, its own sha256, its I/O."""
    from vae_rt.artifacts import (  # onnx: only where an entry is read
        EXPORT_REVISION,
        OnnxModelError,
        inspect_onnx,
        io_contract,
        read_manifest,
    )

    manifest = read_manifest(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("source_checkpoint"), dict):
        return "its manifest is missing, unreadable or malformed"
    if manifest["source_checkpoint"].get("sha256") != source_sha256 or manifest.get("precision") != precision:
        return "its manifest describes another checkpoint or precision"
    if manifest.get("export_revision") != EXPORT_REVISION:
        return "an older vae-rt exported it"
    if manifest.get("sha256") != sha256_file(path):
        return "its sha256 differs from its manifest's: altered, replaced or truncated"
    try:
        z_dim, x_dim, found = inspect_onnx(path)
    except OnnxModelError as err:
        return str(err).removeprefix(f"{path}: ")
    recorded = {k: manifest.get(k) for k in ("inputs", "outputs")}
    if recorded != io_contract(z_dim, x_dim) or found != precision:
        return f"it holds a {found} model with z_dim {z_dim}, not what its manifest records"
    return None


def record_path(kind: str, key: Mapping[str, Any]) -> Path:
    """Where the record of `kind` ('tuning', 'gates') for `key` lives: one file per key."""
    return cache_dir() / kind / f"{json_digest(key)[:16]}.json"


def json_digest(value: Any) -> str:
    """sha256 of `value` as JSON stores it (int keys become strings first, so a reread digests the same)."""
    canonical = json.loads(json.dumps(value))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def save_record(path: Path, key: Mapping[str, Any], value: Any) -> None:
    """A measurement or verdict for `key`, with a checksum over both, written atomically."""
    payload = {"key": key, "value": value}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({**payload, "sha256": json_digest(payload)}, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        raise cache_error(path, err.strerror or str(err)) from err


def load_record(path: Path, key: Mapping[str, Any]) -> Any | None:
    """The value saved for `key`, or None (logged) when the file is missing, unreadable, altered or for another key."""
    try:
        stored = json.loads(path.read_text())
        payload = {"key": stored["key"], "value": stored["value"]}
        intact = stored["sha256"] == json_digest(payload)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; made again", describe(path))
        return None
    if not intact:
        log.warning("%s was altered (its checksum differs); made again", describe(path))
        return None
    if stored["key"] != json.loads(json.dumps(key)):  # a digest collision of the file name: not an error
        log.info("%s is for another machine, model or version; made again", describe(path))
        return None
    return stored["value"]
