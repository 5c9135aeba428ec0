"""`auto` on the CPU: several engines behind one backend, each batch decoded by the one measured fastest at its size
(or within 5 % of it, where that spares holding one engine more: `tuning.winners`).

A Sampler then holds more than one engine, but only through this backend: it opens the engines the
timing table names as winners (the rest are closed once measured) and keeps them open for its
lifetime. `Sampler.decode` chunks large inputs at its batch size, so in practice one or two engines
serve a sampler: one for its full batches and, maybe, another for a short last one. Which engine
takes each call is `vae_rt.dispatch`'s business: the one tuned for its size, unless another engine
ran a moment ago and still occupies the cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from vae_rt import tuning
from vae_rt.backends import BaseBackend, Latents, latent_rows, not_open
from vae_rt.dispatch import Dispatcher
from vae_rt.errors import EngineUnavailable, notice

log = logging.getLogger(__name__)

Factory = Callable[[str, str], BaseBackend]  # (backend, precision) -> an unopened backend


class AutoBackend(BaseBackend):
    """Dispatches each `decode` to an engine the tuning run (or its cache) chose for some batch size."""

    name = "auto"

    def __init__(self, engines: list[tuple[str, str]], make: Factory, model_sha256: str, z_dim: int):
        if not engines:
            raise ValueError("AutoBackend needs at least one engine")
        super().__init__("fp32", "cpu")
        precisions = {p for _, p in engines}
        self.precision = precisions.pop() if len(precisions) == 1 else "auto"  # informational: each engine checks its own
        self.z_dim = z_dim
        self.labels = {tuning.engine_label(b, p): (b, p) for b, p in engines}
        self._make = make
        self._key = tuning.tuning_key(model_sha256, list(self.labels))
        self.timings: tuning.Timings = {}
        self.why = ""
        self._open_engines: dict[str, BaseBackend] = {}
        self._dispatch = Dispatcher(tuning.Tuned({}, {}))
        self._only: BaseBackend | None = None  # the engine, when the tuning chose one for every batch size

    def describe(self) -> str:
        winners = list(tuning.winners(self.timings).values()) if self.timings else []
        return "auto on cpu: " + (", ".join(dict.fromkeys(winners)) or "not tuned yet")

    def _open(self) -> None:
        path = tuning.cache_path(self._key)
        tuned = tuning.load_tuning(path, self._key)
        source = f"cached in {path}"
        if tuned is None:
            tuned = self._measure()
            tuning.save_tuning(path, self._key, tuned)
            source = f"measured now, cached in {path}"
        self.timings = timings = tuned.timings
        self._dispatch = Dispatcher(tuned)
        winners = set(tuning.winners(timings).values())
        for label in list(self._open_engines):
            if label not in winners:
                self._open_engines.pop(label).close()
        for label in winners:  # opened now, so that no decode pays for it
            self._engine(label)
        self._only = self._engine(next(iter(winners))) if len(winners) == 1 else None
        left_out = sorted(set(self.labels) - set(timings))
        unavailable = f"; left out, unable to run here: {', '.join(left_out)}" if left_out else ""
        self.why = (f"per batch size, the fastest of {', '.join(sorted(timings))} ({source}): {tuning.explain(timings)}; "
                    f"a switch right after another engine ran cost {tuning.explain_switches(tuned.switches)}{unavailable}")

    def _measure(self) -> tuning.Tuned:
        """Time every engine that opens, then every switch between the winners. One this machine cannot run (EngineUnavailable) is left out, and said
        so; any other error (a full cache, MNIST missing) stops the run rather than be cached as a verdict."""
        notice.info("backend auto: timing %s on this machine (once; cached)", ", ".join(sorted(self.labels)))
        calls, refused = {}, []
        for label in self.labels:
            try:
                calls[label] = self._engine(label).decode
            except EngineUnavailable as why:
                refused.append(f"{label}: {why}")
                notice.info("backend auto: %s cannot run here, left out (%s)", label, why)
        if not calls:
            raise EngineUnavailable("backend auto: no CPU engine can run this model here: " + "; ".join(refused))
        timings = tuning.measure(calls, self.z_dim)
        return tuning.Tuned(timings, tuning.measure_switches(calls, timings, self.z_dim))

    def _engine(self, label: str) -> BaseBackend:
        if label not in self._open_engines:
            self._open_engines[label] = self._make(*self.labels[label]).open()
        return self._open_engines[label]

    def _close(self) -> None:
        for engine in self._open_engines.values():
            engine.close()
        self._open_engines = {}
        self._only = None

    def decode(self, z: torch.Tensor | Latents, out: torch.Tensor | None = None, check_inputs: bool = True) -> torch.Tensor:
        """As `BaseBackend.decode`; the chosen engine checks the latents (once) and decodes them."""
        if not self.is_open:
            raise not_open(self.name)
        if self._only is not None:  # one engine serves every batch size: nothing to choose, no clock to read
            return self._only.decode(z, out, check_inputs)
        label = self._dispatch.choose(latent_rows(z), time.perf_counter())
        images = self._engine(label).decode(z, out, check_inputs)
        self._dispatch.ran(label, time.perf_counter())
        return images

    def engines(self) -> list[BaseBackend]:
        """The engines it holds open: those the tuning chose for some batch size."""
        return list(self._open_engines.values())

    def engine_for(self, rows: int) -> str:
        """The label of the engine tuned for a batch of `rows`: the one that decodes it unless another just ran."""
        return self._dispatch.preferred(rows)
