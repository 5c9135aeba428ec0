"""Throughput and latency of every backend available here, measured the way trtexec does it.

Each (backend, precision, batch) runs a warm-up period, then at least `min_duration` seconds and
`min_iterations` calls; it reports median and p90/p99 latency, samples/s, GFLOP/s, the coefficient of
variation (flagged when noisy), speed relative to plain torch fp32 eager measured in the same run,
and the share of this machine's float32 matmul peak, also measured in the same run.
Run it with `vae-rt bench --json out.json --plot out.png`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vae_rt.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
from vae_rt.errors import UserError
from vae_rt.sampler import draw_latents, open_sampler

NOISY_CV = 0.10  # trtexec-style warning threshold: stdev above 10% of the mean
REFERENCE = "torch-eager"  # the tutorial's own call: the decoder module under no_grad, fp32


@dataclass(frozen=True)
class Timing:
    """Latencies of repeated calls, in seconds."""

    latencies: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def cv(self) -> float:
        mean = statistics.fmean(self.latencies)
        return statistics.pstdev(self.latencies) / mean if mean > 0 else 0.0


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
    compute_p50_ms: float | None = None  # GPU only: z already on the device, images left there
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_calls(fn: Callable[[], Any], warmup: float = 0.2, min_duration: float = 1.0, min_iterations: int = 10) -> Timing:
    """Call `fn` for `warmup` seconds untimed, then until both the duration and the count are reached."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < min_iterations or time.perf_counter() - started < min_duration:
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)
    return Timing(latencies)


def matmul_peak_gflops(size: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of a large float32 matmul on the CPU: the ceiling any CPU backend can reach here."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    timing = time_calls(lambda: torch.mm(a, b), warmup=0.2, min_duration=seconds, min_iterations=3)
    return 2 * size**3 / min(timing.latencies) / 1e9


def reference_decoder(checkpoint: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plain torch fp32 eager: what a user of the tutorial code would call."""
    decoder = load_checkpoint(checkpoint)[0].decoder().eval()

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decoder(z)

    return decode


def bench_targets(backends: list[str], precisions: list[str], device: str) -> list[tuple[str, str, str]]:
    """(backend, precision, device) triples worth timing here: every device the machine has, no pointless pairs.

    TensorRT runs only on CUDA and only fp16; reduced precision on the CPU is only timed on ONNX Runtime
    (torch's CPU fp16 kernels are a slow emulation, not a serving path).
    """
    devices = ["cpu", "cuda"] if device == "auto" and torch.cuda.is_available() else ["cpu"] if device == "auto" else [device]
    targets = []
    for dev in devices:
        for backend in backends:
            for precision in precisions:
                if backend == "trt" and (dev == "cpu" or precision != "fp16"):
                    continue
                if dev == "cpu" and precision != "fp32" and backend != "ort":
                    continue
                targets.append((backend, precision, dev))
    return targets


def run_benchmarks(
    targets: list[tuple[str, str, str]],
    batch_sizes: list[int],
    model: Path | None = None,
    min_duration: float = 1.0,
    peak: float | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """Time `decode` for each (backend, precision, device) target and batch size, plus the torch eager reference.

    Targets that cannot run here are reported as rows with `runs_on` = 'skipped: <why>' and no timings.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    checkpoint = Path(model) if model is not None else BUNDLED_CHECKPOINT
    config = load_checkpoint(checkpoint)[0].config
    flop = config.decoder_flop_per_sample
    rows: list[BenchRow] = []
    reference = reference_decoder(checkpoint)
    eager_p50 = {}
    for batch in batch_sizes:
        z = draw_latents(batch, config.z_dim, seed=batch)
        timing = time_calls(lambda: reference(z), min_duration=min_duration)
        eager_p50[batch] = timing.median
        rows.append(_row(REFERENCE, "fp32", "cpu", batch, "torch fp32 eager (nn.Module, no_grad)", timing, flop))
        if on_row:
            on_row(rows[-1])
    for backend, precision, device in targets:
        try:
            sampler = open_sampler(checkpoint, backend, precision, device, batch_size=max(batch_sizes))
        except UserError as error:
            rows.append(_skipped(backend, precision, device, str(error)))
            if on_row:
                on_row(rows[-1])
            continue
        with sampler:
            for batch in batch_sizes:
                z = draw_latents(batch, config.z_dim, seed=batch)
                timing = time_calls(lambda: sampler.decode(z).cpu(), min_duration=min_duration)
                row = _row(backend, sampler.backend.precision, sampler.backend.device, batch, sampler.describe(), timing, flop)
                if sampler.backend.device == "cuda":
                    z_device = z.cuda()
                    row.compute_p50_ms = time_calls(lambda: sampler.decode(z_device), min_duration=min_duration).median * 1e3
                rows.append(row)
                if on_row:
                    on_row(row)
    for row in rows:
        if row.iterations:
            row.vs_torch_eager = eager_p50[row.batch] / (row.p50_ms / 1e3)
            if peak and row.device == "cpu":
                row.pct_of_peak = 100 * row.gflops / peak
            if row.cv > NOISY_CV:
                row.notes.append(f"noisy: CV {row.cv:.0%} > {NOISY_CV:.0%}; close other programs or raise --duration")
    return rows


def _row(backend: str, precision: str, device: str, batch: int, runs_on: str, timing: Timing, flop: int) -> BenchRow:
    p50 = timing.median
    return BenchRow(
        backend=backend, precision=precision, device=device, batch=batch, runs_on=runs_on,
        samples_per_s=batch / p50, p50_ms=p50 * 1e3, p90_ms=timing.percentile(90) * 1e3,
        p99_ms=timing.percentile(99) * 1e3, cv=timing.cv, iterations=len(timing.latencies),
        gflops=batch * flop / p50 / 1e9,
    )


def _skipped(backend: str, precision: str, device: str, why: str) -> BenchRow:
    return BenchRow(backend, precision, device, 0, f"skipped: {why}", 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0)


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
