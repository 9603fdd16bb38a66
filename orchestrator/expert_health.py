"""What the gateway believes about each expert right now: ok, degraded or down. State only, no I/O.

An expert is `down` after a step found no replica able to answer (dead, unreachable or timed out, even after
re-opening the session elsewhere); the route phase then leaves it out. The engine probes a down expert
every `probe_interval_s` and marks it `ok` as soon as a replica answers (Serve has replaced or recovered it).
`degraded` means it answers but failed within the last `degraded_for_s` (e.g. a replica died and its
sessions migrated): usable, and said so in /health.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

OK, DEGRADED, DOWN = "ok", "degraded", "down"


@dataclass
class _State:
    down: bool = False
    last_failure: float = float("-inf")
    last_error: str = ""
    failures: int = 0


class ExpertHealth:
    def __init__(self, names: list[str], *, degraded_for_s: float = 30.0, probe_interval_s: float = 1.0,
                 clock=time.monotonic) -> None:
        self.names = list(names)
        self.degraded_for_s, self.probe_interval_s, self._clock = degraded_for_s, probe_interval_s, clock
        self._states = [_State() for _ in names]

    def available(self) -> torch.Tensor:
        """[E] bool: experts the route phase may select."""
        return torch.tensor([not s.down for s in self._states], dtype=torch.bool)

    def failed(self, expert: int, error: str) -> None:
        s = self._states[expert]
        s.down, s.last_failure, s.last_error = True, self._clock(), error
        s.failures += 1

    def still_down(self, expert: int, error: str) -> None:
        """A probe of a down expert failed: /health shows why now, without counting another failure."""
        s = self._states[expert]
        if s.down:
            s.last_failure, s.last_error = self._clock(), error

    def answered(self, expert: int) -> None:
        self._states[expert].down = False

    def down(self) -> list[int]:
        return [i for i, s in enumerate(self._states) if s.down]

    def state(self, expert: int) -> str:
        s = self._states[expert]
        if s.down:
            return DOWN
        return DEGRADED if self._clock() - s.last_failure < self.degraded_for_s else OK

    def report(self) -> dict:
        """The /health body's view: overall status and each expert's state (with its last error)."""
        experts = {}
        for i, name in enumerate(self.names):
            state = self.state(i)
            entry = {"state": state, "failures": self._states[i].failures}
            if state != OK:
                entry["last_error"] = self._states[i].last_error[:300]
            experts[name] = entry
        states = {e["state"] for e in experts.values()}
        overall = OK if states == {OK} else (DOWN if states == {DOWN} else DEGRADED)
        return {"status": overall, "experts": experts}
