"""Per-key limits kept in the shared store, so every gateway replica draws on the same quota (blocking calls).

rpm and tpm are GCRA clocks (a token bucket of one minute's quota, refilled continuously), moved by one
conditional UPDATE ... RETURNING, which both SQLite (one writer) and PostgreSQL (row lock, WHERE re-checked)
apply atomically. Concurrent requests hold stream slots: lease rows with an expiry their replica renews.

How exact: a request is counted exactly once across replicas; a key gets at most `rpm` requests at once and
`rpm` per minute on average (any 60 s window: < 2 x rpm, as for every bucket of one minute's size). Prompt
tokens are charged at admission, completion tokens when the request ends, so tpm can be overdrawn by what the
key's requests in flight generate; the overdraft is then waited off before the key's next request.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from orchestrator.keys.records import ApiKey
from orchestrator.keys.tables import key_streams, key_usage
from orchestrator.store.database import dialect_insert

WINDOW_S = 60.0             # the limits are per minute: the bucket holds one minute of quota
LEASE_TTL_S = 30.0          # a stream slot whose holder stopped renewing (replica died) frees after this
_EPS = 1e-9


@dataclass(frozen=True)
class Lease:
    key_id: str
    slot: int
    holder: str


@dataclass(frozen=True)
class Refusal:
    """Over a limit: which one, and when a retry can succeed (seconds, rounded up, at least 1)."""

    limit: str              # "rpm" | "tpm" | "max_streams"
    retry_after_s: int
    message: str


@dataclass(frozen=True)
class Admitted:
    lease: Lease | None


def _later(column, now: float):
    return sa.case((column > now, column), else_=now)     # max(column, now), portable


class Limiter:
    def __init__(self, engine: sa.Engine, *, lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.engine, self.lease_ttl_s = engine, lease_ttl_s

    def admit(self, key: ApiKey, prompt_tokens: int, now: float | None = None) -> Admitted | Refusal:
        """Charge one request and its prompt tokens, and take a stream slot: all or nothing, one transaction."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:             # leaving without commit() rolls back
            # Each branch starts with a write, so SQLite takes its write lock first (no read-then-upgrade race).
            if key.rpm is not None or key.tpm is not None:
                refusal = self._charge(conn, key, prompt_tokens, now)
                if refusal is not None:
                    return refusal
            lease = None
            if key.max_streams is not None:
                lease = self._take_slot(conn, key, now)
                if isinstance(lease, Refusal):
                    return lease                         # not admitted: the request and tokens do not count
            conn.commit()
        return Admitted(lease)

    def _charge(self, conn: sa.Connection, key: ApiKey, prompt_tokens: int, now: float) -> Refusal | None:
        inc_r = WINDOW_S / key.rpm if key.rpm else 0.0
        inc_t = prompt_tokens * WINDOW_S / key.tpm if key.tpm else 0.0
        new_r = _later(key_usage.c.request_tat, now) + inc_r
        new_t = _later(key_usage.c.token_tat, now) + inc_t
        fits = sa.and_(new_r <= now + WINDOW_S + _EPS, new_t <= now + WINDOW_S + _EPS)
        update = (key_usage.update().where(key_usage.c.key_id == key.key_id, fits)
                  .values(request_tat=new_r, token_tat=new_t).returning(key_usage.c.key_id))
        refusal = None
        for _ in range(3):
            if conn.execute(update).first() is not None:
                return None
            row = conn.execute(sa.select(key_usage.c.request_tat, key_usage.c.token_tat)
                               .where(key_usage.c.key_id == key.key_id)).first()
            if row is None:                               # the key's first limited request anywhere
                ins = dialect_insert(conn.dialect.name)(key_usage).values(key_id=key.key_id, request_tat=0.0,
                                                                         token_tat=0.0)
                conn.execute(ins.on_conflict_do_nothing(index_elements=[key_usage.c.key_id]))
                continue
            refusal = _refusal(key, prompt_tokens, now, row.request_tat, row.token_tat, inc_r, inc_t)
            if refusal is not None:
                return refusal
            # PostgreSQL: the row was created by a concurrent first request after our UPDATE looked: again.
        return refusal or Refusal("rpm" if inc_r else "tpm", 1, "rate limit contention for this API key; retry")

    def _take_slot(self, conn: sa.Connection, key: ApiKey, now: float) -> Lease | Refusal:
        conn.execute(key_streams.delete().where(key_streams.c.key_id == key.key_id, key_streams.c.expires <= now))
        held = {s for (s,) in conn.execute(sa.select(key_streams.c.slot).where(key_streams.c.key_id == key.key_id))}
        holder = uuid.uuid4().hex
        for slot in (s for s in range(key.max_streams) if s not in held):
            ins = dialect_insert(conn.dialect.name)(key_streams).values(
                key_id=key.key_id, slot=slot, holder=holder, expires=now + self.lease_ttl_s)
            # The primary key (key_id, slot) makes taking a slot atomic on both backends; a lapsed one is taken over.
            taken = conn.execute(ins.on_conflict_do_update(
                index_elements=[key_streams.c.key_id, key_streams.c.slot],
                set_={"holder": ins.excluded.holder, "expires": ins.excluded.expires},
                where=key_streams.c.expires <= now).returning(key_streams.c.slot)).first()
            if taken is not None:
                return Lease(key.key_id, slot, holder)
        return Refusal("max_streams", 1, f"this API key already has {key.max_streams} requests in flight "
                                         f"(max_streams {key.max_streams}); retry when one has finished")

    def add_tokens(self, key: ApiKey, tokens: int, now: float | None = None) -> None:
        """Charge completion tokens after the fact (never refused: the overdraft delays the next request)."""
        if key.tpm is None or tokens <= 0:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(key_usage.update().where(key_usage.c.key_id == key.key_id)
                         .values(token_tat=_later(key_usage.c.token_tat, now) + tokens * WINDOW_S / key.tpm))

    def release(self, lease: Lease) -> None:
        with self.engine.begin() as conn:
            conn.execute(key_streams.delete().where(key_streams.c.key_id == lease.key_id,
                                                    key_streams.c.slot == lease.slot,
                                                    key_streams.c.holder == lease.holder))

    def renew(self, leases: list[Lease], now: float | None = None) -> None:
        """Push the expiry of every slot this replica holds (call well within lease_ttl_s)."""
        if not leases:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(key_streams.update().where(key_streams.c.holder.in_([x.holder for x in leases]))
                         .values(expires=now + self.lease_ttl_s))


def _refusal(key: ApiKey, prompt_tokens: int, now: float, request_tat: float, token_tat: float,
             inc_r: float, inc_t: float) -> Refusal | None:
    if inc_t > WINDOW_S:
        return Refusal("tpm", int(WINDOW_S), f"the prompt ({prompt_tokens} tokens) is larger than this API key's "
                                              f"tokens-per-minute limit ({key.tpm})")
    waits = {}
    if inc_r:
        waits["rpm"] = max(request_tat, now) + inc_r - now - WINDOW_S
    if inc_t:
        waits["tpm"] = max(token_tat, now) + inc_t - now - WINDOW_S
    limit = max(waits, key=waits.get)
    if waits[limit] <= _EPS:
        return None                                       # it fits after all (the row changed meanwhile)
    retry = max(1, math.ceil(waits[limit] - _EPS))
    quota = f"{key.rpm} requests" if limit == "rpm" else f"{key.tpm} tokens"
    return Refusal(limit, retry, f"rate limit reached for this API key: {quota} per minute ({limit}); "
                                 f"retry in {retry} s")
