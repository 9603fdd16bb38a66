"""The bridge from a gateway replica's prometheus registry to Ray's metrics pipeline (orchestrator/ray_metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.ray_metrics import RayMetricsBridge, copy_samples


class Recorder:
    def __init__(self, kind: str, name: str, keys: tuple[str, ...]) -> None:
        self.kind, self.name, self.keys, self.calls = kind, name, keys, []

    def inc(self, value, tags):
        assert set(tags) == set(self.keys)
        self.calls.append(("inc", value, dict(tags)))

    def set(self, value, tags):
        assert set(tags) == set(self.keys)
        self.calls.append(("set", value, dict(tags)))


def registry():
    r = CollectorRegistry()
    c = Counter("ensemble_requests", "requests", ["status"], registry=r)
    g = Gauge("ensemble_in_flight", "in flight", registry=r)
    h = Histogram("ensemble_ttft_seconds", "ttft", buckets=(0.1, 1.0), registry=r)
    return r, c, g, h


def test_counters_are_sent_as_increments_only_once_gauges_as_values_histograms_as_sum_and_count() -> None:
    r, c, g, h = registry()
    c.labels(status="200").inc(3)
    g.set(5)
    h.observe(0.5)
    last: dict = {}
    first = {(u.kind, u.name, tuple(sorted(u.tags.items()))): u.value for u in copy_samples(r.collect(), last)}
    assert first[("counter", "ensemble_requests", (("status", "200"),))] == 3
    assert first[("gauge", "ensemble_in_flight", ())] == 5
    assert first[("counter", "ensemble_ttft_seconds_count", ())] == 1
    assert first[("counter", "ensemble_ttft_seconds_sum", ())] == 0.5
    c.labels(status="200").inc(2)
    again = [u for u in copy_samples(r.collect(), last) if u.kind == "counter"]
    assert [(u.name, u.value) for u in again] == [("ensemble_requests", 2)]      # only what changed


def test_the_bridge_tags_every_series_with_its_replica_and_reuses_one_ray_metric_per_series() -> None:
    r, c, _, _ = registry()
    made: dict = {}

    def factory(kind, name, keys):
        made[(kind, name, keys)] = Recorder(kind, name, keys)
        return made[(kind, name, keys)]

    bridge = RayMetricsBridge(r, "replica-a", factory=factory)
    c.labels(status="200").inc()
    bridge.push()
    c.labels(status="200").inc()
    bridge.push()
    requests = made[("counter", "ensemble_requests", ("replica", "status"))]
    assert requests.calls == [("inc", 1.0, {"status": "200", "replica": "replica-a"})] * 2
    assert made[("gauge", "ensemble_in_flight", ("replica",))].calls[-1] == ("set", 0.0, {"replica": "replica-a"})
