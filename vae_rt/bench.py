"""Throughput and latency of every backend available here, measured the way trtexec does it.

Each (backend, precision, batch) runs a warm-up period, then at least `min_duration` seconds and
`min_iterations` calls; it reports median and p90/p99 latency, samples/s, GFLOP/s, the coefficient of
variation (flagged when noisy), speed relative to plain torch fp32 eager measured in the same run,
and the share of this machine's float32 matmul peak, also measured in the same run.
Run it with `vae-rt bench --json out.json --plot out.png`.
"""

from __future__ import annotations

import functools
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


PEAK_SIZE = 2048  # float32 [2048, 2048] @ [2048, 2048]: large enough for the BLAS to reach its peak


def describe_machine() -> str:
    """CPU model, its widest vector extensions and the threads torch uses: what the numbers depend on."""
    import platform

    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    return f"{model} [{' '.join(isa) or 'no AVX'}], {torch.get_num_threads()} threads, torch {torch.__version__}"


def _matmul_call() -> Callable[[], torch.Tensor]:
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    return lambda: torch.mm(a, b)


def _matmul_gflops(timing: Timing) -> float:
    return 2 * PEAK_SIZE**3 / timing.median / 1e9


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
    report says why it was skipped). On the CPU, fp16 is timed on ONNX Runtime only (torch's CPU fp16
    GEMMs are slower than fp32 there) and bf16 on torch only (oneDNN uses AMX / AVX-512 BF16 where the
    CPU has them; vae-rt exports no bf16 ONNX). `include_cuda` lists the CUDA rows even without a GPU.
    """
    has_cuda = include_cuda or torch.cuda.is_available()
    devices = ["cpu", "cuda"] if device == "auto" and has_cuda else ["cpu"] if device == "auto" else [device]
    targets = []
    for dev in devices:
        for backend in backends:
            for precision in precisions:
                pointless_on_cpu = (backend, precision) in (("torch", "fp16"), ("ort", "bf16")) or (
                    backend == "auto" and precision != "fp32"  # auto on the CPU is fp32 unless told otherwise
                )
                if backend == "trt" or (dev == "cpu" and pointless_on_cpu):
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
) -> tuple[list[BenchRow], float]:
    """Time `decode` for each (backend, precision, device) target and batch size, plus torch eager and a matmul.

    The measurements of one batch size are interleaved: `rounds` rounds, each giving every target
    `min_duration / rounds` seconds. On a shared or throttling machine the drift then hits all of
    them alike, so the ratios between rows are fair even when the absolute numbers move.

    Returns:
        The rows (targets that cannot run here as rows with `runs_on` = 'skipped: <why>') and the
        CPU matmul peak in GFLOP/s, both from the same run.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {batch_sizes}")
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
    matmul = _matmul_call()
    matmul_latencies: list[float] = []
    try:
        for batch in batch_sizes:
            z = draw_latents(batch, config.z_dim, seed=batch)
            calls = [_end_to_end(reference, z, "cpu")] + [_end_to_end(s.decode, z, s.backend.device) for s in samplers]
            latencies: list[list[float]] = [[] for _ in calls]
            for round_ in range(rounds):
                for call, collected in zip(calls, latencies):
                    collected += time_calls(
                        call, warmup=0.2 if round_ == 0 else 0.02,
                        min_duration=min_duration / rounds, min_iterations=max(2, 10 // rounds),
                    ).latencies
                matmul_latencies += time_calls(matmul, warmup=0.0, min_duration=0.0, min_iterations=2).latencies
            eager = _row(REFERENCE, "fp32", "cpu", batch, "torch fp32 eager (nn.Module, no_grad)", Timing(latencies[0]), flop)
            batch_rows = [eager] + [
                _row(s.backend.name if not s.chosen_because else "auto", s.backend.precision, s.backend.device, batch,
                     s.describe(), Timing(collected), flop)
                for s, collected in zip(samplers, latencies[1:])
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
    finally:
        for sampler in samplers:
            sampler.close()
    peak = _matmul_gflops(Timing(matmul_latencies))
    for row in rows:
        if row.iterations:
            if row.device == "cpu":
                row.pct_of_peak = 100 * row.gflops / peak
            if row.cv > NOISY_CV:
                row.notes.append(f"noisy: CV {row.cv:.0%} > {NOISY_CV:.0%}; close other programs or raise --duration")
    return rows, peak


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


def _skipped(backend: str, precision: str, device: str, why: str) -> BenchRow:
    return BenchRow(backend, precision, device, 0, f"skipped: {why}", 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0)


def write_report(path: Path, rows: list[BenchRow], peak: float, machine: str) -> None:
    """The run as JSON: the machine, the matmul peak measured in it, every row."""
    import json

    from vae_rt.files import write_atomic

    report = {"machine": machine, "matmul_peak_gflops": peak, "rows": [r.as_dict() for r in rows]}
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
