"""The `vae-rt` command line: each command parses its options and hands over to a library function.

Exit codes: 0 success, 2 bad usage or bad input (one line, no traceback), 1 runtime failure.
Choices and ranges are declared on the options; the lists come from the library, never repeated here.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

import vae_rt
from vae_rt import __version__
from vae_rt.backends import BACKEND_CHOICES, DEVICES, PRECISIONS
from vae_rt.engine import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH
from vae_rt.errors import RuntimeFailure, Terminated, UserError, notice, sigterm_as_interrupt
from vae_rt.export import EXPORT_PRECISIONS
from vae_rt.limits import (
    MAX_BATCH,
    MAX_COMPARE_COUNT,
    MAX_EPOCHS,
    MAX_IW_SAMPLES,
    MAX_QUEUE_DELAY_US,
    MAX_SEED,
    MAX_THREADS,
    MAX_Z_DIM,
)
from vae_rt.output import OUTPUT_DTYPES
from vae_rt.resolve import PRECISION_CHOICES
from vae_rt.train import LR_DECAYS, MNIST_TRAIN_SIZE

if TYPE_CHECKING:  # annotations only: the commands import torch and the model when they run
    import torch

    from vae_rt.model import VAE


class OneLineUsageErrors(TyperGroup):
    """Typer's usage errors (a bad choice, a number out of range, an unknown option) as one line and exit 2."""

    def main(self, args: Sequence[str] | None = None, *pos: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(args, *pos, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # the base of typer's UsageError and BadParameter
            # typer words a failed choice "Value error, 'x' is not one of ...": the first two words say nothing
            err.print(Text("error: ", style="red") + Text(error.format_message().replace("Value error, ", "")))
            code = error.exit_code
        except typer.Abort:
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, help="Train, export and serve the MNIST VAE decoder."
)
# markup off: messages carry user text and pip extras like "vae-rt[gpu]", which rich would read as tags
out = Console(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])
WIDE = 140  # tables are printed this wide even into a pipe, where rich would assume 80 columns
INTERRUPTED = "the file being written was removed; files already finished are kept"

ModelOption = Annotated[
    Path | None, typer.Option("--model", help="Checkpoint (.pth), ONNX file or TensorRT plan; default: the bundled model.")
]
CheckpointOption = Annotated[  # commands that run the torch fp32 reference beside the engines
    Path | None, typer.Option("--model", help="Checkpoint (.pth): the torch fp32 reference runs beside the engines; default: the bundled model.")
]
# Literal[<tuple>] is Literal[<each value>]: typer offers exactly the library's choices, as plain strings.
BackendOption = Annotated[Literal[BACKEND_CHOICES], typer.Option(help="Which engine decodes.")]  # type: ignore[valid-type]
PrecisionOption = Annotated[
    Literal[PRECISION_CHOICES] | None,  # type: ignore[valid-type]
    typer.Option(help="Default: the fastest safe one for the device; auto (with --backend auto): the fastest whose quality gate passed."),
]
def check_device(device: str) -> str:
    """One rule for every command: `--device cuda` on a machine without a GPU is refused before any work."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("torch sees no CUDA GPU on this machine (use --device cpu or auto)")
    return device


DeviceOption = Annotated[Literal[DEVICES], typer.Option(callback=check_device, help="Where it runs.")]  # type: ignore[valid-type]
DataDirOption = Annotated[
    Path | None, typer.Option(help="Folder with the four MNIST .gz files (else $VAE_RT_MNIST_DIR, else download).")
]


def handle_errors(command: F) -> F:
    """Turn the library's errors into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except UserError as error:
            err.print(Text("error: ", style="red") + Text(str(error)))
            raise typer.Exit(2) from None
        except RuntimeFailure as error:
            err.print(Text("failed: ", style="red") + Text(str(error)))
            raise typer.Exit(1) from None
        except OSError as error:  # a path given that cannot be read or written (permissions, a file for a folder)
            target = error.filename2 or error.filename  # a failed rename names its destination second
            where = f"{target}: " if target else ""
            err.print(Text("error: ", style="red") + Text(f"{where}{error.strerror or error}"))
            raise typer.Exit(2) from None
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (Terminated): the file being written was removed
            code = error.exit_code if isinstance(error, Terminated) else 130
            err.print(f"{'terminated' if code == 143 else 'interrupted'}: {str(error) or INTERRUPTED}")
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def print_table(table: Table) -> None:
    """Full width even into a pipe or a file, where rich would cut columns to fit 80 characters."""
    (out if out.is_terminal else Console(width=WIDE)).print(table)


