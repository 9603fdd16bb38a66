"""Per-key limits in the shared store: two independent limiters (two replicas: own engines, own threads) on one
SQLite file, and on one PostgreSQL database, never grant more than one quota between them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.keys import Admitted, KeyStore, Limiter, Refusal
from orchestrator.keys.limits import WINDOW_S

NOW = 1_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request, tmp_path):
    """(the key store, two Limiters on their own engines over the same database)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        url = request.getfixturevalue("postgres_server").new_database()
    store = KeyStore(url)
    others = [KeyStore(url) for _ in range(2)]
    yield store, [Limiter(s.engine) for s in others]
    for s in (store, *others):
        s.close()


def race(limiters, key, n: int, now: float = NOW, prompt_tokens: int = 1) -> list:
    """n admits at once, alternating between the limiters, all at the same instant."""
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        return limiters[i % len(limiters)].admit(key, prompt_tokens, now)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_rpm_holds_across_replicas_under_a_race(replicas) -> None:
    store, limiters = replicas
    key, _ = store.add("a", rpm=10)
    results = race(limiters, key, 16)
    assert sum(isinstance(r, Admitted) for r in results) == 10
    refused = [r for r in results if isinstance(r, Refusal)]
    assert {r.limit for r in refused} == {"rpm"} and {r.retry_after_s for r in refused} == {6}   # 60/10 s


def test_rpm_refills_at_its_rate_and_retry_after_is_exact(replicas) -> None:
    store, (a, b) = replicas
    key, _ = store.add("a", rpm=6)
    assert all(isinstance((a if i % 2 else b).admit(key, 1, NOW), Admitted) for i in range(6))
    refused = a.admit(key, 1, NOW + 1)
    assert isinstance(refused, Refusal) and refused.retry_after_s == 9
    assert isinstance(b.admit(key, 1, NOW + 9.5), Refusal)           # a refused request is not charged
    assert isinstance(b.admit(key, 1, NOW + 10), Admitted)
    assert isinstance(a.admit(key, 1, NOW + 10), Refusal)
    # Long-run: one more every 10 s, never a burst beyond the bucket.
    assert sum(isinstance(a.admit(key, 1, NOW + 10 + t), Admitted) for t in range(1, 61)) == 6


def test_tpm_charges_prompts_up_front_and_completions_after(replicas) -> None:
    store, (a, b) = replicas
    key, _ = store.add("t", tpm=100)
    assert [isinstance(x.admit(key, 30, NOW), Admitted) for x in (a, b, a)] == [True] * 3     # 90 tokens
    r = b.admit(key, 30, NOW)
    assert isinstance(r, Refusal) and r.limit == "tpm" and r.retry_after_s == 12      # 20 tokens * 0.6 s
    a.add_tokens(key, 50, NOW)                         # completions: may overdraw (140 of 100)
    r = b.admit(key, 1, NOW)
    assert isinstance(r, Refusal) and r.retry_after_s == 25                           # 41 tokens * 0.6 s
    assert isinstance(b.admit(key, 1, NOW + 25), Admitted)
    too_big = a.admit(key, 101, NOW + 1000)
    assert isinstance(too_big, Refusal) and "larger than" in too_big.message and too_big.retry_after_s == WINDOW_S


def test_rpm_and_tpm_together_refuse_on_either(replicas) -> None:
    store, (a, b) = replicas
    key, _ = store.add("both", rpm=100, tpm=10)
    assert isinstance(a.admit(key, 10, NOW), Admitted)
    r = b.admit(key, 1, NOW)
    assert isinstance(r, Refusal) and r.limit == "tpm"


def test_streams_hold_across_replicas_and_free_on_release(replicas) -> None:
    store, limiters = replicas
    key, _ = store.add("s", max_streams=3)
    results = race(limiters, key, 8)
    leases = [r.lease for r in results if isinstance(r, Admitted)]
    assert len(leases) == 3 and len({x.slot for x in leases}) == 3
    assert all(r.limit == "max_streams" for r in results if isinstance(r, Refusal))
    limiters[1].release(leases[0])
    assert isinstance(limiters[0].admit(key, 1, NOW), Admitted)
    assert isinstance(limiters[1].admit(key, 1, NOW), Refusal)


def test_a_crashed_replicas_streams_lapse_unless_renewed(replicas) -> None:
    store, (a, b) = replicas
    key, _ = store.add("s", max_streams=1)
    held = a.admit(key, 1, NOW)
    assert isinstance(held, Admitted)
    a.renew([held.lease], NOW + 20)                    # the live holder pushes its expiry forward
    assert isinstance(b.admit(key, 1, NOW + a.lease_ttl_s + 1), Refusal)
    # ... and once it stops renewing (the replica died), the slot is taken over after the TTL.
    taken = b.admit(key, 1, NOW + 20 + a.lease_ttl_s + 0.1)
    assert isinstance(taken, Admitted)
    a.release(held.lease)                              # a late release by the old holder frees nothing
    assert isinstance(a.admit(key, 1, NOW + 20 + a.lease_ttl_s + 0.2), Refusal)


def test_a_refused_stream_does_not_charge_rpm(replicas) -> None:
    store, (a, b) = replicas
    key, _ = store.add("s", rpm=2, max_streams=1)
    assert isinstance(a.admit(key, 1, NOW), Admitted)
    assert isinstance(b.admit(key, 1, NOW), Refusal)               # no stream slot: rolled back
    assert isinstance(b.admit(key, 1, NOW + 1000), Admitted)       # (any slot lapsed by then)
