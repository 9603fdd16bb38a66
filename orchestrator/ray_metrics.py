"""The gateway's metrics through Ray's metrics pipeline, so one Prometheus sees every replica on every node.

Each gateway replica keeps its own prometheus_client registry (orchestrator/metrics.py, served at its
/metrics). This bridge copies that registry into `ray.util.metrics` every few seconds: counters as counters
(by increment), gauges as gauges, histograms as their `_sum` and `_count` counters. Every series gets a
`replica` tag. Ray's per-node metrics agent then exports them (Prometheus names get Ray's `ray_` prefix), and
one scrape of the cluster's agents, or Ray's Grafana dashboards, covers every gateway replica.

`copy_samples` is the pure part: registry samples + what was sent last time -> what to send now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Update:
    kind: str                      # "counter" (inc by value) or "gauge" (set to value)
    name: str                      # Ray metric name
    tags: dict[str, str]
    value: float


def copy_samples(families: Iterable[Any], last: dict[Key, float]) -> list[Update]:
    """Updates that bring Ray's copy in line with `families` (prometheus_client Metric objects); `last`
    (cumulative values sent so far, per series) is updated in place."""
    updates: list[Update] = []
    for family in families:
        for sample in family.samples:
            tags = dict(sample.labels)
            if family.type == "counter" and sample.name.endswith("_total"):
                kind, name = "counter", sample.name.removesuffix("_total")
            elif family.type == "histogram" and sample.name.endswith(("_sum", "_count")):
                kind, name = "counter", sample.name
            elif family.type == "gauge":
                kind, name = "gauge", sample.name
            else:
                continue                           # _created timestamps, histogram buckets
            if kind == "gauge":
                updates.append(Update(kind, name, tags, float(sample.value)))
                continue
            key = (name, tuple(sorted(tags.items())))
            delta = float(sample.value) - last.get(key, 0.0)
            if delta > 0:
                updates.append(Update(kind, name, tags, delta))
                last[key] = float(sample.value)
    return updates


class RayMetricsBridge:
    def __init__(self, registry: Any, replica: str, *, interval_s: float = 5.0,
                 factory: Callable[[str, str, tuple[str, ...]], Any] | None = None) -> None:
        self.registry, self.replica, self.interval_s = registry, replica, interval_s
        self._factory = factory or _ray_metric
        self._metrics: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        self._last: dict[Key, float] = {}
        self._task: asyncio.Task | None = None

    def push(self) -> int:
        """Send what changed since the last push -> number of updates."""
        updates = copy_samples(self.registry.collect(), self._last)
        for u in updates:
            tags = {**u.tags, "replica": self.replica}
            keys = tuple(sorted(tags))
            metric = self._metrics.get((u.kind, u.name, keys))
            if metric is None:
                metric = self._metrics[(u.kind, u.name, keys)] = self._factory(u.kind, u.name, keys)
            if u.kind == "counter":
                metric.inc(u.value, tags=tags)
            else:
                metric.set(u.value, tags=tags)
        return len(updates)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ray-metrics-bridge")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                self.push()
            except Exception:
                log.exception("copying metrics to Ray failed")
            await asyncio.sleep(self.interval_s)


def _ray_metric(kind: str, name: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Counter, Gauge

    cls = Counter if kind == "counter" else Gauge
    return cls(name, description=f"{name} (gateway replica metric, see orchestrator/metrics.py)", tag_keys=tag_keys)
