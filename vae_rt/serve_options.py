"""The options of `vae-rt serve` and their checks: a busy port is found before the model loads or Triton starts."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from vae_rt.errors import UserError
from vae_rt.limits import MAX_BATCH, MAX_QUEUE_DELAY_US, check_integer


@dataclass(frozen=True)
class ServeOptions:
    """Where and how Triton listens, and how long it may hold a request to batch it with others."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8192
    max_queue_delay_us: int = 500
    triton_log: bool = False  # Triton's own log on stdout; else it goes to a temporary file

    def urls(self) -> str:
        return (f"http://{self.host}:{self.http_port}, grpc {self.host}:{self.grpc_port}, "
                f"metrics http://{self.host}:{self.metrics_port}/metrics")

    def check(self) -> None:
        """Every value in range and every port free, before Triton starts (it would wait minutes on a busy one)."""
        check_host(self.host)
        check_integer("max_batch", self.max_batch, 1, MAX_BATCH)
        check_integer("max_queue_delay_us", self.max_queue_delay_us, 0, MAX_QUEUE_DELAY_US)
        ports = {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            check_integer(f"the {name} port", port, 1, 65535)
            if port in seen:
                raise UserError(f"the {seen[port]} and {name} ports are both {port}; each needs its own")
            seen[port] = name
        for name, port in ports.items():
            check_port_free(f"{name} port {port}", self.host, port)


def check_host(host: str) -> None:
    """An IPv4 address, as the port check and PyTriton's readiness check use it: given a name ('localhost')
    or nothing, Triton listened, or failed, while PyTriton waited two minutes and ended in a traceback."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise UserError(f"host must be an IPv4 address such as 127.0.0.1, or 0.0.0.0 for every interface; got {host!r}") from None


def check_port_free(what: str, host: str, port: int) -> None:
    """Raise a one-line UserError, starting with `what`, unless `host:port` can be listened on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"{what}: {host}:{port} is already in use") from None
            raise UserError(f"{what}: cannot listen on {host}:{port} ({error.strerror or error})") from None
