"""`vae-rt export` as one library call: the ONNX files asked for, then the TensorRT engine and a Triton repository."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from vae_rt.capabilities import engine_skip_reason
from vae_rt.engine import DEFAULT_MAX_BATCH, DEFAULT_OPT_BATCH, build_engine, check_profile
from vae_rt.errors import UserError, signals_held
from vae_rt.export import ExportedModel, check_export_name, export_onnx
from vae_rt.files import new_folder, staging_dir


@dataclass
class ExportReport:
    """What `export_artifacts` wrote, and why the engine was skipped when it was."""

    onnx: dict[str, ExportedModel] = field(default_factory=dict)  # precision -> export
    engine: Path | None = None
    engine_built: bool = False  # False with an engine: a matching cached plan was reused
    engine_skipped: str | None = None
    triton: Path | None = None


def export_all_or_none(
    checkpoint: Path | None, out_dir: Path, precisions: list[str], name: str | None, data_dir: Path | None
) -> dict[str, ExportedModel]:
    """Each precision exported into a staging folder inside `out_dir`, then all renamed into place with
    Ctrl-C and SIGTERM held back: a failed or interrupted run leaves `out_dir` as it was. Gated precisions
    go first: they need MNIST and may fail, and fp32 is then not exported in vain."""
    precisions = list(dict.fromkeys(precisions))
    with staging_dir(out_dir) as staging:
        try:
            staged = {p: export_onnx(checkpoint, staging, p, name, data_dir) for p in sorted(precisions, key=lambda p: p == "fp32")}
        except OSError as err:  # a full disk: named by the folder the user gave, not by the staging folder or by nothing
            if err.errno is None or (err.filename and str(staging) not in str(err.filename)):
                raise
            raise OSError(err.errno, err.strerror, str(out_dir)) from err
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated): what was staged goes with the folder
            raise type(stop)(f"nothing was written to {out_dir}") from None
        for target in (out_dir / p.name for e in staged.values() for p in (e.path, e.manifest_path)):
            if target.is_dir():
                raise UserError(f"{target} is a folder: an export cannot take its name")
        with signals_held():
            return {p: move_export(staged[p], out_dir) for p in precisions}


def move_export(exported: ExportedModel, out_dir: Path) -> ExportedModel:
    """`exported` renamed into `out_dir`, its manifest first: a run stopped between the two renames
    leaves a file its manifest does not describe, which is refused when served (`manifest_mismatch`)."""
    manifest_path, path = out_dir / exported.manifest_path.name, out_dir / exported.path.name
    os.replace(exported.manifest_path, manifest_path)
    os.replace(exported.path, path)
    return dataclasses.replace(exported, path=path, manifest_path=manifest_path)


def export_artifacts(
    checkpoint: Path | None,
    out_dir: Path,
    precisions: list[str],
    name: str | None = None,
    engine_dir: Path = Path("engines"),
    engine: bool | None = None,
    opt_batch: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    triton_dir: Path | None = None,
    data_dir: Path | None = None,
) -> ExportReport:
    """Export `checkpoint`'s decoder in each precision, then build its engine and Triton repository.

    The ONNX files reach `out_dir` only once every precision has passed its checks: a failure leaves
    the files already there as they were.

    Args:
        engine: True requires the TensorRT engine, False skips it, None builds it when this machine can.
        opt_batch: the batch TensorRT tunes for (None: the sampler's CUDA batch, or `max_batch` when smaller).
        triton_dir: where to write a Triton model repository (None: none).
    Raises:
        UserError: bad options, or `engine=True` on a machine that cannot build one.
    """
    opt_batch = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    check_profile(opt_batch, max_batch)
    skip_reason = engine_skip_reason() if engine is not False else None
    if engine and skip_reason:
        raise UserError(f"engine: cannot build a TensorRT engine here: {skip_reason}")
    check_export_name(name)
    # Folders that cannot be written to are refused now, not after minutes of export; those made here
    # are removed again if the export fails before anything is written into them.
    with contextlib.ExitStack() as folders:
        if engine is not False and not skip_reason and "fp16" in precisions:
            folders.enter_context(new_folder(engine_dir, "engine folder"))
        if triton_dir is not None:
            folders.enter_context(new_folder(triton_dir, "--triton"))
        out_dir = folders.enter_context(new_folder(out_dir, "out_dir"))
        report = ExportReport()
        report.onnx = export_all_or_none(checkpoint, out_dir, precisions, name, data_dir)
        if engine is not False:
            if skip_reason:
                report.engine_skipped = skip_reason
            elif "fp16" not in report.onnx:
                report.engine_skipped = "it is built from the fp16 ONNX; add fp16 to the precisions"
            else:
                fp16_path = report.onnx["fp16"].path
                report.engine, report.engine_built = build_engine(
                    fp16_path, engine_dir, fp16_path.name.removesuffix(".onnx"), opt_batch, max_batch
                )
        if triton_dir is not None:
            from vae_rt.triton import write_model_repository

            onnx_path = (report.onnx.get("fp32") or next(iter(report.onnx.values()))).path
            report.triton = write_model_repository(triton_dir, onnx_path, report.engine, max_batch)
        return report
