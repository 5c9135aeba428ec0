"""Error types that the CLI turns into one line and an exit code instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

# Slow one-time work (an export, an engine build, a tuning run, a gate's scoring): said even without -v.
notice = logging.getLogger("vae_rt.notice")


class UserError(Exception):
    """Bad usage or bad input (a missing file, a corrupt checkpoint, a bad option): exit code 2."""


class EngineUnavailable(UserError):
    """An engine that cannot run the model on this machine (no native bf16, no int8 kernels, a failed
    compile): `auto` leaves it out with the reason, where any other UserError stops the run."""


class MissingDependencyError(UserError, ImportError):
    """An optional package is not installed; the message says what to `pip install`."""


class RuntimeFailure(Exception):
    """The input was fine but the work failed (training diverged, a parity check failed): exit code 1."""


class OutputOverflow(RuntimeFailure):
    """The decoder's output has NaN/Inf for latents beyond the radius within which it cannot overflow: the latents' fault."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (torch appends pages of CUDA advice, onnx its context), or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def require(module: str, extra: str):
    """Import an optional dependency, or raise a one-line error saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module} is not installed ({err}); install it with: pip install 'vae-rt[{extra}]'"
        ) from err


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, a container stop), raised like Ctrl-C so the same clean-up runs:
    the temporary file being written is removed. Exit code 128 + 15."""

    exit_code = 143


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread instead of killing the process on the spot."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """While inside, Ctrl-C and SIGTERM wait: they are raised on the way out, so a few renames that belong
    together all happen. Python handles signals in the main thread only; elsewhere this holds nothing back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])
