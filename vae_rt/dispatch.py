"""Which of `auto`'s engines decodes each batch: the one tuned for its size, without thrashing between engines.

An engine's threads keep spinning on the cores for a while after its call returns (ONNX Runtime's for
about 30 ms), and a different engine started in that time shares the cores with them: on 2 cores an
OpenVINO call right after an ONNX Runtime one took twice as long, and an ONNX Runtime call right
after an OpenVINO one ten times as long (docs/benchmarks.md). When batch sizes change from call to
call, as under a server's dynamic batching, switching at every change costs far more than the
faster engine gains. So a call that follows another engine's within that time stays on it, for as
long as the time lost by staying, over an unbroken run of such calls, is less than what that switch
was measured to cost (`tuning.measure_switches`). A one-off call of another size stays; a much
slower engine is left at once; a long run switches once staying has cost as much as switching would
have (the ski-rental rule: never worse than twice the best choice in hindsight).
"""

from __future__ import annotations

import math

from vae_rt import tuning
from vae_rt.timing import SETTLE_SECONDS


class Dispatcher:
    """Chooses the engine (a label of the timings) for each call; `ran` is told when each call returned."""

    def __init__(self, tuned: tuning.Tuned):
        self.timings, self.switches = tuned.timings, tuned.switches
        self._winners = tuning.winners(tuned.timings) if tuned.timings else {}
        self._preferred: dict[int, tuple[str, int]] = {}  # batch size -> (its engine, its probe), worked out once per size
        self._last = ""  # the engine of the last call
        self._last_returned = -math.inf  # time.perf_counter() when it returned
        self._stay_cost = 0.0  # seconds lost in this run of calls that stayed on it instead of switching

    def preferred(self, rows: int) -> str:
        """The engine tuned for `rows` (`tuning.winners`), which takes the call unless another just ran."""
        return self._preferred_at(rows)[0]

    def _preferred_at(self, rows: int) -> tuple[str, int]:
        found = self._preferred.get(rows)
        if found is None:
            probe = tuning.nearest_probe(rows, list(self._winners))
            found = self._preferred[rows] = (self._winners[probe], probe)
        return found

    def choose(self, rows: int, now: float) -> str:
        """The engine for a call of `rows` latents starting at `now` (seconds, time.perf_counter())."""
        best, probe = self._preferred_at(rows)
        if best == self._last or now - self._last_returned >= SETTLE_SECONDS:  # no switch, or one into idle cores
            self._stay_cost = 0.0
            return best
        self._stay_cost += self.timings[self._last][probe] - self.timings[best][probe]
        if self._stay_cost < self.switches[self._last][best][probe]:
            return self._last
        self._stay_cost = 0.0
        return best

    def ran(self, label: str, returned: float) -> None:
        """Record that `label` decoded the last call, which returned at `returned` (time.perf_counter())."""
        self._last, self._last_returned = label, returned
