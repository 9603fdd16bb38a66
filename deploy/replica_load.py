"""Open sessions and generations on every expert replica of a running application, asked of each replica.

`ensemble soak` samples this while its clients run, to report how the load spreads over expert replicas
(the session-affine router places new sessions by load; a session's steps stay where its KV cache is).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from experts.protocol import ReplicaStats


def replica_stats(app: str, experts: list[str]) -> dict[str, dict[str, ReplicaStats]]:
    """expert -> {replica id: its ReplicaStats} for every RUNNING replica, each asked of that replica itself
    (calls pinned with `replica=`; needs ray.init)."""
    from ray import serve

    from deploy.replicas import replicas

    out: dict[str, dict[str, ReplicaStats]] = {}
    for name in experts:
        handle = serve.get_deployment_handle(f"expert-{name}", app)
        out[name] = {r.replica_id: handle.stats.remote(replica=r.replica_id).result(timeout_s=30)
                     for r in replicas(app, f"expert-{name}")}
    return out


def replica_load(app: str, experts: list[str]) -> dict[str, dict[str, int]]:
    """expert -> {replica id: open sessions + generations} for every RUNNING replica (needs ray.init)."""
    return {name: {rid: st.open_sessions + st.generations for rid, st in reps.items()}
            for name, reps in replica_stats(app, experts).items()}


@dataclass
class LoadSampler:
    """Samples replica_load every `period_s` in a thread; keeps the peak and the mean per replica."""

    app: str
    experts: list[str]
    period_s: float = 2.0
    sample: Callable[[], dict[str, dict[str, int]]] | None = None     # default: replica_load(app, experts)
    peak: dict[str, dict[str, int]] = field(default_factory=dict)
    _sums: dict[tuple[str, str], float] = field(default_factory=dict)
    _n: dict[tuple[str, str], int] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-load", daemon=True)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> dict:
        """-> {expert: {replica: {"peak": n, "mean": x}}}."""
        self._stop.set()
        self._thread.join(60)
        return {e: {r: {"peak": p, "mean": round(self._sums[(e, r)] / self._n[(e, r)], 1)}
                    for r, p in reps.items()} for e, reps in self.peak.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                load = self.sample() if self.sample else replica_load(self.app, self.experts)
                for expert, reps in load.items():
                    for rid, n in reps.items():
                        self.peak.setdefault(expert, {})[rid] = max(n, self.peak.get(expert, {}).get(rid, 0))
                        self._sums[(expert, rid)] = self._sums.get((expert, rid), 0.0) + n
                        self._n[(expert, rid)] = self._n.get((expert, rid), 0) + 1
            except Exception as exc:  # noqa: BLE001 - reported, the soak itself goes on
                self.error = f"{type(exc).__name__}: {exc}"
