"""The traffic log's write side: `write()` only appends to a bounded buffer, one thread commits it in batches.

While the database is down the rows stay buffered (up to `max_buffer_rows`; beyond that each row is counted
in `dropped` and logged) and the writer retries with backoff, so requests keep succeeding; `stats()` says how.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from orchestrator.store.database import create_store_engine
from orchestrator.store.readers import has_request, request_key_name
from orchestrator.store.records import FeedbackRecord, TrafficRecord
from orchestrator.store.schema import ensure_schema
from orchestrator.store.url import StoreError, as_url, backend, redact
from orchestrator.store.writes import write_batch

logger = logging.getLogger(__name__)

Item = TrafficRecord | FeedbackRecord
_LOG_EVERY_DROP = 10_000          # after the first dropped row, log again every this many


@dataclass(frozen=True)
class StoreStats:
    """The writer's counters, for /metrics and /health."""

    written: int           # rows committed by this writer (a repeated request id counts, but changes nothing)
    buffered: int          # rows waiting for the database now
    dropped: int           # rows that will never be written: buffer full, store closed, or rejected by the DB
    db_errors: int         # failed write attempts (each is retried unless the row itself was rejected)
    db_ok: bool            # the last attempt to reach the database succeeded


def _transient(exc: Exception) -> bool:
    """A database that is down, restarting or locked (retry the batch) rather than a row it rejects."""
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)) or bool(
        getattr(exc, "connection_invalidated", False))


