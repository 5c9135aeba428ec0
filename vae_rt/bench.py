"""Throughput and latency of every backend available here, measured the way trtexec does it.

Each (backend, precision, batch) runs a warm-up period, then at least `min_duration` seconds and
`min_iterations` calls; it reports median and p90/p99 latency, samples/s, GFLOP/s, the coefficient of
variation (flagged when noisy), speed relative to plain torch fp32 eager measured in the same run,
and the share of this machine's matmul limit (the best fp32 or bf16 GEMM rate of any library here,
`gemm_limits`), also measured in the same run. `--peers` adds what a user would call instead.
Run it with `vae-rt bench --peers --json out.json --plot out.png`.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vae_rt.backends.auto import AutoBackend
from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.errors import UserError
from vae_rt.gemm_limits import SQUARE, GemmKey, GemmLimit, decoder_shapes, gemm_calls, matmul_limits
from vae_rt.limits import MAX_BATCH, MAX_BENCH_DURATION
from vae_rt.machine import cpu_isa, cpu_model
from vae_rt.peers import open_peers
from vae_rt.resolve import cached_onnx
from vae_rt.sampler import Sampler, draw_latents, open_sampler
from vae_rt.timing import SETTLE_SECONDS, Timing, time_calls

log = logging.getLogger(__name__)

NOISY_CV = 0.10  # trtexec-style warning threshold: stdev above 10% of the mean
REFERENCE = "torch-eager"  # the tutorial's own call: the decoder module under no_grad, fp32


@dataclass
class BenchRow:
    backend: str
    precision: str
    device: str
    batch: int
    runs_on: str
    samples_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cv: float
    iterations: int
    gflops: float
    vs_torch_eager: float | None = None
    pct_of_peak: float | None = None
    computes_in: str | None = None  # auto rows: the precision of the engine that decoded this batch (set for "% of peak")
    compute_p50_ms: float | None = None  # GPU only: z already on the device, images left there
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_machine() -> str:
    """CPU model, its widest vector extensions and the threads torch uses: what the numbers depend on."""
    model, isa = cpu_model(), cpu_isa()
    return f"{model} [{' '.join(isa) or 'no AVX'}], {torch.get_num_threads()} threads, torch {torch.__version__}"


def reference_decoder(checkpoint: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plain torch fp32 eager: what a user of the tutorial code would call."""
    decoder = load_checkpoint(checkpoint)[0].decoder().eval()

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decoder(z)

    return decode


def bench_targets(
    backends: list[str], precisions: list[str], device: str, include_cuda: bool = False
) -> list[tuple[str, str, str]]:
    """(backend, precision, device) triples worth timing here: every device the machine has, no pointless pairs.

    TensorRT runs only on CUDA and only fp16 (asked for on a machine without it, it is kept so that the
    report says why it was skipped); OpenVINO only on the CPU, in fp32, bf16 and int8. On the CPU, fp16 is
    timed on ONNX Runtime only (torch's CPU fp16 GEMMs are slower than fp32 there), bf16 on torch and
    OpenVINO (vae-rt exports no bf16 ONNX), int8 on ONNX Runtime and OpenVINO. `include_cuda` lists the
    CUDA rows even without a GPU.
    """
    has_cuda = include_cuda or torch.cuda.is_available()
    devices = ["cpu", "cuda"] if device == "auto" and has_cuda else ["cpu"] if device == "auto" else [device]
    targets = []
    for dev in devices:
        for backend in backends:
            for precision in precisions:
                pointless_on_cpu = (backend, precision) in (("torch", "fp16"), ("ort", "bf16"), ("openvino", "fp16")) or (
                    backend == "auto" and precision not in ("fp32", "auto")  # auto on the CPU: fp32, or the gated choice
                )
                auto_precision_elsewhere = precision == "auto" and backend != "auto"  # only backend auto chooses precisions
                cpu_only_int8 = precision == "int8" and (backend == "torch" or dev != "cpu")  # int8 is ort or openvino on the CPU
                openvino_on_cuda = backend == "openvino" and dev == "cuda"
                skip = backend == "trt" or auto_precision_elsewhere or cpu_only_int8 or openvino_on_cuda
                if skip or (dev == "cpu" and pointless_on_cpu):
                    continue
                targets.append((backend, precision, dev))
    if "trt" in backends and "fp16" in precisions and device != "cpu":
        targets.append(("trt", "fp16", "cuda"))  # on a machine without it, a row says why it was skipped
    return targets


