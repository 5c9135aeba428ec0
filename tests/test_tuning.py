"""`auto` on the CPU: the choice rule as plain functions, the timing cache, and the per-batch dispatch."""

import json
import logging
import time

import pytest
import torch

from vae_rt import open_sampler, tuning
from vae_rt.backends.auto import AutoBackend
from vae_rt.checkpoint import load_checkpoint
from vae_rt.parity import compare
from vae_rt.sampler import draw_latents
from vae_rt.timing import SETTLE_SECONDS

TIMINGS = {  # seconds per call at each probe: ort wins small batches, openvino large ones
    "ort fp32": {1: 20e-6, 32: 90e-6, 2048: 4.0e-3},
    "openvino fp32": {1: 60e-6, 32: 120e-6, 2048: 3.0e-3},
    "torch fp32": {1: 40e-6, 32: 100e-6, 2048: 3.6e-3},
}


def test_nearest_probe_is_nearest_on_a_log_scale():
    probes = (1, 32, 1024)
    assert [tuning.nearest_probe(b, probes) for b in (0, 1, 5, 6, 31, 181, 182, 1024, 8192)] == [
        1, 1, 1, 32, 32, 32, 1024, 1024, 1024,
    ]


def test_fastest_engine_per_batch_size_and_the_explanation():
    assert [tuning.serving_engine(TIMINGS, b) for b in (1, 7, 64, 300, 1000, 65536)] == [
        "ort fp32", "ort fp32", "ort fp32", "openvino fp32", "openvino fp32", "openvino fp32",
    ]
    why = tuning.explain(TIMINGS)
    assert "batch 1: ort fp32 (20 us, 2.00x over torch fp32)" in why
    assert "batch 2048: openvino fp32 (3000 us, 1.20x over torch fp32)" in why


def test_an_engine_within_five_percent_stands_in_for_the_fastest_when_that_spares_an_engine():
    timings = {  # int8 is 2 % quicker than bf16 at 32 only; ort wins batch 1 by far
        "ort fp32": {1: 27e-6, 32: 190e-6, 2048: 8.7e-3},
        "openvino bf16": {1: 61e-6, 32: 117e-6, 2048: 1.43e-3},
        "openvino int8": {1: 65e-6, 32: 115e-6, 2048: 1.47e-3},
    }
    assert tuning.winners(timings) == {1: "ort fp32", 32: "openvino bf16", 2048: "openvino bf16"}
    assert "batch 32: openvino bf16 (117 us, 1.02x the time of openvino int8, one engine fewer)" in tuning.explain(timings)
    timings["openvino int8"][32] = 100e-6  # now alone within 5 % at 32, and within 3 % at 2048: it serves both
    assert tuning.winners(timings) == {1: "ort fp32", 32: "openvino int8", 2048: "openvino int8"}
    timings["openvino int8"][2048] = 1.6e-3  # 12 % slower at 2048: each keeps the probe it wins
    assert tuning.winners(timings) == {1: "ort fp32", 32: "openvino int8", 2048: "openvino bf16"}
    assert tuning.winners({"a": {1: 1.0, 32: 1.0}, "b": {1: 1.0, 32: 1.0}}) == {1: "a", 32: "a"}  # a tie: by name


def test_requested_precisions_add_reduced_ones_only_for_precision_auto():
    assert tuning.requested_precisions(None, bf16_native=True) == ["fp32"]  # fp32 unless asked
    assert tuning.requested_precisions("auto", bf16_native=False) == ["fp32", "int8"]  # emulated bf16 is slow
    assert tuning.requested_precisions("auto", bf16_native=True) == ["fp32", "bf16", "int8"]
    assert tuning.requested_precisions("bf16", bf16_native=False) == ["bf16"]  # asked for explicitly: it runs


