"""deploy.replica_load.LoadSampler: peak and mean open sessions per expert replica over samples."""

from __future__ import annotations

import threading

from deploy.replica_load import LoadSampler


def test_peak_and_mean_per_replica_over_every_sample() -> None:
    samples = [{"code": {"r1": 4, "r2": 2}}, {"code": {"r1": 8, "r2": 0}}, {"code": {"r1": 6, "r2": 4}}]
    taken = threading.Event()
    calls = []

    def sample():
        calls.append(1)
        if len(calls) == len(samples):
            taken.set()
        return samples[min(len(calls), len(samples)) - 1]

    sampler = LoadSampler("app", ["code"], period_s=0.01, sample=sample).start()
    assert taken.wait(10)
    report = sampler.stop()
    n = len(calls)          # the thread may take one more sample (the last again) before it sees stop
    r1 = [4, 8, 6] + [6] * (n - 3)
    r2 = [2, 0, 4] + [4] * (n - 3)
    assert report == {"code": {"r1": {"peak": 8, "mean": round(sum(r1) / n, 1)},
                               "r2": {"peak": 4, "mean": round(sum(r2) / n, 1)}}}


def test_a_failing_sample_is_reported_not_raised() -> None:
    failed = threading.Event()

    def sample():
        failed.set()
        raise ConnectionError("controller gone")

    sampler = LoadSampler("app", ["code"], period_s=0.01, sample=sample).start()
    assert failed.wait(10)
    assert sampler.stop() == {}
    assert sampler.error == "ConnectionError: controller gone"
