"""Write-then-rename helpers, so an interrupted run never leaves a half-written file under its final name
(and what a run killed outright left is removed by the next write there);
output folders made with a one-line error; and block-aligned host memory, which O_DIRECT writes can
hand to the disk without a copy."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from vae_rt.errors import UserError

try:
    import fcntl  # POSIX: the lock that tells a live writer's temporary file from a killed run's
except ImportError:  # Windows: temporary files are not locked, and no leftovers are removed
    fcntl = None

STAGING_PREFIX = ".vae-rt-staging."
TEMPORARY_SUFFIX = ".vae-rt.tmp"
LEFTOVER_AGE = 60.0  # seconds: a temporary file or folder this old that no process holds is a killed run's
BLOCK = 4096  # O_DIRECT needs block-aligned offsets, sizes and memory: a page is a multiple of any disk's block


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.

    The temporary file lives in the same folder so the rename is atomic (same file system); two
    processes writing the same path end with one complete file, never a mix. It is locked while
    written, so that `remove_leftovers`, run first, removes only what killed runs left.
    """
    path = Path(path)
    remove_leftovers(path.parent, f".{path.name}.", TEMPORARY_SUFFIX)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with lock_held(tmp_path):
            tmp_path.chmod(0o644)  # mkstemp's 0600 would make artifacts unreadable to other users
            yield tmp_path
            os.replace(tmp_path, path)
    except OSError as err:
        if str(tmp_path) not in (err.filename, err.filename2):
            raise
        raise _naming(err, path) from err  # the user named `path`; the temporary name means nothing to them
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(folder: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder inside `folder`, removed with what is left in it on the way out: files
    made there reach `folder` by rename (same file system), so a run that fails leaves `folder` as it was.
    Locked while in use, like `atomic_path`'s files."""
    remove_leftovers(Path(folder), STAGING_PREFIX)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as err:
        raise _naming(err, Path(folder)) from err
    try:
        with lock_held(staging):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def lock_held(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (a file or a folder) while the block runs, where there is one: not on
    Windows, nor on some network and FUSE file systems, whose leftovers are then never removed."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_leftovers(folder: Path, prefix: str, suffix: str = "") -> None:
    """Remove the temporary files or folders `<prefix>*<suffix>` in `folder` that no process holds locked:
    what runs killed outright (SIGKILL, the out-of-memory killer) left there. Those younger than
    LEFTOVER_AGE are kept too: a writer may not have locked its own yet."""
    if fcntl is None:
        return
    now = time.time()
    try:
        entries = list(Path(folder).glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"))
    except OSError:  # a folder that cannot be listed: the write itself will say what is wrong
        return
    for entry in entries:
        try:
            found = entry.lstat()
            if not (stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode)) or now - found.st_mtime < LEFTOVER_AGE:
                continue  # a link, a FIFO (opening it would block) or the like is none of ours; a young one may be
            fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError while a live writer holds it
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    """The same error about `path` (its folder when that is what is missing)."""
    missing_folder = isinstance(err, FileNotFoundError) and not path.parent.is_dir()
    return type(err)(err.errno, err.strerror, str(path.parent if missing_folder else path))


def make_dir(path: Path, option: str) -> Path:
    """Create the folder a user named with `option` (parents too), or say in one line why it cannot be written to."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "a file of that name is in the way" if isinstance(err, FileExistsError) else err.strerror
        raise UserError(f"{option} {path}: cannot create the folder ({why})") from err
    try:
        check_writable_folder(path)  # now, not when the first file of a long run is written
    except OSError as err:
        raise UserError(f"{option} {path}: folder is not writable ({err.strerror})") from err
    return path


@contextlib.contextmanager
def new_folder(path: Path, option: str) -> Iterator[Path]:
    """`make_dir(path, option)` for a run that writes into it: if the run fails or is interrupted, the
    folders it created and left empty are removed again, so the tree is as it was."""
    path = Path(path)
    missing = {Path(os.path.abspath(folder)) for folder in (path, *path.parents) if not folder.exists()}  # 'a/../b' makes 'a' too
    try:
        yield make_dir(path, option)
    except BaseException:
        for folder in sorted(missing, key=lambda folder: len(folder.parts), reverse=True):  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty folder: one the run wrote into stays, and so do its parents
        raise


def check_file_target(option: str, path: Path) -> None:
    """Refuse, before any work, a file path that `option` could not be written to: a folder, a device, or a missing or read-only parent."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not path.is_file():  # the final rename would put a file in place of a device or pipe
        raise UserError(f"{option} {path}: is not a regular file (a device or pipe); give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: folder {path.parent} does not exist")
    try:
        check_writable_folder(path.parent)
    except OSError as err:
        raise UserError(f"{option} {path}: folder {path.parent} is not writable ({err.strerror})") from err


def check_writable_folder(folder: Path) -> None:
    """Raise the system's OSError when no file can be created in `folder`.

    Tried, not asked: `os.access` says yes to root on a read-only mount or in /proc.
    """
    fd, probe = tempfile.mkstemp(prefix=".vae-rt-probe.", dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_free_space(option: str, path: Path, nbytes: int) -> None:
    """Refuse, before any work, a file of `nbytes` that the file system of `path` has no room for."""
    free = shutil.disk_usage(Path(path).parent).free
    if nbytes > free:
        raise UserError(f"{option} {path}: needs {format_bytes(nbytes)}, the file system has {format_bytes(free)} free")


def format_bytes(n: int) -> str:
    """1_234_567 -> '1.2 MB': decimal units, as `df -H` shows them."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    power = min(int(math.log10(max(n, 1)) // 3), len(units) - 1)
    return f"{n / 1000**power:.1f} {units[power]}"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` all or nothing; synced to disk before the rename, so safe even across a power cut."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def block_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor whose memory starts on a BLOCK boundary (torch aligns to 64 bytes)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % BLOCK
    return raw[start : start + nbytes].view(dtype).view(shape)