def run_benchmarks(
    targets: list[tuple[str, str, str]],
    batch_sizes: list[int],
    model: Path | None = None,
    min_duration: float = 1.0,
    rounds: int = 5,
    on_row: Callable[[BenchRow], None] | None = None,
    peers: tuple[str, ...] = (),
) -> tuple[list[BenchRow], dict[str, GemmLimit]]:
    """Time `decode` for each (backend, precision, device) target and batch size, plus torch eager, the
    `peers` (see `vae_rt.peers`) and the matmul limits.

    The measurements of one batch size are interleaved: `rounds` rounds, each giving every target
    `min_duration / rounds` seconds. On a shared or throttling machine the drift then hits all of
    them alike, so the ratios between rows are fair even when the absolute numbers move. Each round
    starts one row later than the one before, and each slice starts with a pause (`SETTLE_SECONDS`).

    Returns:
        The rows (targets and peers that cannot run here as rows with `runs_on` = 'skipped: <why>')
        and the CPU matmul limit per precision (`gemm_limits`), both from the same run.
    """
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BATCH:
        raise UserError(f"--batch-sizes must be integers between 1 and {MAX_BATCH}, got {batch_sizes}")
    if not (math.isfinite(min_duration) and 0 <= min_duration <= MAX_BENCH_DURATION):  # 0: the minimum count of calls only
        raise UserError(f"--duration must be between 0 and {MAX_BENCH_DURATION:g} seconds, got {min_duration}")
    checkpoint = Path(model) if model is not None else BUNDLED_CHECKPOINT
    config = load_checkpoint(checkpoint)[0].config
    flop = config.decoder_flop_per_sample
    rows: list[BenchRow] = []
    samplers = []
    for backend, precision, device in targets:
        try:
            samplers.append(open_sampler(checkpoint, backend, precision, device))  # its own chunking, as users get it
        except UserError as error:
            rows.append(_skipped(backend, precision, device, str(error)))
    reference = reference_decoder(checkpoint)
    work_dir = tempfile.TemporaryDirectory(prefix="vae-rt-peers-")
    opened_peers, skipped_peers = open_peers(peers, checkpoint, cached_onnx(checkpoint, "fp32"), Path(work_dir.name)) if peers else ([], [])
    rows += [_skipped(name, precision, "cpu", why) for name, precision, why in skipped_peers]
    computed_in = {engine.precision for s in samplers for engine in s.backend.engines()} | {p.precision for p in opened_peers}
    square = gemm_calls([SQUARE], computed_in)
    matmul_latencies: dict[GemmKey, list[float]] = {}
    started = time.perf_counter()
    try:
        for batch in batch_sizes:
            z = draw_latents(batch, config.z_dim, seed=batch)
            matmuls = square | gemm_calls(decoder_shapes(checkpoint, batch), computed_in)  # timed in the same rounds as the rows
            calls = [_end_to_end(reference, z, "cpu")] + [_end_to_end(s.decode, z, s.backend.device) for s in samplers]
            calls += [peer.prepare(z) for peer in opened_peers]
            latencies: list[list[float]] = [[] for _ in calls]
            for round_ in range(rounds):
                # Each round starts one row later, so that no row always runs right after the same one
                # (an engine's threads keep a core busy for a while after its last call).
                start = round_ % len(calls)
                for index in [*range(start, len(calls)), *range(start)]:
                    latencies[index] += time_calls(
                        calls[index], warmup=0.2 if round_ == 0 else 0.0, settle=SETTLE_SECONDS,
                        min_duration=min_duration / rounds, min_iterations=max(2, 10 // rounds),
                    ).latencies
                for key, matmul in matmuls.items():  # each after a pause: every ORT GEMM is a session with its own threads
                    try:
                        timed = time_calls(matmul, warmup=0.0, settle=SETTLE_SECONDS, min_duration=0.0, min_iterations=3)
                    except Exception as error:  # noqa: BLE001 - an engine's GEMM failing here (memory): the others make the limit
                        log.info("matmul limit: %s %s %s left out this round: %s", key[1], key[0], key[2], str(error).splitlines()[0])
                        continue
                    matmul_latencies.setdefault(key, []).extend(timed.latencies)
            eager = _row(REFERENCE, "fp32", "cpu", batch, "torch fp32 eager (nn.Module, no_grad)", Timing(latencies[0]), flop)
            batch_rows = [eager] + [
                _sampler_row(s, batch, Timing(collected), flop) for s, collected in zip(samplers, latencies[1:])
            ] + [
                _row(peer.name, peer.precision, "cpu", batch, peer.runs_on, Timing(collected), flop)
                for peer, collected in zip(opened_peers, latencies[1 + len(samplers):])
            ]
            for sampler, row in zip(samplers, batch_rows[1:]):
                if sampler.backend.device == "cuda":
                    z_device = z.cuda()
                    compute = functools.partial(sampler.decode, z_device)  # images stay on the device
                    row.compute_p50_ms = time_calls(compute, min_duration=min_duration).median * 1e3
            for row in batch_rows:
                row.vs_torch_eager = eager.p50_ms / row.p50_ms
                if on_row:
                    on_row(row)
            rows += batch_rows
            log.info("batch %d timed: %d rows, %.0f s since the start", batch, len(batch_rows), time.perf_counter() - started)
    finally:
        for sampler in samplers:
            sampler.close()
        work_dir.cleanup()
    limits = matmul_limits(matmul_latencies)
    for row in rows:
        if row.iterations:
            # bf16 rows against the bf16 limit, fp32 and fp16 (upcast on the CPU) against fp32's; no int8 limit is timed
            computes_in = row.computes_in or row.precision
            if row.device == "cpu" and computes_in != "int8":
                row.pct_of_peak = 100 * row.gflops / limits.get(computes_in, limits["fp32"]).gflops
            if row.cv > NOISY_CV:
                row.notes.append(f"noisy: CV {row.cv:.0%} > {NOISY_CV:.0%}; close other programs or raise --duration")
    return rows, limits


def _end_to_end(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, device: str) -> Callable[[], torch.Tensor]:
    """A call of `decode(z)` that leaves the images on the host: what a caller gets, GPU copies included.

    On the CPU they are there already, and a no-op `.cpu()` would still cost every row a few
    microseconds that no CPU user pays.
    """
    if device == "cpu":
        return functools.partial(decode, z)
    return lambda: decode(z).cpu()


def _row(backend: str, precision: str, device: str, batch: int, runs_on: str, timing: Timing, flop: int) -> BenchRow:
    p50 = timing.median
    return BenchRow(
        backend=backend, precision=precision, device=device, batch=batch, runs_on=runs_on,
        samples_per_s=batch / p50, p50_ms=p50 * 1e3, p90_ms=timing.percentile(90) * 1e3,
        p99_ms=timing.percentile(99) * 1e3, cv=timing.cv, iterations=len(timing.latencies),
        gflops=batch * flop / p50 / 1e9,
    )


def _sampler_row(sampler: Sampler, batch: int, timing: Timing, flop: int) -> BenchRow:
    """A vae-rt row; for the CPU `auto`, named after the engine that decoded this batch (its chunks, at most the batch size)."""
    backend = sampler.backend
    if not isinstance(backend, AutoBackend):
        name = backend.name if not sampler.chosen_because else "auto"
        return _row(name, backend.precision, backend.device, batch, sampler.describe(), timing, flop)
    label = backend.engine_for(min(batch, sampler.batch_size))
    row = _row("auto", backend.precision, "cpu", batch, f"auto on cpu: {label} at this batch", timing, flop)
    row.computes_in = backend.labels[label][1]
    return row


def _skipped(backend: str, precision: str, device: str, why: str) -> BenchRow:
    return BenchRow(backend, precision, device, 0, f"skipped: {why}", 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0)


def write_report(path: Path, rows: list[BenchRow], limits: dict[str, GemmLimit], machine: str) -> None:
    """The run as JSON: the machine, the matmul limits measured in it, every row."""
    import json

    from vae_rt.files import write_atomic

    report = {
        "machine": machine,
        "matmul_limit_gflops": {precision: limit.gflops for precision, limit in limits.items()},
        "matmul_limit_reached_by": {precision: {"library": limit.library, "mkn": list(limit.shape)} for precision, limit in limits.items()},
        "rows": [r.as_dict() for r in rows],
    }
    write_atomic(path, json.dumps(report, indent=2) + "\n")


def plot_throughput(rows: list[BenchRow], path: Path) -> None:
    """samples/s against batch size, one line per backend/precision/device, log-log."""
    from vae_rt.errors import require

    require("matplotlib", extra="plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vae_rt.files import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[BenchRow]] = {}
    for row in rows:
        if row.iterations:
            series.setdefault(f"{row.backend} {row.precision} {row.device}", []).append(row)
    for label, points in series.items():
        points.sort(key=lambda r: r.batch)
        ax.plot([r.batch for r in points], [r.samples_per_s for r in points], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples/s", title="VAE decoder throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
