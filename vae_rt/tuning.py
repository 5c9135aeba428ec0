"""How `auto` picks a CPU engine per batch size: a short timing run on this machine, cached and reused.

Which engine is fastest depends on the batch size (per-call overhead rules batch 1, GEMM kernels rule
large batches) and on the machine (vector extensions, core count, library versions), so it is
measured rather than assumed. Like TensorRT's timing cache, the result is stored once per machine,
library versions and model (sha256), verified when read, and written atomically.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vae_rt import __version__
from vae_rt.backends import OPENVINO_ONNX_FOR_PRECISION
from vae_rt.cache import load_record, record_path, save_record
from vae_rt.machine import cpu_isa, cpu_model
from vae_rt.timing import SETTLE_SECONDS, time_calls

log = logging.getLogger(__name__)

PROBE_BATCHES = (1, 32, 2048)  # latency-bound to GEMM-bound (the CPU batch, `sampler.DEFAULT_BATCH`); other sizes take the nearest probe's winner
ROUNDS = 3  # interleaved: a drift on a shared machine hits every engine alike
ROUND_SECONDS = 0.04  # per engine, probe and round (at least 2 calls; 5 at the CPU batch in fp32): a few seconds in all
TUNING_REVISION = 5  # raised when how an engine is timed or decodes changes (2: NaN check off torch's pool; 3: settle; 4: no scan within the overflow-free radius, openvino writes into the result; 5: switch costs), so caches re-tune
NEAR_TIE = 0.05  # an engine this much slower than the fastest at a probe may serve it, if that spares holding another engine
SWITCH_CALLS = 5  # switches timed per pair of winners and probe; their median is kept
Timings = dict[str, dict[int, float]]  # engine label ('ort fp32') -> probe batch -> median seconds per call
Switches = dict[str, dict[str, dict[int, float]]]  # engine that ran -> engine called right after -> probe -> extra seconds


@dataclass(frozen=True)
class Tuned:
    """What `auto` measured on this machine: each engine's time per call, and what each switch costs."""

    timings: Timings
    switches: Switches


def engine_label(backend: str, precision: str) -> str:
    return f"{backend} {precision}"


def tuning_key(model_sha256: str, engines: list[str], probes: tuple[int, ...] = PROBE_BATCHES) -> dict[str, Any]:
    """Everything the timings depend on; a cached result is reused only when all of it matches."""
    return {
        "revision": TUNING_REVISION,
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "model_sha256": model_sha256,
        "engines": sorted(engines),
        "probes": list(probes),
    }


