"""The benchmark harness runs (one tiny iteration each), so it cannot rot; speed itself is not asserted here."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vae_rt.bench import Timing, _end_to_end, bench_targets, run_benchmarks, time_calls
from vae_rt.checkpoint import BUNDLED_CHECKPOINT
from vae_rt.cli import app
from vae_rt.errors import UserError
from vae_rt.gemm_limits import ENGINE_GEMMS, SQUARE, GemmLimit, Unsupported, decoder_shapes, gemm_calls, matmul_limits
from vae_rt.peers import PEERS


def test_timing_statistics():
    timing = Timing([0.001 * i for i in range(1, 101)])
    assert timing.median == pytest.approx(0.0505)
    assert timing.percentile(99) == pytest.approx(0.099) and timing.percentile(90) == pytest.approx(0.090)
    assert Timing([1.0, 1.0, 1.0]).cv == 0


def test_time_calls_honours_minimum_iterations():
    calls = []
    timing = time_calls(lambda: calls.append(1), warmup=0.0, min_duration=0.0, min_iterations=7)
    assert len(timing.latencies) == 7 and len(calls) == 7


def test_targets_skip_pointless_pairs():
    targets = bench_targets(["torch", "ort", "trt"], ["fp32", "fp16", "bf16"], "cpu")
    assert targets == [("torch", "fp32", "cpu"), ("torch", "bf16", "cpu"), ("ort", "fp32", "cpu"), ("ort", "fp16", "cpu")]
    assert bench_targets(["torch", "trt"], ["fp16"], "cpu") == []
    assert ("trt", "fp16", "cuda") in bench_targets(["trt"], ["fp16"], "auto")  # kept, to say why it is skipped
    # precision auto is backend auto's gated choice; auto's other precisions are fixed engines' rows
    assert bench_targets(["auto", "ort"], ["fp32", "auto", "int8"], "cpu") == [
        ("auto", "fp32", "cpu"), ("auto", "auto", "cpu"), ("ort", "fp32", "cpu"), ("ort", "int8", "cpu"),
    ]


def test_timed_call_copies_to_the_host_only_from_a_gpu():
    images = MagicMock()
    decode = MagicMock(return_value=images)
    assert _end_to_end(decode, "z", "cpu")() is images  # on the host already: no .cpu() to pay for
    images.cpu.assert_not_called()
    assert _end_to_end(decode, "z", "cuda")() is images.cpu.return_value
    decode.assert_called_with("z")


class FakeClock:
    """time.perf_counter for the harness: only the decodes below move it, so every latency is known exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def decode_taking(self, seconds):
        def decode(*z):
            self.now += seconds
            return z

        return decode


def test_rows_measure_each_target_against_the_eager_reference(monkeypatch):
    import vae_rt.bench as bench_module
    import vae_rt.timing as timing_module

    clock = FakeClock()
    monkeypatch.setattr(timing_module.time, "perf_counter", clock)
    monkeypatch.setattr(bench_module, "reference_decoder", lambda checkpoint: clock.decode_taking(0.001))
    monkeypatch.setattr(bench_module, "gemm_calls", lambda shapes, precisions: {("fp32", "torch", (1, 1, 1)): lambda: clock.decode_taking(0.5)(None)})

    def fake_sampler(checkpoint, backend, precision, device):
        if backend == "trt":
            raise UserError("TensorRT is not installed")
        engine = SimpleNamespace(name=backend, precision=precision, device=device)
        engine.engines = lambda: [engine]
        return SimpleNamespace(decode=clock.decode_taking(0.004), describe=lambda: "slow fake", chosen_because=None,
                               backend=engine, close=lambda: None)

    monkeypatch.setattr(bench_module, "open_sampler", fake_sampler)
    rows, _ = run_benchmarks([("ort", "fp32", "cpu"), ("trt", "fp16", "cuda")], [1, 8], min_duration=0.0)
    eager = [r for r in rows if r.backend == "torch-eager"]
    slow = [r for r in rows if r.runs_on == "slow fake"]
    assert [r.batch for r in eager] == [1, 8] and [r.batch for r in slow] == [1, 8]
    for row in slow:  # four times the eager latency: a quarter of its speed
        assert row.p50_ms == pytest.approx(4.0) and row.vs_torch_eager == pytest.approx(0.25)
        assert row.samples_per_s == pytest.approx(row.batch / 0.004)
        assert row.pct_of_peak == pytest.approx(100 * row.gflops / (2 / 0.5 / 1e9))  # against the one fake GEMM's rate
    assert eager[1].samples_per_s == pytest.approx(8 / 0.001)
    skipped = [r for r in rows if r.backend == "trt"]
    assert len(skipped) == 1 and skipped[0].runs_on == "skipped: TensorRT is not installed"


