"""Seconds per phase of the per-token path, accumulated in-process and exported on /metrics.

`ensemble bench` reads `ensemble_phase_seconds_total{phase=...}` around a run and divides by the tokens
generated, so the next optimisation is chosen from numbers. Phases of one decode round (orchestrator/
decode_loop.py): round (all of it), gate, expert (waiting for the experts), rpc (that wait minus the
replicas' own time), mix, sample, emit; an admission round (new sequences' prefill, beside the main rounds)
counts the same phases as admit_<phase> and its total as admit. Per stream (orchestrator/service.py):
detokenize, sse, log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)
