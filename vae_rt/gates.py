"""Which reduced-precision engines a model may run under `precision="auto"`: those whose quality gate passed.

Each engine (e.g. 'ort int8', 'openvino bf16') is scored through its own decode, since kernels differ
in rounding, on the MNIST test set against the fp32 decoder (`quality.py`). The verdicts are kept per
model and library versions in the cache folder, verified when read, so the gate runs once per model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vae_rt.backends import BaseBackend
from vae_rt.cache import load_record, record_path, save_record
from vae_rt.errors import RuntimeFailure, UserError, notice
from vae_rt.machine import cpu_model
from vae_rt.model import VAE
from vae_rt.tuning import engine_label, library_versions

Factory = Callable[[str, str], BaseBackend]  # (backend, precision) -> an unopened backend
Verdict = dict[str, Any]  # {"passed": bool, "summary": one line, "lasting": False when nothing could be judged}


def passing_engines(
    engines: list[tuple[str, str]], make: Factory, checkpoint: Path, model_sha256: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """The fp32 engines, plus the reduced ones whose gate passed; and one line per reduced engine saying why.

    A gate that cannot be computed (no MNIST test set here) leaves its engine out, with the reason,
    and is not cached: it is tried again next time.
    """
    from vae_rt.artifacts import EXPORT_REVISION

    reduced = {engine_label(*e): e for e in engines if e[1] != "fp32"}
    key = {"model_sha256": model_sha256, "export_revision": EXPORT_REVISION, "cpu": cpu_model(), "versions": library_versions()}
    path = record_path("gates", key)
    record = load_record(path, key)
    cached: dict[str, Verdict] = {label: v for label, v in record.items() if _is_verdict(v)} if isinstance(record, dict) else {}
    verdicts = {label: cached[label] for label in reduced if label in cached}
    unjudged = [label for label in reduced if label not in cached]
    if unjudged:
        verdicts |= _judge_all({label: reduced[label] for label in unjudged}, make, checkpoint)
    lasting = {**cached, **{label: v for label, v in verdicts.items() if v["lasting"]}}
    if lasting != cached:
        save_record(path, key, lasting)
    kept = [e for e in engines if e[1] == "fp32" or verdicts[engine_label(*e)]["passed"]]
    return kept, [f"{label}: {verdicts[label]['summary']}" for label in reduced]


def _is_verdict(value: Any) -> bool:
    """A verdict as `_judge` writes it: a record can carry a valid checksum over anything."""
    fields = {"passed": bool, "summary": str, "lasting": bool}
    return isinstance(value, dict) and all(isinstance(value.get(name), kind) for name, kind in fields.items())


def _judge_all(engines: dict[str, tuple[str, str]], make: Factory, checkpoint: Path) -> dict[str, Verdict]:
    """Score each engine on the test set; when the test set cannot be read, say so once, without -v."""
    from vae_rt.checkpoint import load_checkpoint
    from vae_rt.data import load_mnist
    from vae_rt.evaluate import to_pixels

    try:
        model, _ = load_checkpoint(checkpoint)
        pixels = to_pixels(load_mnist()[1])
    except UserError as error:  # e.g. no MNIST test set here: nothing was judged
        notice.warning("precision auto: %s left out, as their quality gate cannot run here: %s", ", ".join(engines), error)
        return {label: {"passed": False, "summary": f"not judged: {error}", "lasting": False} for label in engines}
    return {label: _judge(engine, make, model, pixels) for label, engine in engines.items()}


def _judge(engine: tuple[str, str], make: Factory, model: VAE, pixels: torch.Tensor) -> Verdict:
    """Score one engine's decoder on the test set; a verdict is lasting unless the engine could not run."""
    from vae_rt.quality import quality_gate

    notice.info("precision auto: scoring %s on the MNIST test set (its quality gate, once per model)", engine_label(*engine))
    try:
        with make(*engine).open() as backend:
            gate = quality_gate(model, backend.decode, engine[1], pixels)
    except RuntimeFailure as error:  # e.g. an int8 export that failed its own gate, or NaN output
        return {"passed": False, "summary": f"failed: {error}", "lasting": True}
    except UserError as error:  # the engine could not be opened here: nothing was judged
        return {"passed": False, "summary": f"not judged: {error}", "lasting": False}
    return {"passed": gate.passed, "summary": gate.summary(), "lasting": True}