def test_candidate_engines_follow_what_each_backend_can_read():
    everything = {"torch", "ort", "openvino"}
    assert tuning.candidate_engines(["fp32"], "checkpoint", "fp32", everything, False) == [
        ("ort", "fp32"), ("openvino", "fp32"), ("torch", "fp32"),
    ]
    assert tuning.candidate_engines(["fp32", "bf16"], "checkpoint", "fp32", everything, False) == [
        ("ort", "fp32"), ("openvino", "fp32"), ("torch", "fp32"), ("torch", "bf16"),  # no emulated OpenVINO bf16
    ]
    assert ("openvino", "bf16") in tuning.candidate_engines(["bf16"], "checkpoint", "fp32", everything, True)
    assert tuning.candidate_engines(["fp32"], "onnx", "fp32", {"torch"}, True) == []  # torch cannot read ONNX
    assert tuning.candidate_engines(["fp16"], "onnx", "fp16", everything, True) == [("ort", "fp16")]
    assert tuning.candidate_engines(["fp16"], "onnx", "fp32", everything, True) == []  # no fp16 twin of the file
    assert tuning.candidate_engines(["int8"], "checkpoint", "fp32", everything, True) == [("ort", "int8"), ("openvino", "int8")]
    assert tuning.candidate_engines(["int8"], "onnx", "int8", everything, False) == [("ort", "int8"), ("openvino", "int8")]
    assert tuning.candidate_engines(["int8"], "onnx", "fp32", everything, True) == []  # no int8 twin of the file
    assert tuning.candidate_engines(["fp32"], "onnx", "int8", everything, True) == []


SWITCHES = {  # winners: ort at 1 and 32, openvino at 2048
    "openvino fp32": {"ort fp32": {1: 190e-6, 32: 150e-6}},
    "ort fp32": {"openvino fp32": {2048: 2.5e-3}},
}
TUNED = tuning.Tuned(TIMINGS, SWITCHES)


def test_switch_points_are_every_move_into_a_probes_winner_from_another_winner():
    assert tuning.switch_points(TIMINGS) == [
        ("openvino fp32", "ort fp32", 1), ("openvino fp32", "ort fp32", 32), ("ort fp32", "openvino fp32", 2048),
    ]
    assert tuning.switch_points({"ort fp32": TIMINGS["ort fp32"]}) == []  # one engine: nothing to switch


def test_cache_round_trip_and_every_reason_to_distrust_it(tmp_path):
    key = tuning.tuning_key("ab" * 32, list(TIMINGS))
    path = tmp_path / "tuning" / "t.json"
    assert tuning.load_tuning(path, key) is None  # nothing cached yet
    tuning.save_tuning(path, key, TUNED)
    assert tuning.load_tuning(path, key) == TUNED
    assert tuning.load_tuning(path, {**key, "model_sha256": "cd" * 32}) is None  # another model
    assert tuning.load_tuning(path, {**key, "threads": key["threads"] + 1}) is None  # another machine setup
    stored = json.loads(path.read_text())
    stored["value"]["timings"]["ort fp32"]["1"] = 1e-9  # edited by hand: the checksum no longer matches
    path.write_text(json.dumps(stored))
    assert tuning.load_tuning(path, key) is None
    path.write_text("{not json")
    assert tuning.load_tuning(path, key) is None
    assert tuning.cache_path(key) != tuning.cache_path({**key, "model_sha256": "cd" * 32})


def test_a_cache_may_lack_an_engine_that_could_not_run_but_never_holds_a_stranger(tmp_path):
    key = tuning.tuning_key("ab" * 32, list(TIMINGS))
    path = tmp_path / "t.json"
    without_openvino = tuning.Tuned(  # torch wins at 2048 then
        {label: t for label, t in TIMINGS.items() if label != "openvino fp32"},
        {"torch fp32": {"ort fp32": {1: 1e-4, 32: 1e-4}}, "ort fp32": {"torch fp32": {2048: 1e-3}}},
    )
    tuning.save_tuning(path, key, without_openvino)
    assert tuning.load_tuning(path, key) == without_openvino
    switch_short = {"ort fp32": SWITCHES["ort fp32"]}
    switch_negative = {**SWITCHES, "ort fp32": {"openvino fp32": {2048: -1.0}}}
    for bad_timings, bad_switches in [
        ({**TIMINGS, "trt fp16": TIMINGS["ort fp32"]}, SWITCHES), ({}, {}), ({"ort fp32": {1: 1e-5}}, {}),  # unknown, none, a probe short
        (TIMINGS, switch_short), (TIMINGS, switch_negative), (TIMINGS, {**SWITCHES, "torch fp32": {"ort fp32": {1: 1e-4}}}),
    ]:
        tuning.save_tuning(path, key, tuning.Tuned(bad_timings, bad_switches))
        assert tuning.load_tuning(path, key) is None
    tuning.save_record(path, key, TIMINGS)  # the table alone, as revision 4 stored it
    assert tuning.load_tuning(path, key) is None


