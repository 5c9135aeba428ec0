"""`vae-rt serve` as a user runs it: a subprocess on free loopback ports, checked with tritonclient."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton.triton", reason="vae-rt serve needs PyTriton: pip install 'vae-rt[serve]'")
httpclient = pytest.importorskip("tritonclient.http", reason="the tests talk to the server with tritonclient[http]")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the tests talk to the server with tritonclient[grpc]")
from tritonclient.utils import InferenceServerException

from vae_rt import open_sampler
from vae_rt.serve_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 64
SERVE_ARGS = ["--backend", "torch", "--device", "cpu", "--max-batch", str(MAX_BATCH)]
HOLD_US = 3_000_000  # the draining server holds requests this long for batching, so SIGTERM finds them queued
STARTUP_S = 180  # a loaded 2-core machine: importing torch, then Triton's start and model load


def serve_command(checkpoint: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vae_rt", "serve", "--model", str(checkpoint), *SERVE_ARGS, *args]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, random_checkpoint):
    """The server most tests share, and one that holds requests for seconds (for SIGTERM); they start together."""
    logs = tmp_path_factory.mktemp("serve")
    started = {
        "shared": ServerProcess(serve_command(random_checkpoint), logs / "shared.log"),
        "holding": ServerProcess(serve_command(random_checkpoint, "--max-queue-delay-us", str(HOLD_US)), logs / "holding.log"),
    }
    try:
        for server in started.values():
            server.wait_ready(STARTUP_S)
        yield started
    finally:
        for server in started.values():
            server.terminate()
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["shared"]


@pytest.fixture(scope="module")
def reference(random_checkpoint):
    with open_sampler(random_checkpoint, "torch", device="cpu") as sampler:
        yield lambda z: sampler.decode(z).reshape(len(z), -1).numpy()


def infer_http(port: int, z: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = httpclient.InferInput("z", list(z.shape), datatype)
        tensor.set_data_from_numpy(z)
        return client.infer("vae_decoder", [tensor]).as_numpy("image")
    finally:
        client.close()


def infer_grpc(port: int, z: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = grpcclient.InferInput("z", list(z.shape), "FP32")
        tensor.set_data_from_numpy(z)
        return client.infer("vae_decoder", [tensor]).as_numpy("image")
    finally:
        client.close()


def latents(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 2), dtype=np.float32)


def test_one_startup_line_says_what_runs_where(server):
    line = server.wait_for_line("serving ")
    assert sum(text.startswith("serving ") for text in server.log_path.read_text().splitlines()) == 1
    assert line.startswith("serving vae_decoder (torch fp32 on cpu) on http://127.0.0.1:")
    assert f"grpc 127.0.0.1:{server.grpc}" in line and f"{server.metrics}/metrics" in line
    assert f"dynamic batching up to {MAX_BATCH} latents, 500 µs queue delay" in line


def test_images_equal_decode_over_http_and_grpc(server, reference):
    z = latents(0, 5)
    for images in (infer_http(server.http, z), infer_grpc(server.grpc, z)):
        assert images.shape == (5, 784) and images.dtype == np.float32
        np.testing.assert_allclose(images, reference(z), rtol=0, atol=1e-6)  # merged batches may change the last bit


def test_concurrent_clients_each_get_their_own_images(server, reference):
    jobs = [latents(100 + i, 1 + i % 7) for i in range(96)]  # distinct z: a crossed answer cannot pass
    counted_before = server.counter("nv_inference_count")
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda z: infer_http(server.http, z), jobs))
    for z, images in zip(jobs, answers):
        np.testing.assert_allclose(images, reference(z), rtol=0, atol=1e-6)
    assert server.counter("nv_inference_count") - counted_before == sum(len(z) for z in jobs)  # each decoded once


@pytest.mark.parametrize(
    ("z", "datatype", "says"),
    [
        (np.zeros((3, 3), np.float32), "FP32", "unexpected shape for input 'z'"),
        (np.zeros((3, 2), np.float64), "FP64", "FP64"),
        (np.zeros((MAX_BATCH + 1, 2), np.float32), "FP32", f"batch-size must be <= {MAX_BATCH}"),
        (np.array([[0.0, np.nan]], np.float32), "FP32", "latents contain NaN or Inf"),
        (np.array([[np.inf, 0.0]], np.float32), "FP32", "latents contain NaN or Inf"),
    ],
    ids=["shape", "dtype", "batch-above-max", "nan", "inf"],
)
def test_bad_request_gets_an_error_saying_why_and_the_server_keeps_serving(server, reference, z, datatype, says):
    with pytest.raises(InferenceServerException, match=says):
        infer_http(server.http, z, datatype)
    good = latents(7, 2)
    np.testing.assert_allclose(infer_http(server.http, good), reference(good), rtol=0, atol=1e-6)


def test_busy_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "vae_rt", "serve", "--http-port", str(port)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: HTTP port {port}: 127.0.0.1:{port} is already in use"]


def test_sigterm_answers_the_requests_already_accepted_and_exits_0(servers, reference):
    holding = servers["holding"]
    jobs = [latents(200 + i, 1 + i % 3) for i in range(8)]
    answers: dict[int, object] = {}

    def send(i: int) -> None:
        try:
            answers[i] = infer_grpc(holding.grpc, jobs[i])
        except InferenceServerException as error:  # kept, so the assertion below shows it
            answers[i] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while holding.counter("nv_inference_pending_request_count") < len(jobs):  # all queued in Triton's batcher
        assert time.monotonic() < deadline, "the requests never reached Triton's queue"
        time.sleep(0.05)
    assert holding.stop() == 0
    for thread in threads:
        thread.join(timeout=60)
    for i, z in enumerate(jobs):
        assert isinstance(answers[i], np.ndarray), answers[i]
        np.testing.assert_allclose(answers[i], reference(z), rtol=0, atol=1e-6)
    assert "stopped: every accepted request was answered" in holding.log_path.read_text()


def test_load_benchmark_runs_one_round():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--clients", "2", "--batches", "1",
         "--duration", "0.2", "--rounds", "1", "--backend", "torch"],  # torch: no ONNX export to wait for
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:2] == ["2", "1"]]
    assert [row[2] for row in rows] == ["decoder", "noop"]
    assert "errors + wrong + lost over every run: 0" in done.stdout


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_while_the_model_is_bound_stops_without_a_traceback(monkeypatch, signals):
    """PyTriton prints a KeyboardInterrupt raised inside its bind(): the first Ctrl-C then waits for the
    binding and stops after it, without serving; a second one stops at once."""
    import signal
    from types import SimpleNamespace

    import vae_rt.serve as serve_module
    from vae_rt.serve_options import ServeOptions

    events = []

    class FakeTriton:  # what serve_model uses of pytriton.triton.Triton
        def __init__(self, config, workspace):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append("stopped")

        def bind(self, **model):
            for _ in range(signals):
                signal.raise_signal(signal.SIGINT)  # Ctrl-C while PyTriton waits for the model to load
            events.append("bound")

        def serve(self):
            events.append("served")

    fakes = {
        "pytriton.triton": SimpleNamespace(TritonConfig=lambda **config: None, Triton=FakeTriton),
        "pytriton.model_config": SimpleNamespace(Tensor=dict, ModelConfig=dict, DynamicBatcher=dict),
    }
    monkeypatch.setattr(serve_module, "require", lambda name, extra: fakes[name])
    monkeypatch.setattr(ServeOptions, "check", lambda self: None)
    serve_module.serve_model(lambda **inputs: None, 2, ServeOptions(), on_ready=lambda: events.append("ready"))
    assert events == (["bound", "stopped"] if signals == 1 else ["stopped"])