def test_limit_is_the_best_rate_over_libraries_and_shapes():
    square, own = (1024, 1024, 1024), (8192, 512, 784)
    limits = matmul_limits({
        ("fp32", "torch", square): [0.1, 0.1], ("fp32", "torch", own): [0.06], ("fp32", "onnxruntime", own): [0.05, 0.04, 0.06],
        ("bf16", "torch", square): [0.02], ("bf16", "openvino", square): [0.03],
    })
    assert limits["fp32"] == GemmLimit(pytest.approx(2 * 8192 * 512 * 784 / 0.05 / 1e9), "onnxruntime", own)  # the median
    assert limits["bf16"] == GemmLimit(pytest.approx(2 * 1024**3 / 0.02 / 1e9), "torch", square)
    assert limits["fp32"].describe().endswith(" (onnxruntime, 8192x512x784)")
    assert SQUARE == square and decoder_shapes(BUNDLED_CHECKPOINT, 8192) == [(8192, 2, 256), (8192, 256, 512), own]


def test_a_bf16_peer_is_measured_against_a_bf16_limit(monkeypatch):
    """A bf16 peer row gets bf16 GEMMs timed, even when no vae-rt row computes in bf16 (else its % of peak is fp32's)."""
    import vae_rt.bench as bench_module
    from vae_rt.peers import Peer

    asked = []

    def gemm_calls(shapes, precisions):
        asked.append(set(precisions))
        return {("fp32", "torch", (1, 1, 1)): lambda: None}

    monkeypatch.setattr(bench_module, "gemm_calls", gemm_calls)
    bf16_peer = Peer("peer openvino", "bf16", "a fake bf16 peer", lambda z: lambda: None)
    monkeypatch.setattr(bench_module, "open_peers", lambda *args: ([bf16_peer], []))
    monkeypatch.setattr(bench_module, "cached_onnx", lambda checkpoint, precision: None)  # the fake peer reads no file
    monkeypatch.setattr(bench_module, "SETTLE_SECONDS", 0.0)
    run_benchmarks([("torch", "fp32", "cpu")], [1], min_duration=0.0, rounds=1, peers=("openvino-bf16",))
    assert asked and all("bf16" in precisions for precisions in asked)


@pytest.mark.parametrize("library", ["onnxruntime", "openvino"])
def test_engine_gemms_compute_the_product(library):
    """A limit is only honest if the timed call does the whole GEMM: its product is checked."""
    pytest.importorskip(library)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, 70, generator=generator).numpy(), torch.randn(70, 19, generator=generator).numpy()
    product = ENGINE_GEMMS[library](a, b, "fp32")()[0]  # ORT's list of outputs, OpenVINO's dict of them
    assert np.allclose(product, a @ b, rtol=1e-4, atol=1e-4)


def test_limit_calls_cover_each_installed_library_and_only_asked_precisions():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    shape = (8, 16, 32)
    assert {key[:2] for key in gemm_calls([shape], set())} == {("fp32", "torch"), ("fp32", "onnxruntime"), ("fp32", "openvino")}
    with_bf16 = {key[:2] for key in gemm_calls([shape], {"bf16"})}
    assert ("bf16", "torch") in with_bf16 and ("bf16", "onnxruntime") not in with_bf16  # ORT's CPU provider has no bf16 MatMul
    with pytest.raises(Unsupported):
        ENGINE_GEMMS["onnxruntime"](np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), "bf16")