def test_measure_times_every_engine_at_every_probe():
    calls = {"a": lambda z: z.sum(), "b": lambda z: torch.mm(z, z.t())}
    timings = tuning.measure(calls, z_dim=2, probes=(1, 64), rounds=2, seconds=0.0)
    assert sorted(timings) == ["a", "b"] and all(sorted(t) == [1, 64] and min(t.values()) > 0 for t in timings.values())


def test_measure_switches_times_the_second_engine_right_after_the_first():
    order = []

    def call(label):
        def decode(z):
            order.append((label, len(z)))
            if label == "ort fp32" and len(order) > 1 and order[-2][0] == "openvino fp32":
                time.sleep(0.002)  # as if openvino's threads still held the cores

        return decode

    calls = {label: call(label) for label in TIMINGS}
    switches = tuning.measure_switches(calls, TIMINGS, z_dim=2, repeats=3)
    assert sorted((b, a, p) for b, afters in switches.items() for a, per in afters.items() for p in per) == sorted(tuning.switch_points(TIMINGS))
    assert switches["openvino fp32"]["ort fp32"][1] >= 0.002 - TIMINGS["ort fp32"][1]
    assert 0 <= switches["ort fp32"]["openvino fp32"][2048] < 0.002  # openvino's call costs nothing extra here (and timings say 3 ms)
    assert order[:2] == [("openvino fp32", 2048), ("ort fp32", 1)]  # the first engine runs at the probe it wins itself


class FakeEngine:
    """Records which batches it decoded."""

    def __init__(self, label):
        self.label, self.batches, self.closed = label, [], False

    def open(self):
        return self

    def close(self):
        self.closed = True

    def decode(self, z, out=None, check_inputs=True):
        self.batches.append(z.shape[0])
        return torch.zeros(z.shape[0], 1, 28, 28)


def test_auto_backend_dispatches_by_batch_size_and_keeps_only_winners(monkeypatch):
    made = {}

    def make(backend, precision):
        return made.setdefault(f"{backend} {precision}", FakeEngine(f"{backend} {precision}"))

    monkeypatch.setattr(tuning, "measure", lambda calls, z_dim: TIMINGS if set(calls) == set(TIMINGS) else {})
    monkeypatch.setattr(tuning, "measure_switches", lambda calls, timings, z_dim: SWITCHES)
    engines = [("ort", "fp32"), ("openvino", "fp32"), ("torch", "fp32")]
    with AutoBackend(engines, make, "ef" * 32, 2) as auto:
        assert made["torch fp32"].closed  # measured, never the fastest: closed
        auto.decode(torch.zeros(1, 2))
        auto.decode(torch.zeros(1000, 2))  # right after ort: staying loses less than a switch would (vae_rt.dispatch)
        time.sleep(2 * SETTLE_SECONDS)
        auto.decode(torch.zeros(1000, 2))
        assert made["ort fp32"].batches == [1, 1000] and made["openvino fp32"].batches == [1000]
        assert auto.describe() == "auto on cpu: ort fp32, openvino fp32"
        assert "measured now" in auto.why and "a switch right after another engine ran cost openvino fp32 -> ort fp32 at batch 1: +190 us;" in auto.why
    with AutoBackend(engines, make, "ef" * 32, 2) as auto:  # the second open reads the cache
        assert "cached in" in auto.why and auto.engine_for(5000) == "openvino fp32"


