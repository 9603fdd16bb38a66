"""One batch of traffic rows written in one transaction, idempotently, on either backend.

Requests upsert by id: the first final row (complete) replaces a provisional one and is never replaced
itself; feedback inserts once by its id. Replaying a batch (e.g. after an unacknowledged commit) changes nothing.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

from orchestrator.store.database import dialect_insert
from orchestrator.store.records import FeedbackRecord, TrafficRecord, to_row
from orchestrator.store.schema import feedback, requests


@functools.cache
def upsert_requests(dialect_name: str):
    ins = dialect_insert(dialect_name)(requests)
    return ins.on_conflict_do_update(
        index_elements=[requests.c.request_id],
        set_={c.name: ins.excluded[c.name] for c in requests.columns if c.name != "request_id"},
        where=sa.and_(requests.c.complete == sa.false(), ins.excluded.complete == sa.true()),
    )


@functools.cache
def insert_feedback(dialect_name: str):
    return dialect_insert(dialect_name)(feedback).on_conflict_do_nothing(index_elements=[feedback.c.feedback_id])


def write_batch(conn: sa.Connection, items: list[TrafficRecord | FeedbackRecord]) -> None:
    """Write `items` in order on `conn` (the caller owns the transaction)."""
    reqs = [to_row(i) for i in items if isinstance(i, TrafficRecord)]
    fbs = [to_row(i) for i in items if isinstance(i, FeedbackRecord)]
    # executemany runs the rows one statement each, in order, so a provisional row and its final row in one
    # batch end as the final row (a multi-row VALUES upsert could not touch one key twice on PostgreSQL).
    if reqs:
        conn.execute(upsert_requests(conn.dialect.name), reqs)
    if fbs:
        conn.execute(insert_feedback(conn.dialect.name), fbs)
