"""`precision="auto"`: reduced-precision engines join only once their quality gate passed, judged once per model."""

import json
import logging

import pytest
import torch

from vae_rt import gates, open_sampler
from vae_rt.checkpoint import load_checkpoint
from vae_rt.errors import UserError
from vae_rt.files import sha256_file
from vae_rt.sampler import draw_latents


class FakeEngine:
    """A backend whose decode is a given function of the latents."""

    def __init__(self, decode):
        self.decode = decode

    def open(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def engines_made(bundled):
    """make(backend, precision) for gates.passing_engines: exact int8, broken bf16; counts the engines it made."""
    model = load_checkpoint(bundled)[0]
    decoders = {
        "ort int8": model.decode,  # as good as fp32: passes
        "torch bf16": lambda z: model.decode(z).round(),  # every pixel 0 or 1: fails by far
    }
    made = []

    def make(backend, precision):
        made.append(f"{backend} {precision}")
        return FakeEngine(decoders[f"{backend} {precision}"])

    return make, made


ENGINES = [("ort", "fp32"), ("ort", "int8"), ("torch", "bf16")]


def test_only_engines_whose_gate_passed_are_kept_and_the_verdicts_are_cached(bundled, engines_made, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))  # the verdicts of fakes never reach the session cache
    make, made = engines_made
    digest = sha256_file(bundled)
    kept, lines = gates.passing_engines(ENGINES, make, bundled, digest)
    assert kept == [("ort", "fp32"), ("ort", "int8")] and sorted(made) == ["ort int8", "torch bf16"]
    assert lines[0].startswith("ort int8: PASS int8 test loss") and lines[1].startswith("torch bf16: FAIL bf16")

    made.clear()
    assert gates.passing_engines(ENGINES, make, bundled, digest) == (kept, lines)  # from the cache
    assert made == []


def test_an_altered_verdict_is_judged_again(bundled, engines_made, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))
    make, made = engines_made
    digest = sha256_file(bundled)
    gates.passing_engines(ENGINES, make, bundled, digest)
    (record,) = (tmp_path / "gates").iterdir()
    stored = json.loads(record.read_text())
    stored["value"]["torch bf16"]["passed"] = True  # edited to let the broken engine in
    record.write_text(json.dumps(stored))
    made.clear()
    kept, _ = gates.passing_engines(ENGINES, make, bundled, digest)
    assert ("torch", "bf16") not in kept and sorted(made) == ["ort int8", "torch bf16"]


def test_a_gate_that_cannot_be_computed_leaves_the_engine_out_and_is_tried_again(bundled, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))
    calls = []

    def make(backend, precision):
        calls.append(precision)
        raise UserError("MNIST folder /nowhere does not exist")

    kept, lines = gates.passing_engines([("ort", "fp32"), ("ort", "int8")], make, bundled, sha256_file(bundled))
    assert kept == [("ort", "fp32")] and lines == ["ort int8: not judged: MNIST folder /nowhere does not exist"]
    gates.passing_engines([("ort", "fp32"), ("ort", "int8")], make, bundled, sha256_file(bundled))
    assert calls == ["int8", "int8"]  # nothing was cached


def test_without_a_test_set_the_engines_left_out_are_named_once_as_a_warning(bundled, engines_made, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VAE_RT_MNIST_DIR", str(tmp_path / "no-mnist"))
    make, made = engines_made
    with caplog.at_level(logging.WARNING, logger="vae_rt"):
        kept, lines = gates.passing_engines(ENGINES, make, bundled, sha256_file(bundled))
    assert kept == [("ort", "fp32")] and made == [] and all("not judged: MNIST folder" in line for line in lines)
    (warning,) = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("precision auto: ort int8, torch bf16 left out, as their quality gate cannot run here")


def test_a_malformed_verdict_with_a_valid_checksum_is_judged_again(bundled, engines_made, tmp_path, monkeypatch):
    from vae_rt.cache import save_record

    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))
    make, made = engines_made
    gates.passing_engines(ENGINES, make, bundled, sha256_file(bundled))
    (record,) = (tmp_path / "gates").iterdir()
    stored = json.loads(record.read_text())
    save_record(record, stored["key"], {"ort int8": {"passed": True}, "torch bf16": "PASS"})  # re-checksummed, not verdicts
    made.clear()
    kept, _ = gates.passing_engines(ENGINES, make, bundled, sha256_file(bundled))
    assert sorted(made) == ["ort int8", "torch bf16"] and ("torch", "bf16") not in kept


def test_precision_auto_on_the_cpu_runs_int8_only_after_its_gate_and_says_so(bundled, caplog):
    pytest.importorskip("onnxruntime")
    with caplog.at_level(logging.INFO, logger="vae_rt"), open_sampler(bundled, "auto", "auto", "cpu") as sampler:
        assert "ort int8" in sampler.backend.labels  # the shipped int8 passes its gate on the bundled model
        images = sampler.decode(draw_latents(64, 2, seed=3))
    assert images.shape == (64, 1, 28, 28) and torch.isfinite(images).all()
    chosen = [r.message for r in caplog.records if r.message.startswith("backend auto: per batch size")]
    assert len(chosen) == 1 and "quality gates: " in chosen[0] and "ort int8: PASS int8" in chosen[0]  # bf16 too on CPUs with it