def progress_bar() -> Progress:
    """A bar on a terminal; nothing in a log or a pipe, where it would only leave a blank line behind."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )


def show_version(value: bool) -> None:
    if value:
        out.print(f"vae-rt {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's internals, not about the model
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torch.compile's (bench --peers) "No CUDA runtime is found" on a CPU host with CUDA_HOME set: nothing to act on
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    handler = logging.StreamHandler()  # made per run: it binds the stderr of the moment
    handler.setFormatter(logging.Formatter("%(message)s"))
    notice.handlers = [handler]
    notice.setLevel(logging.INFO)
    notice.propagate = False


@app.command()
@handle_errors
def train(
    # None: not given, so the default, or on --resume the run's own value (given ones must agree with the run)
    epochs: Annotated[int | None, typer.Option(min=1, max=MAX_EPOCHS, help="Epochs in all (default 10, or the resumed run's).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=MNIST_TRAIN_SIZE, help="Images per optimizer step (default 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 1e-3).")] = None,
    lr_decay: Annotated[Literal[LR_DECAYS] | None, typer.Option(help="To 0 over the run, or constant (default none).")] = None,  # type: ignore[valid-type]
    z_dim: Annotated[int | None, typer.Option(min=1, max=MAX_Z_DIM, help="Latent dimensions (default 2).")] = None,
    data_dir: DataDirOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, grids, metrics.jsonl, model.pth.")] = Path("runs/vae"),
    seed: Annotated[int | None, typer.Option(min=0, max=MAX_SEED, help="Seed of initialisation, shuffles and noise (default 0).")] = None,
    device: DeviceOption = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint, with its own options.")] = False,
    keep: Annotated[int | None, typer.Option(min=1, help="Epoch checkpoints kept on disk (default 3).")] = None,
    ema: Annotated[float | None, typer.Option(help="Score and save a moving average of the weights with this decay (default 0: off).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Decoupled weight decay (AdamW); 0 (default) is the tutorial's Adam.")] = None,
) -> None:
    """Train the VAE on MNIST (the tutorial's recipe, fast)."""
    from vae_rt.train import TrainOptions
    from vae_rt.train import train as run_training

    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, z_dim=z_dim, seed=seed, keep=keep, ema=ema,
                           weight_decay=weight_decay)
    with progress_bar() as bar:
        task = bar.add_task("epoch", total=None)

        def on_step(epoch: int, done: int, total: int) -> None:
            bar.update(task, description=f"epoch {epoch}", completed=done, total=total)

        def on_epoch(m: dict[str, Any]) -> None:
            bar.console.print(
                f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.2f}  test loss {m['test_loss']:.2f}  "
                f"lr {m['lr']:.2e}  {m['seconds']:.1f}s",
            )

        history = run_training(out_dir, options, data_dir, device, resume, on_step, on_epoch)
    epochs = f"{len(history)} epoch{'' if len(history) == 1 else 's'}"
    out.print(f"done: {epochs}, test loss {history[-1]['test_loss']:.2f}; model in {out_dir / 'model.pth'}")