def library_versions() -> dict[str, str]:
    """The versions every timing and quality verdict depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"vae_rt": __version__, "torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def cache_path(key: Mapping[str, Any]) -> Path:
    return record_path("tuning", key)


def save_tuning(path: Path, key: Mapping[str, Any], tuned: Tuned) -> None:
    save_record(path, key, {"timings": tuned.timings, "switches": tuned.switches})


def load_tuning(path: Path, key: Mapping[str, Any]) -> Tuned | None:
    """What was measured for `key`, or None (logged) when the file is missing, altered, incomplete, or from another machine or model.

    An engine of the key may be missing: it could not run on this machine when the timings were taken.
    """
    stored = load_record(path, key)
    try:
        timings = {engine: {int(b): float(s) for b, s in per_batch.items()} for engine, per_batch in stored["timings"].items()}
        switches = {
            before: {after: {int(p): float(s) for p, s in per_probe.items()} for after, per_probe in afters.items()}
            for before, afters in stored["switches"].items()
        }
    except (AttributeError, ValueError, TypeError, KeyError):
        return None  # None itself, or not tables of numbers
    if not complete(timings, switches, key):
        log.info("tuning cache %s does not time every engine at every probe and every switch; measuring again", path)
        return None
    return Tuned(timings, switches)


def complete(timings: Timings, switches: Switches, key: Mapping[str, Any]) -> bool:
    """Whether the tables hold a positive time for each engine of `key` (some may be missing) at every probe,
    and a cost of zero or more for every switch between the winners, and nothing else."""
    per_engine = bool(timings) and set(timings) <= set(key["engines"]) and all(
        sorted(per_batch) == sorted(key["probes"]) and all(math.isfinite(s) and s > 0 for s in per_batch.values())
        for per_batch in timings.values()
    )
    if not per_engine:
        return False
    costs = {(before, after, p): s for before, afters in switches.items() for after, per_probe in afters.items() for p, s in per_probe.items()}
    return sorted(costs) == sorted(switch_points(timings)) and all(math.isfinite(s) and s >= 0 for s in costs.values())


def measure(
    calls: Mapping[str, Callable[[torch.Tensor], Any]],
    z_dim: int,
    probes: tuple[int, ...] = PROBE_BATCHES,
    rounds: int = ROUNDS,
    seconds: float = ROUND_SECONDS,
) -> Timings:
    """Median seconds per call of each engine's decode at each probe batch, engines interleaved round by round."""
    latencies: dict[str, dict[int, list[float]]] = {label: {b: [] for b in probes} for label in calls}
    for batch in probes:
        z = torch.randn(batch, z_dim, generator=torch.Generator().manual_seed(batch))
        for round_ in range(rounds):
            for label, decode in calls.items():
                timing = time_calls(functools.partial(decode, z), warmup=seconds if round_ == 0 else 0.0,
                                    min_duration=seconds, min_iterations=2, settle=SETTLE_SECONDS)
                latencies[label][batch] += timing.latencies
    return {label: {b: _median(values) for b, values in per_batch.items()} for label, per_batch in latencies.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def nearest_probe(batch: int, probes: list[int] | tuple[int, ...]) -> int:
    """The probe closest to `batch` on a log scale (ties go to the larger probe): cost per call scales with log size."""
    return min(probes, key=lambda p: (abs(math.log2(max(batch, 1)) - math.log2(p)), -p))


def serving_engine(timings: Timings, batch: int) -> str:
    """The engine that serves `batch`: the winner at the probe nearest to it."""
    return winners(timings)[nearest_probe(batch, probes_of(timings))]


def probes_of(timings: Timings) -> list[int]:
    return sorted(next(iter(timings.values())))


def winners(timings: Timings) -> dict[int, str]:
    """probe -> the engine that serves it: the fastest there, unless an engine within NEAR_TIE of it serves
    other probes anyway. Each engine `auto` holds slows the others (their threads and caches share the
    cores), so the fewest engines are chosen that come within NEAR_TIE of the fastest at every probe
    (greedily: the one that covers most probes first, the quicker one on a tie)."""
    probes = probes_of(timings)
    near = {p: {e for e in timings if timings[e][p] <= (1 + NEAR_TIE) * min(t[p] for t in timings.values())} for p in probes}
    chosen, uncovered = [], set(probes)
    while uncovered:
        engine = max(sorted(timings), key=lambda e: (sum(e in near[p] for p in uncovered), -sum(timings[e].values())))
        chosen.append(engine)
        uncovered -= {p for p in uncovered if engine in near[p]}
    return {p: min((e for e in chosen if e in near[p]), key=lambda e: timings[e][p]) for p in probes}


def switch_points(timings: Timings) -> list[tuple[str, str, int]]:
    """(engine that ran, engine called right after it, probe): every switch `auto` can make, into each
    probe's winner from another winner."""
    won = winners(timings)
    return [(before, after, probe) for probe, after in won.items() for before in sorted(set(won.values()) - {after})]


def measure_switches(calls: Mapping[str, Callable[[torch.Tensor], Any]], timings: Timings, z_dim: int, repeats: int = SWITCH_CALLS) -> Switches:
    """How much longer a winner's call takes when it starts right after another winner's call returned,
    while that engine's threads still spin (`vae_rt.dispatch`): timed at each probe the second engine
    wins, the first running at the smallest probe it wins itself."""
    own_probe: dict[str, int] = {}
    for probe, label in winners(timings).items():
        own_probe.setdefault(label, probe)
    latents = {probe: torch.randn(probe, z_dim, generator=torch.Generator().manual_seed(probe)) for probe in probes_of(timings)}
    switches: Switches = {}
    for before, after, probe in switch_points(timings):
        taken = []
        for _ in range(repeats):
            calls[before](latents[own_probe[before]])
            started = time.perf_counter()
            calls[after](latents[probe])
            taken.append(time.perf_counter() - started)
        switches.setdefault(before, {}).setdefault(after, {})[probe] = max(0.0, _median(taken) - timings[after][probe])
    return switches


def explain(timings: Timings) -> str:
    """One line: the engine serving each probe batch and its lead over the runner-up, e.g. 'batch 1: ort fp32 (24 us, 1.40x over ...)',
    or how much faster the engine it stands in for was."""
    parts = []
    for probe, winner in winners(timings).items():
        ranked = sorted(timings, key=lambda engine: timings[engine][probe])
        if ranked[0] != winner:
            why = f", {timings[winner][probe] / timings[ranked[0]][probe]:.2f}x the time of {ranked[0]}, one engine fewer"
        else:
            why = f", {timings[ranked[1]][probe] / timings[winner][probe]:.2f}x over {ranked[1]}" if len(ranked) > 1 else ""
        parts.append(f"batch {probe}: {winner} ({timings[winner][probe] * 1e6:.0f} us{why})")
    return "; ".join(parts)


def explain_switches(switches: Switches) -> str:
    """One line: what each switch cost when timed, e.g. 'ort fp32 -> openvino fp32 at batch 2048: +7800 us'."""
    costs = [f"{before} -> {after} at batch {probe}: +{seconds * 1e6:.0f} us"
             for before, afters in sorted(switches.items()) for after, per_probe in sorted(afters.items()) for probe, seconds in sorted(per_probe.items())]
    return "; ".join(costs) or "none (one engine wins at every probe)"


CPU_ENGINES = {  # precision -> the backends serving it on the CPU
    "fp32": ("ort", "openvino", "torch"),
    "bf16": ("openvino", "torch"),
    "fp16": ("ort",),
    "int8": ("ort", "openvino"),
}
# What `precision="auto"` may add to fp32 once its quality gate passed. Not fp16: ONNX Runtime's CPU
# provider computes it in fp32 and converts around it, slower than fp32 (docs/benchmarks.md).
AUTO_REDUCED = ("bf16", "int8")


def requested_precisions(precision: str | None, bf16_native: bool) -> list[str]:
    """The precisions `auto` may time: fp32 by default; with 'auto', fp32 and the reduced ones worth judging here.

    bf16 only where the CPU has it natively: emulated, it is several times slower than fp32.
    """
    if precision is None:
        return ["fp32"]
    if precision == "auto":
        return ["fp32", *(p for p in AUTO_REDUCED if p != "bf16" or bf16_native)]
    return [precision]


def candidate_engines(precisions: list[str], kind: str, stored: str, installed: set[str], bf16_native: bool) -> list[tuple[str, str]]:
    """(backend, precision) pairs worth timing for a model of `kind` ('checkpoint' or 'onnx') stored in `stored`.

    torch needs a checkpoint; ort runs a checkpoint's export in any precision, or an ONNX file as it is;
    OpenVINO runs fp32 and bf16 from an fp32 file and int8 from an int8 one, and bf16 only where the
    CPU has it natively (it would fall back to fp32 otherwise, which its backend refuses). torch stays
    a bf16 candidate without native bf16: asked for explicitly, it is what has always run.
    """
    engines = []
    for precision in precisions:
        for backend in CPU_ENGINES.get(precision, ()):
            runs = {
                "torch": kind == "checkpoint",
                "ort": kind == "checkpoint" or precision == stored,
                "openvino": (kind == "checkpoint" or OPENVINO_ONNX_FOR_PRECISION.get(precision) == stored) and (precision != "bf16" or bf16_native),
            }[backend]
            if runs and backend in installed:
                engines.append((backend, precision))
    return engines
