"""The process's one TensorRT logger, and what it heard during one call.

TensorRT keeps the logger as a singleton: the first one given to a Builder or Runtime receives the
messages of every later one, so a second logger object would hear nothing. Builds and loads
therefore share `process_logger(trt)` and collect its messages only while their own call runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def process_logger(trt: Any) -> Any:
    """A `trt.ILogger` that keeps warnings and errors for `collect()`, since TensorRT reports most failures only there."""
    kept = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING)

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._listeners: list[list[str]] = []
            self._lock = threading.Lock()  # TensorRT may log from its own threads

        def log(self, severity: Any, msg: str) -> None:
            log.debug("TensorRT: %s", msg)
            if severity in kept:
                with self._lock:
                    for messages in self._listeners:
                        messages.append(msg)

        @contextlib.contextmanager
        def collect(self) -> Iterator[list[str]]:
            """The warnings and errors logged while the block runs."""
            messages: list[str] = []
            with self._lock:
                self._listeners.append(messages)
            try:
                yield messages
            finally:
                with self._lock:
                    self._listeners.remove(messages)

    return CollectingLogger()


def last_message(messages: list[str]) -> str:
    """What TensorRT said last (its error is the final line), for a one-line failure message."""
    return messages[-1] if messages else "no message from TensorRT"
