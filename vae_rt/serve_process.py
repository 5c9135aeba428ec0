"""A Triton server (`vae-rt serve`, or another command taking its port options) in a subprocess on free
loopback ports, for the tests and the load benchmark: start it, wait for its model, read its counters."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from vae_rt.errors import RuntimeFailure
from vae_rt.triton import MODEL_NAME


def free_loopback_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on now (the system's choice, so parallel runs do not collide)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ServerProcess:
    """`command` + `--http-port/--grpc-port/--metrics-port` in the background; its output goes to `log_path`."""

    def __init__(self, command: list[str], log_path: Path, model: str = MODEL_NAME):
        self.http, self.grpc, self.metrics = free_loopback_ports(3)
        self.model = model
        self.log_path = Path(log_path)
        self.terminated = False
        ports = ["--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        with self.log_path.open("w") as log:  # a file, not a pipe nobody reads: a full pipe would stall the server
            self.process = subprocess.Popen([*command, *ports], stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        """Return once the model answers ready; raise if the process exits or `timeout_s` passes first."""
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http}")
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeFailure(f"the server exited with {self.process.returncode}: {self.log_path.read_text()}")
                try:
                    if client.is_model_ready(self.model):
                        return
                except (OSError, InferenceServerException):  # not listening yet, or not yet answering
                    pass
                time.sleep(0.2)
            raise RuntimeFailure(f"the server was not ready after {timeout_s:g}s: {self.log_path.read_text()}")
        finally:
            client.close()

    def counter(self, name: str) -> float:
        """A Prometheus counter of the model (e.g. nv_inference_count), summed over its versions."""
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and f'model="{self.model}"' in line)

    def terminate(self) -> None:
        """SIGTERM, once: a second one would interrupt the server's drain."""
        if self.process.poll() is None and not self.terminated:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM, then its exit code; killed if it outlives `timeout_s`."""
        self.terminate()
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