@app.command("eval")
@handle_errors
def evaluate(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint; default: the bundled model.")] = None,
    data_dir: DataDirOption = None,
    iw_samples: Annotated[int, typer.Option(min=0, max=MAX_IW_SAMPLES, help="Also estimate -log p(x) with K importance samples (0: skip).")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N test images.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the sampling noise.")] = 0,
    backend: Annotated[str | None, typer.Option(help="Decode on this backend (torch, ort, ...) and gate it against fp32.")] = None,
    precision: Annotated[str | None, typer.Option(help="The decoder's precision on --backend: fp32, fp16, bf16, int8, or auto (with --backend auto: every engine it holds).")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Test loss per image (negative ELBO); with --backend/--precision, the quality gate of that decoder."""
    from vae_rt.checkpoint import load_checkpoint
    from vae_rt.data import load_mnist
    from vae_rt.evaluate import iw_nll, test_loss, to_pixels

    model, _ = load_checkpoint(checkpoint)
    pixels = to_pixels(load_mnist(data_dir)[1])[:limit]
    if backend is not None or precision is not None:
        _evaluate_decoder(model, checkpoint, backend or "auto", precision, device, pixels, seed)
        return
    out.print(f"test loss per image: {test_loss(model, pixels, seed=seed):.2f}  ({len(pixels)} images)")
    if iw_samples:
        with progress_bar() as bar:
            task = bar.add_task("importance samples", total=len(pixels))
            nll = iw_nll(model, pixels, iw_samples, seed=seed, on_batch=lambda k: bar.advance(task, k))
        out.print(f"-log p(x), {iw_samples} importance samples: {nll:.2f}")


def _evaluate_decoder(model: VAE, checkpoint: Path | None, backend: str, precision: str | None, device: str,
                      pixels: torch.Tensor, seed: int) -> None:
    """`eval --backend/--precision`: the test loss through that decoder against fp32's (gated where it has a limit)."""
    from vae_rt.quality import quality_gate
    from vae_rt.sampler import open_sampler

    failed = []
    with open_sampler(checkpoint, backend, precision, device) as sampler:
        # auto decodes each batch size on its own engine, maybe in its own precision: each is judged by its own limit
        for engine in sampler.backend.engines():
            gate = quality_gate(model, engine.decode, engine.precision, pixels, seed)
            out.print(f"{gate.summary()} with {engine.describe()}")
            if not gate:
                failed.append(engine.describe())
    if failed:
        raise RuntimeFailure(f"{', '.join(failed)} {'fails its' if len(failed) == 1 else 'fail their'} quality gate")


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Path | None, typer.Argument(help="vae-rt checkpoint or the tutorial's state_dict; default: bundled.")] = None,
    out_dir: Annotated[Path, typer.Option(help="Folder for the ONNX files and their manifests.")] = Path("export"),
    engine_dir: Annotated[Path, typer.Option(help="Folder for TensorRT plans, manifests and the timing cache.")] = Path("engines"),
    precision: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(EXPORT_PRECISIONS)}.")] = "fp32,fp16",
    max_batch: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Largest batch of the TensorRT profile (and Triton's max_batch_size).")
    ] = DEFAULT_MAX_BATCH,
    opt_batch: Annotated[
        int | None, typer.Option(min=1, help=f"Batch size TensorRT tunes for (default: the sampler's CUDA batch, {DEFAULT_OPT_BATCH}, or --max-batch if smaller).")
    ] = None,
    engine: Annotated[
        bool | None, typer.Option("--engine/--no-engine", help="Require / skip the TensorRT engine (default: build when possible).")
    ] = None,
    triton: Annotated[Path | None, typer.Option(help="Also write a Triton model repository here.")] = None,
    name: Annotated[str | None, typer.Option(help="Base name of the files (default: the checkpoint's name).")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Export the decoder to ONNX (fp32, fp16, int8), check it on ONNX Runtime, and build a TensorRT engine.

    fp16 and int8 must pass their quality gate on the MNIST test set (int8 is calibrated on the
    training set); a file that fails is not written.
    """
    from vae_rt.build import export_artifacts
    from vae_rt.export import FP16_MAX

    precisions = _split_choices("--precision", precision, EXPORT_PRECISIONS)
    if opt_batch is not None and opt_batch > max_batch:
        raise UserError(f"--opt-batch must be at most --max-batch ({max_batch}), got {opt_batch}")
    report = export_artifacts(checkpoint, out_dir, precisions, name, engine_dir, engine, opt_batch, max_batch, triton, data_dir)
    for p, result in report.onnx.items():
        out.print(f"wrote {result.path}  ({result.parity.summary()})")
        if result.quality is not None:
            out.print(f"  quality gate: {result.quality.summary()}")
        if p == "fp16":
            peak = max(result.activation_peak.values())
            verdict = "within fp16 range" if peak <= FP16_MAX else f"BEYOND fp16 range ({FP16_MAX:g}): expect Inf/NaN"
            out.print(f"  largest activation on the test latents: {peak:.4g}, {verdict}")
    if report.engine_skipped:
        out.print(f"engine skipped: {report.engine_skipped}")
    elif report.engine is not None:
        out.print(f"{'built' if report.engine_built else 'reused'} {report.engine}")
    if report.triton is not None:
        out.print(f"wrote Triton model repository {report.triton}")


@app.command()
@handle_errors
def sample(
    model: ModelOption = None,
    backend: BackendOption = "auto",
    precision: PrecisionOption = None,
    device: DeviceOption = "auto",
    n: Annotated[int, typer.Option("-n", "--count", min=1, help="Number of images.")] = 1024,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the latents: the same z on every backend.")] = 0,
    batch_size: Annotated[int | None, typer.Option(min=1, max=MAX_BATCH, help="Images per decode call (default: per device).")] = None,
    out_path: Annotated[Path, typer.Option("--out", help=".png grid or .npy array of shape (n, 1, 28, 28).")] = Path("samples.png"),
    dtype: Annotated[Literal[OUTPUT_DTYPES], typer.Option(help="Array type of a .npy: float32 in [0, 1], or uint8 0..255.")] = "float32",  # type: ignore[valid-type]
) -> None:
    """Decode n seeded latents into images: a PNG grid, or a .npy streamed to disk."""
    from vae_rt.output import RING_SIZE, check_output, stream_npy, write_png
    from vae_rt.sampler import open_sampler

    kind = check_output(out_path, n, dtype)
    with open_sampler(model, backend, precision, device, batch_size) as sampler:
        decode_started = time.perf_counter()
        if kind == "png":  # the decode alone is timed: the PNG writer's first use imports torchvision (seconds)
            images = sampler.sample(n, seed)
            timed, decoding = "decode", time.perf_counter() - decode_started
            write_png(images, out_path)
        else:
            with progress_bar() as bar:
                task = bar.add_task("sampling", total=n)
                batches = sampler.iter_samples(n, seed, reuse=RING_SIZE)
                stream_npy(batches, n, out_path, dtype, lambda k: bar.advance(task, k))
            timed, decoding = "decode and write", time.perf_counter() - decode_started
        out.print(
            f"wrote {n} images to {out_path} in {time.perf_counter() - vae_rt.STARTED:.2f}s "
            f"({timed} {decoding:.2f}s: {n / decoding:,.0f} samples/s) with {sampler.describe()}"
        )


@app.command()
@handle_errors
def manifold(
    model: ModelOption = None,
    backend: BackendOption = "auto",
    precision: PrecisionOption = None,
    device: DeviceOption = "auto",
    grid: Annotated[int, typer.Option(min=2, max=100, help="Images per side.")] = 20,
    out_path: Annotated[Path, typer.Option("--out", help="PNG file.")] = Path("manifold.png"),
) -> None:
    """The learned 2-D manifold: decoded images over the latent plane, at the normal's quantiles."""
    from vae_rt.checkpoint import BUNDLED_CHECKPOINT
    from vae_rt.output import check_output, write_png
    from vae_rt.resolve import artifact_kind, latent_size_and_precision
    from vae_rt.sampler import manifold_latents, open_sampler

    check_output(out_path, grid * grid, "float32")
    if out_path.suffix.lower() != ".png":
        raise UserError(f"--out {out_path}: the manifold is a picture; use .png")
    path = model or BUNDLED_CHECKPOINT
    kind = artifact_kind(path)
    # Made before the sampler where the file tells z_dim (a plan needs TensorRT to tell it): a latent
    # space that is not 2-D is refused now, not after an export and a tuning run.
    latents = manifold_latents(grid, latent_size_and_precision(path, kind)[0]) if kind != "plan" else None
    with open_sampler(model, backend, precision, device) as sampler:
        if latents is None:
            latents = manifold_latents(grid, sampler.z_dim)
        write_png(sampler.decode(latents), out_path, nrow=grid)
        out.print(f"wrote {out_path} ({grid}x{grid}) with {sampler.describe()}")


@app.command()
@handle_errors
def compare(
    model: CheckpointOption = None,
    backends: Annotated[str, typer.Option(help="Comma-separated backends to check.")] = "torch,ort,openvino,trt",
    precisions: Annotated[str, typer.Option(help="Comma-separated precisions to check.")] = "fp32,fp16,bf16,int8",
    device: DeviceOption = "auto",
    n: Annotated[int, typer.Option("-n", "--count", min=1, max=MAX_COMPARE_COUNT, help="Normal latents (tail points are added).")] = 1000,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the latents.")] = 0,
    quality: Annotated[bool, typer.Option(help="Also gate each pair on the MNIST test loss (against fp32's).")] = True,
    data_dir: DataDirOption = None,
) -> None:
    """Parity report: every backend/precision against the torch fp32 reference on the same latents.

    The "Δ test loss" column is each decoder's test loss minus fp32's, in nats per image (the
    quality gate: at most +0.05 for fp16/bf16, +0.5 for int8).
    """
    from vae_rt.compare import run_comparisons

    test_pixels = None
    if quality:
        from vae_rt.data import DataError, load_mnist
        from vae_rt.evaluate import to_pixels

        try:
            test_pixels = to_pixels(load_mnist(data_dir)[1])
        except DataError as error:
            raise DataError(f"{error}; or --no-quality for the pixel errors alone") from None
    rows = run_comparisons(model, *_backends_and_precisions(backends, precisions), device, n, seed, test_pixels)
    table = Table("backend", "precision", "runs on", "max abs", "mean abs", "Δ test loss", "median abs", "worst", "NaN/Inf", "result")
    for row in rows:
        if row.report is None:
            verdict = Text("skipped", style="yellow") if row.failed is None else Text("FAIL", style="red")
            table.add_row(row.backend, row.precision, "-", "", "", "", "", "", "", verdict)
            continue
        r, q = row.report, row.quality
        loss = "-" if q is None else f"{q.delta:+.3f}" + (f" (≤{q.limit:g})" if q.limit is not None else "")
        table.add_row(
            row.backend, row.precision, row.runs_on, f"{r.max_abs:.3g}", f"{r.mean_abs:.3g}", loss, f"{r.median_abs:.3g}",
            str(r.worst_sample), f"{r.nan_count}/{r.inf_count}", Text("PASS", style="green") if row.passed else Text("FAIL", style="red"),
        )
    print_table(table)
    for row in rows:
        if row.skipped or row.failed:
            out.print(f"{'skipped' if row.skipped else 'failed'} {row.backend} {row.precision}: {row.skipped or row.failed}")
    if any(not row.passed for row in rows if row.skipped is None):
        raise RuntimeFailure("some backends disagree with the torch fp32 reference beyond tolerance or fail their quality gate")


@app.command()
@handle_errors
def bench(
    model: CheckpointOption = None,
    backends: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(BACKEND_CHOICES)}.")] = ",".join(BACKEND_CHOICES),
    precisions: Annotated[
        str, typer.Option(help=f"Comma-separated: {', '.join(PRECISION_CHOICES)} (auto: backend auto's gated choice).")
    ] = "fp32,fp16,bf16",  # int8 and auto on request: they need MNIST for their quality gates
    device: DeviceOption = "auto",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,64,1024,8192",
    duration: Annotated[float, typer.Option(help="Seconds timed per row, spread over 5 interleaved rounds (after warm-up).")] = 1.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a samples/s-vs-batch plot (PNG).")] = None,
    peers: Annotated[bool, typer.Option(help="Also time torch.compile, raw ONNX Runtime, raw OpenVINO f32/bf16, and ORT and OpenVINO on int8.")] = False,
) -> None:
    """Latency and throughput of every backend/precision available here, in one run (trtexec-style)."""
    from vae_rt.bench import bench_targets, describe_machine, plot_throughput, run_benchmarks, write_report
    from vae_rt.files import check_file_target
    from vae_rt.peers import PEERS

    try:
        sizes = [int(b) for b in _split(batch_sizes)]
    except ValueError:
        raise UserError(f"--batch-sizes takes comma-separated integers, got {batch_sizes!r}") from None
    for option, path in (("--json", json_path), ("--plot", plot)):  # checked now, not after minutes of timing
        if path is not None:
            check_file_target(option, path)
    chosen_backends = _split_choices("--backends", backends, BACKEND_CHOICES)
    targets = bench_targets(chosen_backends, _split_choices("--precisions", precisions, PRECISION_CHOICES), device)
    with err.status("benchmarking") as status:
        rows, limits = run_benchmarks(targets, sizes, model, duration, on_row=lambda r: status.update(f"{r.runs_on}, batch {r.batch}"),
                                      peers=tuple(PEERS) if peers else ())
    machine = describe_machine()
    rates = ", ".join(f"{precision} {limit.describe()}" for precision, limit in limits.items())
    out.print(f"CPU matmul limit (best GEMM rate of the libraries here, GFLOP/s), measured in the same run: {rates} ({machine})")
    table = Table("backend", "prec", "device", "batch", "samples/s", "p50 ms", "p99 ms", "GFLOP/s", "vs eager", "% peak", "CV")
    for r in rows:
        if not r.iterations:
            continue
        table.add_row(
            r.backend, r.precision, r.device, str(r.batch), f"{r.samples_per_s:,.0f}", f"{r.p50_ms:.4f}", f"{r.p99_ms:.4f}",
            f"{r.gflops:.1f}", f"{r.vs_torch_eager:.2f}x", f"{r.pct_of_peak:.0f}%" if r.pct_of_peak is not None else "-",
            f"{r.cv:.0%}" + (" !" if r.notes else ""),
        )
    print_table(table)
    for r in rows:
        if not r.iterations:
            out.print(f"{r.backend} {r.precision} {r.device}: {r.runs_on}")
        elif r.compute_p50_ms is not None:
            out.print(f"{r.runs_on} batch {r.batch}: device compute p50 {r.compute_p50_ms:.4f} ms of {r.p50_ms:.4f} ms end to end")
    if any(r.notes for r in rows):
        out.print("! = noisy (CV above 10%): close other programs or raise --duration")
    if json_path is not None:
        write_report(json_path, rows, limits, machine)
        out.print(f"wrote {json_path}")
    if plot is not None:
        plot_throughput(rows, plot)
        out.print(f"wrote {plot}")


@app.command()
@handle_errors
def serve(
    model: ModelOption = None,
    backend: BackendOption = "auto",
    precision: PrecisionOption = None,
    device: DeviceOption = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton's HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton's gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="Triton's Prometheus metrics port.")] = 8002,
    max_batch: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="Largest batch Triton forms (and accepts in one request).")
    ] = 8192,
    max_queue_delay_us: Annotated[
        int, typer.Option(min=0, max=MAX_QUEUE_DELAY_US, help="How long Triton may hold a request to batch it with others.")
    ] = 500,
    threads: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_THREADS, help="CPU threads of a decode (default: torch's); fewer leave cores to Triton."),
    ] = None,
    triton_log: Annotated[bool, typer.Option(help="Show Triton's own log (else it is discarded).")] = False,
) -> None:
    """Serve the decoder over Triton's HTTP/gRPC protocol (model vae_decoder), with dynamic batching."""
    from vae_rt.serve_options import ServeOptions

    options = ServeOptions(host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us, triton_log)
    options.check()  # before the model loads: a busy port is one line at once
    logging.getLogger("pytriton.proxy.inference").setLevel(logging.ERROR)  # repeats serve's warning with a traceback
    import torch

    from vae_rt.sampler import open_sampler
    from vae_rt.serve import serve as run_server
    from vae_rt.serve import startup_line

    if threads is not None:
        torch.set_num_threads(threads)  # ONNX Runtime's sessions take torch's thread count too
    with open_sampler(model, backend, precision, device) as sampler:
        run_server(sampler, options, on_ready=lambda: out.print(startup_line(sampler.describe(), options)))
    err.print("stopped: every accepted request was answered")


@app.command()
@handle_errors
def doctor() -> None:
    """What is installed and usable: torch + CUDA, ONNX Runtime providers, TensorRT, the GPU."""
    from vae_rt.doctor import diagnose

    for label, value in diagnose():
        out.print(f"{label:<22} {value}")


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _split_choices(option: str, values: str, choices: tuple[str, ...]) -> list[str]:
    """A comma-separated list of choices; a typo is an error, not a row quietly skipped."""
    picked = _split(values)
    if not picked or any(v not in choices for v in picked):
        raise UserError(f"{option} takes a comma-separated list of {', '.join(choices)}; got {values!r}")
    return picked


def _backends_and_precisions(backends: str, precisions: str) -> tuple[list[str], list[str]]:
    """The --backends and --precisions lists of compare and bench, each entry checked."""
    return _split_choices("--backends", backends, BACKEND_CHOICES), _split_choices("--precisions", precisions, PRECISIONS)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
