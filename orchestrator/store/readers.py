"""Reading the traffic store back (retraining, export, audits): records in arrival order, and feedback.

Readers take a URL or a SQLite file path and never create or change anything; a store that does not exist
raises FileNotFoundError, one that cannot be reached raises StoreError.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from orchestrator.store.database import create_store_engine
from orchestrator.store.records import FeedbackRecord, TrafficRecord, feedback_from_row, record_from_row
from orchestrator.store.schema import feedback, requests
from orchestrator.store.url import StoreError, as_url, redact, sqlite_file

_STREAM_ROWS = 1_000      # rows fetched per round trip (a server-side cursor on PostgreSQL)


@contextmanager
def _connect(store: str | Path) -> Iterator[sa.Connection]:
    url = as_url(store)
    file = sqlite_file(url)
    if file is not None and not file.exists():
        raise FileNotFoundError(f"traffic log not found: {file}")
    engine = create_store_engine(url, readonly=file is not None)
    try:
        try:
            conn = engine.connect()
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot reach the traffic store {redact(url)}: {exc.orig}") from None
        with conn:
            if not sa.inspect(conn).has_table(requests.name):
                raise FileNotFoundError(f"traffic log not found: {redact(url)} has no `requests` table")
            yield conn
    finally:
        engine.dispose()


def _present(conn: sa.Connection, table: sa.Table) -> list[sa.Column]:
    # A log written by an older version lacks newer columns until a writer opens it: read what is there
    # (the record's defaults fill the rest) rather than change a file from a reader.
    have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    return [c for c in table.columns if c.name in have]


def traffic_log_exists(store: str | Path) -> bool:
    try:
        with _connect(store):
            return True
    except FileNotFoundError:
        return False


def iter_records(store: str | Path, *, since: float | None = None, until: float | None = None,
                 keys: Collection[str] | None = None) -> Iterator[TrafficRecord]:
    """All logged requests in arrival order (optionally only those created in [since, until), and only those
    made with the API keys named in `keys`)."""
    query = sa.select(requests)       # narrowed to the columns present once connected
    if since is not None:
        query = query.where(requests.c.created >= since)
    if until is not None:
        query = query.where(requests.c.created < until)
    if keys is not None:
        query = query.where(requests.c.key_name.in_(list(keys)))
    with _connect(store) as conn:
        columns = _present(conn, requests)
        if keys is not None and requests.c.key_name not in columns:
            return                    # a log older than keys: no request was made with any key
        query = query.with_only_columns(*columns).order_by(requests.c.created, requests.c.request_id)
        for row in conn.execution_options(yield_per=_STREAM_ROWS).execute(query).mappings():
            yield record_from_row(row)


def iter_feedback(store: str | Path) -> Iterator[FeedbackRecord]:
    with _connect(store) as conn:
        query = sa.select(*_present(conn, feedback)).order_by(feedback.c.created, feedback.c.feedback_id)
        for row in conn.execute(query).mappings():
            yield feedback_from_row(row)


def has_request(conn: sa.Connection, request_id: str) -> bool:
    found = conn.execute(sa.select(requests.c.request_id).where(requests.c.request_id == request_id)).first()
    return found is not None


def request_key_name(conn: sa.Connection, request_id: str) -> tuple[bool, str | None]:
    """-> (whether the request is on record, the name of the API key that made it; None if none did)."""
    found = conn.execute(sa.select(requests.c.key_name).where(requests.c.request_id == request_id)).first()
    return (False, None) if found is None else (True, found.key_name)
