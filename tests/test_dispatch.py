"""`auto`'s per-call choice: the fastest engine at each size, a switch put off while another engine's threads spin."""

from vae_rt.dispatch import Dispatcher
from vae_rt.timing import SETTLE_SECONDS

TIMINGS = {  # seconds per call at each probe: ort wins small batches, openvino large ones
    "ort fp32": {1: 20e-6, 32: 90e-6, 2048: 4.0e-3},
    "openvino fp32": {1: 60e-6, 32: 120e-6, 2048: 3.0e-3},
}
QUIET = 2 * SETTLE_SECONDS  # long enough for any engine's threads to have stopped spinning


def run(dispatch: Dispatcher, rows: int, now: float, seconds: float = 0.0) -> str:
    """Choose an engine for a call at `now`, and report it returned `seconds` later."""
    label = dispatch.choose(rows, now)
    dispatch.ran(label, now + seconds)
    return label


def test_after_a_pause_each_size_goes_to_its_fastest_engine():
    dispatch, now = Dispatcher(TIMINGS), 0.0
    for rows, expected in [(1, "ort fp32"), (2048, "openvino fp32"), (7, "ort fp32"), (5000, "openvino fp32")]:
        now += QUIET
        assert run(dispatch, rows, now) == expected
        assert dispatch.fastest(rows) == expected


def test_one_off_calls_of_another_size_stay_on_the_engine_that_just_ran_unless_it_is_over_twice_as_slow():
    dispatch = Dispatcher(TIMINGS)
    sizes = [1, 2048, 5, 2048, 1000, 1]
    assert [run(dispatch, rows, 0.001 * i) for i, rows in enumerate(sizes)] == ["ort fp32"] * 6  # at most 1.33x slower
    dispatch = Dispatcher(TIMINGS)
    # openvino first; at batch 1 it is 3x slower than ort: switch, then stay on ort (1.33x at 2048)
    assert [run(dispatch, rows, 0.001 * i) for i, rows in enumerate([2048, 1, 2048])] == ["openvino fp32", "ort fp32", "ort fp32"]


def test_a_long_run_switches_once_staying_has_cost_as_much_as_a_switch():
    dispatch = Dispatcher(TIMINGS)
    assert run(dispatch, 1, 0.0) == "ort fp32"
    # each batch of 2048 on ort loses 1 ms to openvino's 3 ms call: stay twice (2 ms lost), switch on the third
    assert [run(dispatch, 2048, 0.001 * i) for i in range(1, 6)] == ["ort fp32"] * 2 + ["openvino fp32"] * 3
    dispatch = Dispatcher(TIMINGS)
    sizes = [1, 2048, 1, 2048, 1, 2048, 1, 2048]  # alternating: each stay is a run of one, 1 ms lost each time
    assert [run(dispatch, rows, 0.001 * i) for i, rows in enumerate(sizes)] == ["ort fp32"] * 8


def test_a_pause_frees_the_choice_again():
    dispatch = Dispatcher(TIMINGS)
    assert run(dispatch, 1, 0.0) == "ort fp32"
    assert run(dispatch, 2048, 0.001) == "ort fp32"
    assert run(dispatch, 2048, 0.001 + QUIET) == "openvino fp32"  # ort's threads are idle by now: switching is free


def test_the_spin_starts_when_a_call_returned_not_when_it_began():
    dispatch = Dispatcher(TIMINGS)
    assert run(dispatch, 1, 0.0, seconds=1.0) == "ort fp32"  # a long call: its threads spin after it returned
    assert run(dispatch, 2048, 1.0 + SETTLE_SECONDS / 2) == "ort fp32"
    assert run(dispatch, 2048, 10.0) == "openvino fp32"
