"""Where sampled images go: a PNG grid, or a `.npy` array streamed to disk batch by batch.

The `.npy` writer puts the header first and then appends each batch from a writer thread, so
decoding never waits on the disk and resident memory stays at a few batches whatever n is
(a memory map of the whole file would not bound it: its dirty pages count as resident). Where the
file system allows it, the file is written with O_DIRECT (`direct_io.py`).
"""

from __future__ import annotations

import math
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from vae_rt.direct_io import open_append_stream
from vae_rt.errors import RuntimeFailure, UserError
from vae_rt.files import BLOCK, atomic_path, block_aligned_empty, check_file_target, check_free_space
from vae_rt.host_copy import DeviceToHost
from vae_rt.model import IMAGE_SHAPE

PNG_MAX_IMAGES = 10_000  # a 100 x 100 grid (2,800 px square); beyond that write .npy
OUTPUT_DTYPES = ("float32", "uint8")
QUEUE_DEPTH = 4  # batches in flight between decoder and writer
RING_SIZE = QUEUE_DEPTH + 2  # buffers a decoder may cycle through: queued + being written + being decoded


def check_output(path: Path, n: int, dtype: str) -> str:
    """Validate `--out` before any decoding; returns 'png' or 'npy'."""
    path = Path(path)
    check_file_target("--out", path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("png", "npy"):
        raise UserError(f"--out {path}: unsupported extension; use .png (image grid) or .npy (array)")
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    if kind == "png" and n > PNG_MAX_IMAGES:
        raise UserError(f"--out {path}: a PNG grid holds at most {PNG_MAX_IMAGES} images, asked for {n}; use .npy")
    if kind == "npy":
        check_free_space("--out", path, npy_size(n, dtype))
    return kind


def npy_size(n: int, dtype: str) -> int:
    """Bytes of the `.npy` that `stream_npy` writes for n images (the array is padded to whole blocks while written)."""
    data = n * math.prod(IMAGE_SHAPE) * np.dtype(dtype).itemsize
    return BLOCK + -(-data // BLOCK) * BLOCK


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 pixels (rounded half up), on the images' own device.

    On a GPU this runs before the copy to the host, which then moves 4x fewer bytes.
    """
    return images.mul(255).add_(0.5).to(torch.uint8)


def _to_uint8_single_thread(images: np.ndarray, scratch: dict[str, np.ndarray]) -> np.ndarray:
    """`to_uint8` in numpy on the writer thread: one core, buffers reused, so the decoder keeps the others."""
    if scratch.get("float") is None or len(scratch["float"]) < len(images):
        scratch["float"] = np.empty_like(images)
        scratch["uint8"] = block_aligned_empty(images.shape, torch.uint8).numpy()  # O_DIRECT writes it as it is
    floats, pixels = scratch["float"][: len(images)], scratch["uint8"][: len(images)]
    np.multiply(images, 255, out=floats)
    np.add(floats, 0.5, out=floats)
    np.copyto(pixels, floats, casting="unsafe")  # truncation after +0.5: round half up, as to_uint8
    return pixels


def write_png(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """A grid of [n, 1, 28, 28] images, `nrow` per row (a square grid when None)."""
    from torchvision.utils import save_image  # imported here: torchvision is slow to import and only PNGs need it

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    with atomic_path(Path(path)) as tmp:
        save_image(images.float().cpu(), tmp, nrow=nrow, padding=2, format="png")


def stream_npy(
    batches: Iterable[torch.Tensor],
    n: int,
    path: Path,
    dtype: str = "float32",
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Write `n` images arriving in `batches` as one `.npy` of shape [n, 1, 28, 28], in bounded memory.

    The write and (for CPU batches) the uint8 conversion run on a writer thread while the caller
    decodes the next batch. GPU batches are converted on the device, then copied into pinned, reused
    host buffers on a side stream; the writer waits on each batch's event.
    Not fsync'ed: the rename alone keeps an interrupted run from leaving a partial file under `path`.
    """
    pending: queue.Queue[tuple[torch.Tensor, torch.cuda.Event | None] | None] = queue.Queue(maxsize=QUEUE_DEPTH)
    to_host: DeviceToHost | None = None  # made at the first GPU batch
    failure: list[BaseException] = []
    as_uint8 = dtype == "uint8"
    with atomic_path(Path(path)) as tmp, open_append_stream(tmp, npy_header(dtype, (n, *IMAGE_SHAPE))) as f:
        scratch: dict[str, np.ndarray] = {}

        def write_all() -> None:
            try:
                while (item := pending.get()) is not None:
                    batch, copied = item
                    if copied is not None:
                        copied.synchronize()
                    array = batch.contiguous().numpy()
                    if as_uint8 and array.dtype != np.uint8:
                        array = _to_uint8_single_thread(array, scratch)
                    f.write(array)  # buffer protocol: no copy into bytes first
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
                failure.append(err)  # seen by the producer, which then stops decoding
                while pending.get() is not None:  # drain so the producer never blocks
                    pass

        writer = threading.Thread(target=write_all, name="npy-writer", daemon=True)
        writer.start()
        written = 0
        try:
            for images in batches:
                if failure:  # the disk filled up or went away: decoding the rest would only waste time
                    break
                if images.is_cuda:
                    to_host = to_host or DeviceToHost(RING_SIZE)  # slots outlast the queue: see RING_SIZE
                    pending.put(to_host.copy(to_uint8(images) if as_uint8 else images))
                else:
                    pending.put((images, None))
                written += len(images)
                if on_batch is not None:
                    on_batch(len(images))
        finally:
            pending.put(None)
            writer.join()
        if failure:
            if isinstance(failure[0], OSError):  # a full disk, a lost mount: not a bug, no traceback
                raise RuntimeFailure(f"writing {path} failed: {failure[0].strerror or failure[0]}") from failure[0]
            raise failure[0]
        if written != n:
            raise RuntimeError(f"expected {n} images, got {written}")


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 `.npy` header padded with spaces to BLOCK bytes, so that the array data is block-aligned.

    The format asks for a multiple of 64 bytes; numpy itself pads to the next one, any reader takes more.
    """
    fields = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    magic = np.lib.format.magic(1, 0)
    length = BLOCK - len(magic) - 2  # what follows the 2-byte length field
    return magic + struct.pack("<H", length) + (fields.ljust(length - 1) + "\n").encode("latin1")