def test_peers_are_timed_in_the_same_run(monkeypatch):
    """One iteration of every peer but torch.compile (its first compile takes minutes on a small machine)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    monkeypatch.setattr("vae_rt.bench.SETTLE_SECONDS", 0.0)  # a smoke test: no pauses between rows
    peers = tuple(name for name in PEERS if name != "torch.compile")
    rows, _ = run_benchmarks([("auto", "fp32", "cpu")], [3], min_duration=0.0, rounds=1, peers=peers)
    timed = {(r.backend, r.precision) for r in rows if r.iterations}
    assert {("peer ort", "fp32"), ("peer openvino", "fp32"), ("peer ort", "int8"), ("auto", "fp32")} <= timed
    for row in (r for r in rows if r.iterations):  # no int8 limit is timed: no share of fp32's
        assert (row.pct_of_peak is None) == (row.precision == "int8"), row
    (auto,) = [r for r in rows if r.backend == "auto"]  # named after the engine that decoded its batch, its limit that engine's
    assert auto.computes_in == "fp32" and auto.runs_on.startswith("auto on cpu: ") and auto.runs_on.endswith(" fp32 at this batch")
    int8 = [r for r in rows if r.backend == "peer openvino" and r.precision == "int8"]  # no exported int8 file here:
    assert len(int8) == 1 and "runs no layer of decoder.dynamic-int8.onnx in int8" in int8[0].runs_on  # ORT's dynamic one
    bf16 = [r for r in rows if r.backend == "peer openvino" and r.precision == "bf16"]
    assert len(bf16) == 1 and (bf16[0].iterations or "no native bf16" in bf16[0].runs_on)


def test_int8_peers_never_trust_an_unverified_file_in_the_cache(random_checkpoint, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    from vae_rt.peers import int8_model
    from vae_rt.resolve import cached_onnx

    fp32 = cached_onnx(random_checkpoint, "fp32")
    beside = fp32.with_name(fp32.name.replace(".fp32.", ".int8."))
    beside.write_bytes(fp32.read_bytes()[:5000])  # a truncated or foreign file where the int8 export would be
    try:
        with caplog.at_level(logging.WARNING, logger="vae_rt"):
            assert int8_model(random_checkpoint, fp32, tmp_path) == tmp_path / "decoder.dynamic-int8.onnx"
    finally:
        beside.unlink()
    assert any("cannot be used (its manifest is missing" in r.message for r in caplog.records)


def test_bad_batch_sizes():
    with pytest.raises(UserError):
        run_benchmarks([], [0])


def test_cli_writes_json_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("vae_rt.bench.SETTLE_SECONDS", 0.0)  # a smoke test: no pauses between rows
    result = CliRunner().invoke(app, ["bench", "--backends", "torch,ort", "--precisions", "fp32", "--batch-sizes", "1,8",
                                      "--duration", "0.01", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["matmul_limit_gflops"]["fp32"] > 0
    assert set(report["matmul_limit_gflops"]) == {"fp32"}  # no bf16 row timed, so no bf16 GEMM timed either
    reached_by = report["matmul_limit_reached_by"]["fp32"]
    timed_shapes = [SQUARE, *decoder_shapes(BUNDLED_CHECKPOINT, 1), *decoder_shapes(BUNDLED_CHECKPOINT, 8)]
    assert reached_by["library"] in ("torch", "onnxruntime", "openvino") and tuple(reached_by["mkn"]) in timed_shapes
    assert {(r["backend"], r["batch"]) for r in report["rows"]} >= {("torch", 8), ("ort", 1), ("torch-eager", 1)}
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "samples/s" in result.output and "vs eager" in result.output


BENCH_SCRIPTS = Path(__file__).resolve().parents[1] / "bench"


def _run_script(name: str, *args: object) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH_SCRIPTS / name), *map(str, args)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_pipeline_script_runs(tmp_path):
    output = _run_script("sample_pipeline.py", "-n", 3000, "--rounds", 1, "--dir", tmp_path)
    assert "round 1: decode only" in output and "median of 1:" in output
    assert list(tmp_path.iterdir()) == []  # its .npy lives in a temporary folder


def test_after_call_script_runs():
    output = _run_script("after_call.py", "--engine", "ort", "--batch", 4, "--calls", 3)
    assert "ort fp32 on CPUExecutionProvider, batch 4" in output and "check_latents(tensor)" in output


def test_api_cost_script_runs():
    output = _run_script("api_cost.py", "--rounds", 1, "--calls", 3)
    assert "median of 1: Sampler.decode (ort) = " in output and "median of 1: Sampler.decode (ort, numpy latents) = " in output


def test_mixed_sizes_script_runs():
    output = _run_script("mixed_sizes.py", "--calls", 6, "--max-batch", 64, "--rounds", 1)
    assert "6 calls" in output and "median of 1: auto " in output and "always switching" in output


def test_train_speed_script_runs(mnist_dir, monkeypatch, capsys):
    """The script's own code, on 1024 training images in both loops (a full epoch of each is the benchmark)."""
    import runpy

    from torch.utils.data import Subset
    from torchvision import datasets

    import vae_rt.train as train_module

    train_images, test_images = train_module.load_mnist(mnist_dir)
    monkeypatch.setattr(train_module, "load_mnist", lambda data_dir: (train_images[:1024], test_images[:256]))
    real_mnist = datasets.MNIST

    def small_mnist(*args, train, **kwargs):
        return Subset(real_mnist(*args, train=train, **kwargs), range(1024 if train else 256))

    monkeypatch.setattr(datasets, "MNIST", small_mnist)
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--data-dir", str(mnist_dir), "--epochs", "1"])
    runpy.run_path(str(BENCH_SCRIPTS / "train_speed.py"), run_name="__main__")
    output = capsys.readouterr().out
    assert "epoch 1: tutorial loop" in output and "x faster" in output
