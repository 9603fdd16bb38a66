"""Prometheus metrics of one gateway replica, served at GET /metrics in the text exposition format.

Each GatewayMetrics owns its own CollectorRegistry (no process-global state), so replicas and tests never
collide; per-expert token share = ensemble_expert_token_weight_total / ensemble_completion_tokens_total.
"""

from __future__ import annotations

import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from experts.thread_priority import relay_policy_of
from orchestrator.types import TokenEvent

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_ENTROPY_BUCKETS = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 2.0, 2.5, 3.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("ensemble_requests", "HTTP requests by endpoint, model and status code",
                                ["endpoint", "model", "status"], registry=r)
        self.in_flight = Gauge("ensemble_requests_in_flight", "requests being served now", registry=r)
        self.prompt_tokens = Counter("ensemble_prompt_tokens", "prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("ensemble_completion_tokens", "generated tokens", ["model"], registry=r)
        self.expert_tokens = Counter("ensemble_expert_tokens", "generated tokens each expert took part in",
                                     ["expert"], registry=r)
        self.expert_weight = Counter("ensemble_expert_token_weight",
                                     "sum of each expert's mixing weight over generated tokens", ["expert"],
                                     registry=r)
        self.gate_entropy = Histogram("ensemble_gate_entropy_nats", "entropy of the gate softmax per token",
                                      buckets=_ENTROPY_BUCKETS, registry=r)
        self.ttft = Histogram("ensemble_time_to_first_token_seconds", "request arrival to first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ensemble_inter_token_latency_seconds", "time between consecutive tokens",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram("ensemble_request_duration_seconds", "request arrival to last byte",
                                  ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.gate_info = Gauge("ensemble_gate_info", "1 for the live gate version", ["version"], registry=r)
        self.log_failed = Gauge("ensemble_traffic_log_failed_rows", "rows the traffic log could not write",
                                registry=r)
        # Read when collected, on the thread that collects: the event loop that serves /metrics and runs the copy
        # into Ray's pipeline (orchestrator/ray_metrics.py), which is the loop that relays the tokens.
        Gauge("ensemble_relay_realtime", "1 when the event loop that serves this replica (and relays its tokens) "
              "runs at real-time priority (experts/thread_priority.py)", registry=r).set_function(
            lambda: float(relay_policy_of(threading.get_native_id()) == "realtime"))
        self.admission_queued = Gauge("ensemble_admission_queued", "requests waiting for an admission slot",
                                      registry=r)
        self.admission_rejected = Counter("ensemble_admission_rejected", "requests refused with 429: no slot "
                                          "within the queue timeout, or the queue was full", registry=r)
        self.degraded_tokens = Counter("ensemble_degraded_tokens", "generated tokens routed around an expert "
                                       "that could not answer (dead, hung or at capacity)", ["model"], registry=r)
        # ensemble_expert_token_share is computed from these at scrape time (_ShareCollector), not per token.
        self._ensemble_weight: dict[str, float] = {}
        self._ensemble_tokens = 0
        r.register(_ShareCollector(self))
        # Labelled children by label value: labels() takes a lock and builds a key on every call, ~10 calls per
        # token (GatewayMetrics.token cost 20.5 us a top-2 token that way).
        self._by_model: dict[str, tuple] = {}
        self._by_expert: dict[str, tuple] = {}

    def set_gate(self, version: str) -> None:
        self.gate_info.clear()
        self.gate_info.labels(version=version).set(1)

    def request_done(self, endpoint: str, model: str, status: int, duration_s: float) -> None:
        self.requests.labels(endpoint=endpoint, model=model, status=str(status)).inc()
        self.duration.labels(endpoint=endpoint).observe(duration_s)

    def token(self, model: str, ev: TokenEvent, since_previous_s: float, first: bool) -> None:
        """One generated token; `since_previous_s` is from request arrival for the first token."""
        ttft, itl, completion = self._by_model.get(model) or self._model_children(model)
        (ttft if first else itl).observe(since_previous_s)
        completion.inc()
        if ev.routing.degraded:
            self.degraded_tokens.labels(model=model).inc()        # rare: its series appears on first use
        ensemble = model == "ensemble"
        if ensemble:
            self.gate_entropy.observe(ev.routing.entropy)
            self._ensemble_tokens += 1
        for name, w in zip(ev.routing.experts, ev.routing.weights):
            tokens, weight = self._by_expert.get(name) or self._expert_children(name)
            tokens.inc()
            weight.inc(w)
            if ensemble:
                self._ensemble_weight[name] = self._ensemble_weight.get(name, 0.0) + w

    def _model_children(self, model: str) -> tuple:
        children = self._by_model[model] = (self.ttft.labels(model=model), self.itl.labels(model=model),
                                            self.completion_tokens.labels(model=model))
        return children

    def _expert_children(self, name: str) -> tuple:
        children = self._by_expert[name] = (self.expert_tokens.labels(expert=name),
                                            self.expert_weight.labels(expert=name))
        return children

    def attach_engine(self, engine) -> None:
        """Export what the engine knows of the experts' replicas: sessions per replica, migrations."""
        self.registry.register(_EngineCollector(engine))

    def attach_phases(self, clock) -> None:
        """Export a PhaseClock (orchestrator/profile.py) as ensemble_phase_seconds_total{phase}."""
        self.registry.register(_PhaseCollector(clock))

    def attach_store(self, store) -> None:
        """Export a traffic store's writer counters (orchestrator/store/writer.py: TrafficLog.stats), read at
        scrape time; ensemble_traffic_log_failed_rows becomes its dropped rows."""
        self.log_failed.set_function(lambda: store.stats().dropped)
        self.registry.register(_StoreCollector(store))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ShareCollector:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        family = GaugeMetricFamily("ensemble_expert_token_share",
                                   "expert's share of all generated ensemble tokens since start (weight-based)",
                                   labels=["expert"])
        m = self.metrics
        for name, w in sorted(m._ensemble_weight.items()):
            family.add_metric([name], w / m._ensemble_tokens)
        yield family


class _PhaseCollector:
    def __init__(self, clock) -> None:
        self.clock = clock

    def collect(self):
        family = CounterMetricFamily("ensemble_phase_seconds", "seconds spent per phase of the per-token path",
                                     labels=["phase"])
        for phase, seconds in sorted(self.clock.seconds.items()):
            family.add_metric([phase], seconds)
        yield family


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        sessions = GaugeMetricFamily("ensemble_expert_sessions", "decode sessions this gateway replica holds, per "
                                     "expert replica (experts export their own totals as "
                                     "ensemble_expert_open_sessions through Ray's metrics)",
                                     labels=["expert", "replica"])
        for expert, replicas in sorted(self.engine.sessions_by_replica().items()):
            for replica, n in sorted(replicas.items()):
                sessions.add_metric([expert, replica], n)
        yield sessions
        routable = GaugeMetricFamily("ensemble_expert_routable_replicas", "replicas of each expert that Serve "
                                     "routes to now, as this gateway replica's routers know; new decode sessions "
                                     "are placed only on those", labels=["expert"])
        for expert, n in sorted(self.engine.routable_replicas().items()):
            routable.add_metric([expert], n)
        yield routable
        quarantined = GaugeMetricFamily("ensemble_expert_quarantined_replicas", "replicas of each expert that "
                                        "answered unsoundly lately (experts/answer_checks.py): this gateway "
                                        "replica places no new session on them for a while", labels=["expert"])
        for expert, held in sorted(self.engine.quarantined_replicas().items()):
            quarantined.add_metric([expert], len(held))
        yield quarantined
        quarantines = CounterMetricFamily("ensemble_expert_quarantines", "replicas of each expert this gateway "
                                          "replica has put into quarantine (the gauge above forgets one Serve has "
                                          "replaced; this does not)", labels=["expert"])
        for expert, n in sorted(self.engine.quarantines().items()):
            quarantines.add_metric([expert], n)
        yield quarantines
        work = {unit: CounterMetricFamily(f"ensemble_expert_work_{unit}", f"{unit} the experts were asked to "
                                          "compute for lockstep sequences, by kind of call: prompt (a session "
                                          "opened with the prompt), join (opened when the gate first picks an "
                                          "expert mid-sequence: the whole context so far), advance (new tokens "
                                          "of an open session)", labels=["kind"])
                for unit in ("rows", "tokens")}
        for (kind, unit), n in sorted(self.engine.expert_work().items()):
            work[unit].add_metric([kind], n)
        yield from work.values()
        yield CounterMetricFamily("ensemble_session_migrations", "sessions re-opened on another replica of their "
                                  "expert (replaying the tokens so far) after theirs died or timed out",
                                  value=self.engine.migrations)
        yield CounterMetricFamily("ensemble_unsound_answers", "expert answers rejected as no next-token "
                                  "distribution (NaN or infinite logprobs, ids outside the vocabulary: e.g. a "
                                  "corrupt checkpoint) and treated as a failure of that expert",
                                  value=self.engine.unsound_answers)


class _StoreCollector:
    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        s = self.store.stats()
        yield CounterMetricFamily("ensemble_traffic_log_written_rows", "rows this replica committed to the store",
                                  value=s.written)
        yield GaugeMetricFamily("ensemble_traffic_log_buffered_rows",
                                "rows waiting in memory for the store's database (it is slow or down)",
                                value=s.buffered)
        yield CounterMetricFamily("ensemble_traffic_log_db_errors", "failed attempts to write to the store",
                                  value=s.db_errors)
        yield GaugeMetricFamily("ensemble_traffic_log_db_up", "1 if the last write to the store's database worked",
                                value=int(s.db_ok))