def test_one_engine_for_every_size_takes_every_call_without_the_dispatcher(monkeypatch):
    made = {}

    def make(backend, precision):
        return made.setdefault(f"{backend} {precision}", FakeEngine(f"{backend} {precision}"))

    fastest_everywhere = {**TIMINGS, "ort fp32": {probe: 1e-9 for probe in TIMINGS["ort fp32"]}}
    monkeypatch.setattr(tuning, "measure", lambda calls, z_dim: fastest_everywhere)
    monkeypatch.setattr(tuning, "measure_switches", lambda calls, timings, z_dim: {})
    with AutoBackend([("ort", "fp32"), ("openvino", "fp32"), ("torch", "fp32")], make, "ee" * 32, 2) as auto:
        monkeypatch.setattr(auto._dispatch, "choose", lambda rows, now: pytest.fail("nothing to choose"))
        for rows in (1, 5000, 3):
            auto.decode(torch.zeros(rows, 2))
        assert made["ort fp32"].batches == [1, 5000, 3] and made["openvino fp32"].closed
    with pytest.raises(RuntimeError, match="auto backend is not open"):  # closed with its `with` block
        auto.decode(torch.zeros(1, 2))


def test_an_engine_that_cannot_run_here_is_left_out_of_the_timing_with_its_reason(monkeypatch, caplog):
    from vae_rt.errors import EngineUnavailable, UserError

    def make(backend, precision):
        if backend == "openvino":
            raise EngineUnavailable("precision int8: openvino runs no layer of m.int8.onnx in int8 on this CPU")
        return FakeEngine(f"{backend} {precision}")

    monkeypatch.setattr(tuning, "measure", lambda calls, z_dim: {label: TIMINGS[label] for label in calls})
    engines = [("ort", "fp32"), ("openvino", "fp32"), ("torch", "fp32")]
    with caplog.at_level(logging.INFO, logger="vae_rt"), AutoBackend(engines, make, "fe" * 32, 2) as auto:
        assert set(auto.timings) == {"ort fp32", "torch fp32"} and auto.engine_for(1000) == "torch fp32"
        assert "the fastest of ort fp32, torch fp32 (" in auto.why and auto.why.endswith("left out, unable to run here: openvino fp32")
    assert any("openvino fp32 cannot run here, left out (precision int8: openvino runs no layer" in r.message for r in caplog.records)
    with AutoBackend(engines, make, "fe" * 32, 2) as auto:  # cached without it: not opened again, still said
        assert "cached in" in auto.why and auto.engine_for(1) == "ort fp32" and "left out" in auto.why

    def refuse(backend, precision):
        raise EngineUnavailable(f"{backend} is not here")

    with pytest.raises(EngineUnavailable, match="^backend auto: no CPU engine can run this model here: ort fp32: ort is not here; "):
        AutoBackend(engines, refuse, "fd" * 32, 2).open()

    def setup_problem(backend, precision):  # e.g. a full cache folder: not a verdict on the machine, never cached
        if backend == "ort":
            raise UserError("cache folder C: cannot write P (No space left on device)")
        return FakeEngine(f"{backend} {precision}")

    with pytest.raises(UserError, match="No space left"):
        AutoBackend(engines, setup_problem, "fc" * 32, 2).open()
    key = tuning.tuning_key("fc" * 32, [tuning.engine_label(*e) for e in engines])
    assert tuning.load_tuning(tuning.cache_path(key), key) is None


def test_auto_on_the_cpu_decodes_like_torch_fp32_and_logs_its_choice_once(bundled, caplog):
    z = draw_latents(300, 2, seed=9)
    with torch.no_grad():
        reference = load_checkpoint(bundled)[0].decode(z).view(-1, 1, 28, 28)
    with caplog.at_level(logging.INFO, logger="vae_rt"), open_sampler(bundled, "auto", None, "cpu", batch_size=128) as sampler:
        assert compare(reference, sampler.decode(z), "fp32").passed  # chunks of 128 and 44: maybe two engines
        assert sampler.describe().startswith("auto on cpu: ")
    chosen = [r.message for r in caplog.records if r.message.startswith("backend auto: per batch size")]
    assert len(chosen) == 1 and "batch 1:" in chosen[0]


def test_precision_auto_needs_backend_auto(bundled):
    from vae_rt.errors import UserError

    with pytest.raises(UserError, match="precision auto needs backend auto"):
        open_sampler(bundled, "ort", "auto", "cpu")