class TrafficLog:
    """Bounded buffer + one writer thread in front of the store at `store` (a URL or a SQLite file path).

    Safe to call from an event loop: `write` and `add_feedback` never block; `flush`, `has_request` and
    `close` block, so async code runs them in a thread. Several instances (one per gateway replica, on any
    node) may share one database: rows are keyed by request id, so each request is stored exactly once.
    """

    def __init__(self, store: str | Path, *, batch_size: int = 256, max_buffer_rows: int = 100_000,
                 retry_min_s: float = 0.1, retry_max_s: float = 5.0) -> None:
        url = as_url(store)
        self.url = redact(url)
        self.batch_size, self.max_buffer_rows = batch_size, max_buffer_rows
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self._engine = create_store_engine(url)
        self._cond = threading.Condition()
        self._pending: deque[Item] = deque()
        self._enqueued = 0            # rows ever accepted into the buffer
        self._settled = 0             # rows that left it: committed, or dropped as rejected / at shutdown
        self._closing = False
        self._deadline = 0.0          # monotonic; when closing, give up on an unreachable database after it
        self._wake = threading.Event()
        self.written = self.dropped = self.db_errors = 0
        self.db_ok = True
        self._overflowing = False     # dropping for a full buffer since it last had room (log once per episode)
        self._schema_ready = False
        try:
            self._ensure_schema()
        except Exception as exc:
            if backend(url) == "sqlite":
                raise                 # a local file that cannot be created is a config error: fail fast
            self._failed(exc, "creating the schema")
        self._thread = threading.Thread(target=self._run, name="traffic-store-writer", daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        """Where rows go, for messages (the URL, password masked)."""
        return self.url

    # ---- producers (event loop side): never block on the database ------------------------------------

    def write(self, record: TrafficRecord) -> None:
        self._put(record)

    def add_feedback(self, request_id: str, rating: int, corrected_text: str | None = None) -> FeedbackRecord:
        fb = FeedbackRecord(f"fb-{uuid.uuid4().hex}", request_id, time.time(), rating, corrected_text)
        self._put(fb)
        return fb

    def _put(self, item: Item) -> None:
        with self._cond:
            if self._closing:
                self._drop(1, "the store is closed")
                return
            if len(self._pending) >= self.max_buffer_rows:
                self._drop(1, f"the buffer is full ({self.max_buffer_rows} rows waiting for {self.url})",
                           episode=not self._overflowing)
                self._overflowing = True
                return
            self._pending.append(item)
            self._enqueued += 1
            self._cond.notify_all()

    def _drop(self, n: int, why: str, *, episode: bool = True) -> None:
        """Count rows that will never be written, loudly: every new cause, then every _LOG_EVERY_DROP rows
        while a full buffer keeps dropping (the caller holds the lock)."""
        before, self.dropped = self.dropped, self.dropped + n
        if episode or before // _LOG_EVERY_DROP != self.dropped // _LOG_EVERY_DROP:
            logger.error("traffic store: %d row(s) dropped (%d in all): %s", n, self.dropped, why)
        self._cond.notify_all()

    # ---- state -------------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The writer runs (or was closed on purpose). Stays True while the database is merely down."""
        return self._closing or self._thread.is_alive()

    @property
    def failed(self) -> int:
        """Rows that will never be written (the traffic log's old name for `dropped`)."""
        return self.dropped

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def stats(self) -> StoreStats:
        with self._cond:
            return self._stats()

    def _stats(self) -> StoreStats:
        return StoreStats(self.written, len(self._pending), self.dropped, self.db_errors, self.db_ok)

    def wait(self, predicate: Callable[[StoreStats], bool], timeout: float) -> bool:
        """Block until `predicate(stats())` holds (checked at every change) -> whether it did in time."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._stats()), timeout)

    # ---- blocking calls (run them in a thread from async code) -----------------------------------------

    def flush(self, timeout: float = 30.0, *, wait_for_db: bool = False) -> bool:
        """Wait until every row accepted so far is settled (committed, or dropped and counted) -> True.
        While the database is down this returns False at once (the rows stay buffered), unless `wait_for_db`:
        then it waits for the database, up to `timeout`."""
        with self._cond:
            target, errors = self._enqueued, self.db_errors
            if not wait_for_db:
                if not self.db_ok:
                    return False
                self._cond.wait_for(lambda: self._settled >= target or self.db_errors > errors, timeout)
            else:
                self._cond.wait_for(lambda: self._settled >= target, timeout)
            return self._settled >= target

    def has_request(self, request_id: str) -> bool:
        """Whether a request is on record here: in the database (whichever replica wrote it) or in this
        buffer. If the database cannot be asked, say yes: the feedback row is buffered like any other and
        written when the database returns (retraining ignores feedback whose request never arrives)."""
        with self._cond:
            if any(isinstance(i, TrafficRecord) and i.request_id == request_id for i in self._pending):
                return True
        try:
            with self._engine.connect() as conn:
                return has_request(conn, request_id)
        except sa.exc.SQLAlchemyError as exc:
            if not _transient(exc):
                raise
            logger.warning("traffic store unreachable (%s); accepting feedback for %s unchecked",
                           type(exc).__name__, request_id)
            return True

    def request_owner(self, request_id: str) -> tuple[bool, str | None]:
        """-> (whether the request is on record, the name of the API key that made it), from this buffer or
        the database. Raises StoreError when the database cannot be asked (ownership cannot be checked)."""
        with self._cond:
            for i in self._pending:
                if isinstance(i, TrafficRecord) and i.request_id == request_id:
                    return True, i.key_name
        try:
            with self._engine.connect() as conn:
                return request_key_name(conn, request_id)
        except sa.exc.SQLAlchemyError as exc:
            if not _transient(exc):
                raise
            raise StoreError(f"traffic store {self.url} unreachable ({type(exc).__name__})") from None

    def close(self, timeout: float = 60.0) -> None:
        """Write what is buffered and stop the writer; an unreachable database gets `timeout` seconds to come
        back, after which the rows still buffered are counted as dropped. Idempotent."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
                self._cond.notify_all()
        self._wake.set()
        # One more attempt may start just before the deadline and wait its connect/lock timeout.
        self._thread.join(timeout + 40)
        if self._thread.is_alive():
            logger.error("traffic store writer did not finish within %.0fs", timeout)

    # ---- writer thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_min_s
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending or self._closing)
                    if not self._pending:
                        return                                   # closing, everything written
                    batch = list(itertools.islice(self._pending, self.batch_size))
                if self._write(batch):
                    delay = self.retry_min_s
                    continue
                if self._give_up_if_closing():
                    return
                self._sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        finally:
            self._engine.dispose()

    def _write(self, batch: list[Item]) -> bool:
        """Commit `batch` (the head of the buffer) and take it off the buffer -> False: the database is
        unusable now, retry later. A row the database itself rejects is dropped (counted), not retried."""
        try:
            # Any failure here (unreachable, no permission to create tables) is the database's, never a row's.
            self._ensure_schema()
        except Exception as exc:                                 # noqa: BLE001 - the thread must survive anything
            self._failed(exc, "creating the schema")
            return False
        try:
            with self._engine.begin() as conn:                   # one transaction per batch
                write_batch(conn, batch)
        except Exception as exc:                                 # noqa: BLE001
            if _transient(exc):
                self._failed(exc, f"writing {len(batch)} rows")
                return False
            return self._write_one_by_one(batch)                 # find the row the database rejects
        self._settle(len(batch), committed=True)
        return True

    def _write_one_by_one(self, batch: list[Item]) -> bool:
        for item in batch:
            try:
                with self._engine.begin() as conn:
                    write_batch(conn, [item])
            except Exception as exc:                             # noqa: BLE001
                if _transient(exc):
                    self._failed(exc, "writing a row")
                    return False
                with self._cond:
                    self.db_errors += 1
                    # The DBAPI error only: SQLAlchemy's own message would repeat the row (prompts) in the log.
                    self._drop(1, f"the database rejected {getattr(item, 'request_id', '?')}: "
                                  f"{getattr(exc, 'orig', exc)}")
                self._settle(1, committed=False)
            else:
                self._settle(1, committed=True)
        return True

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            ensure_schema(self._engine)
            self._schema_ready = True

    def _settle(self, n: int, *, committed: bool) -> None:
        with self._cond:
            for _ in range(n):
                self._pending.popleft()
            self._settled += n
            self._overflowing = False
            if committed:
                self.written += n
                if not self.db_ok:
                    logger.warning("traffic store %s is back; %d rows still buffered", self.url, len(self._pending))
                self.db_ok = True
            self._cond.notify_all()

    def _failed(self, exc: Exception, doing: str) -> None:
        with self._cond:
            self.db_errors += 1
            if self.db_ok:
                logger.error("traffic store %s failed while %s (%s: %s); buffering up to %d rows and retrying",
                             self.url, doing, type(exc).__name__, getattr(exc, "orig", exc), self.max_buffer_rows)
            self.db_ok = False
            self._schema_ready = False          # the database may come back empty (a new server): check again
            self._cond.notify_all()

    def _give_up_if_closing(self) -> bool:
        with self._cond:
            if not self._closing or time.monotonic() < self._deadline:
                return False
            n = len(self._pending)
            self._pending.clear()
            self._settled += n
            self._drop(n, f"the store {self.url} was still unreachable at shutdown")
            self._cond.notify_all()
            return True

    def _sleep(self, delay: float) -> None:
        if self._closing:                       # shutting down: retry until the deadline, never past it
            time.sleep(max(0.0, min(delay, self._deadline - time.monotonic())))
        else:
            self._wake.wait(delay)
