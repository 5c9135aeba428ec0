"""`auto`'s per-call choice: the fastest engine at each size, a switch put off while another engine's threads spin."""

from vae_rt.dispatch import Dispatcher
from vae_rt.timing import SETTLE_SECONDS
from vae_rt.tuning import Tuned

TIMINGS = {  # seconds per call at each probe: ort wins small batches, openvino large ones
    "ort fp32": {1: 20e-6, 32: 90e-6, 2048: 4.0e-3},
    "openvino fp32": {1: 60e-6, 32: 120e-6, 2048: 3.0e-3},
}
SWITCHES = {  # what a call of the second engine took beyond its own time right after the first's
    "openvino fp32": {"ort fp32": {1: 190e-6, 32: 190e-6}},
    "ort fp32": {"openvino fp32": {2048: 2.5e-3}},
}
QUIET = 2 * SETTLE_SECONDS  # long enough for any engine's threads to have stopped spinning


def dispatcher(timings=TIMINGS, switches=SWITCHES) -> Dispatcher:
    return Dispatcher(Tuned(timings, switches))


def run(dispatch: Dispatcher, rows: int, now: float, seconds: float = 0.0) -> str:
    """Choose an engine for a call at `now`, and report it returned `seconds` later."""
    label = dispatch.choose(rows, now)
    dispatch.ran(label, now + seconds)
    return label


def run_all(dispatch: Dispatcher, sizes: list[int]) -> list[str]:
    """Calls 1 ms apart: each starts while the engine before it still spins."""
    return [run(dispatch, rows, 0.001 * i) for i, rows in enumerate(sizes)]


def test_after_a_pause_each_size_goes_to_its_fastest_engine():
    dispatch, now = dispatcher(), 0.0
    for rows, expected in [(1, "ort fp32"), (2048, "openvino fp32"), (7, "ort fp32"), (5000, "openvino fp32")]:
        now += QUIET
        assert run(dispatch, rows, now) == expected
        assert dispatch.preferred(rows) == expected


def test_one_off_calls_of_another_size_stay_on_the_engine_that_just_ran():
    # ort loses 1 ms per batch of 2048 and a switch costs 2.5 ms; each stay is a run of one
    assert run_all(dispatcher(), [1, 2048, 5, 2048, 1000, 1, 2048, 1, 2048]) == ["ort fp32"] * 9


def test_a_run_switches_once_staying_has_lost_what_the_switch_costs():
    # each batch of 2048 on ort loses 1 ms against a 2.5 ms switch: stay twice, switch on the third
    assert run_all(dispatcher(), [1] + [2048] * 5) == ["ort fp32"] * 3 + ["openvino fp32"] * 3
    # openvino loses 40 us per batch of 1 against a 190 us switch into ort: stay four times, switch on the fifth
    assert run_all(dispatcher(), [2048] + [1] * 6) == ["openvino fp32"] * 5 + ["ort fp32"] * 2


def test_a_much_slower_engine_is_left_at_once():
    timings = {"a": {1: 10e-6, 2048: 9.0e-3}, "b": {1: 80e-6, 2048: 3.0e-3}}
    switches = {"a": {"b": {2048: 3.0e-3}}, "b": {"a": {1: 50e-6}}}
    assert run_all(dispatcher(timings, switches), [1, 2048, 1]) == ["a", "b", "a"]  # 6 ms and 70 us lost: above each switch


def test_a_pause_frees_the_choice_again():
    dispatch = dispatcher()
    assert run(dispatch, 1, 0.0) == "ort fp32"
    assert run(dispatch, 2048, 0.001) == "ort fp32"
    assert run(dispatch, 2048, 0.001 + QUIET) == "openvino fp32"  # ort's threads are idle by now: switching is free


def test_the_spin_starts_when_a_call_returned_not_when_it_began():
    dispatch = dispatcher()
    assert run(dispatch, 1, 0.0, seconds=1.0) == "ort fp32"  # a long call: its threads spin after it returned
    assert run(dispatch, 2048, 1.0 + SETTLE_SECONDS / 2) == "ort fp32"
    assert run(dispatch, 2048, 10.0) == "openvino fp32"
