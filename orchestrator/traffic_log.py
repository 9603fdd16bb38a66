"""Durable traffic log: one row per request (SQLite in WAL mode, at a configurable path) plus user feedback.

`write()` only enqueues, so logging never blocks a token stream; one writer thread inserts in batches, keyed
by request id: a provisional row (complete=0) when generation starts, replaced once by the final row.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Parameter names that could carry credentials; never persisted even if a future schema passes them on.
_SECRET_WORDS = ("api_key", "apikey", "authorization", "secret", "password", "bearer")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id      TEXT PRIMARY KEY,
    created         REAL NOT NULL,
    endpoint        TEXT NOT NULL,
    model           TEXT NOT NULL,
    params          TEXT NOT NULL,   -- JSON object
    prompt_ids      TEXT NOT NULL,   -- JSON list[int]
    prompt_text     TEXT NOT NULL,
    output_ids      TEXT NOT NULL,   -- JSON list[int]
    output_text     TEXT NOT NULL,
    routing_experts TEXT NOT NULL,   -- JSON list[list[str]], per output token
    routing_weights TEXT NOT NULL,   -- JSON list[list[float]], per output token
    gate_entropy    TEXT NOT NULL,   -- JSON list[float], per output token (nats)
    logprobs        TEXT NOT NULL,   -- JSON list[float], log p(token) per output token
    gate_version    TEXT NOT NULL,
    ttft_s          REAL,
    duration_s      REAL,
    finish_reason   TEXT,
    error           TEXT,
    status          INTEGER NOT NULL,
    complete        INTEGER NOT NULL  -- 0: provisional (generation started; the process stopped before it ended)
);
CREATE INDEX IF NOT EXISTS requests_created ON requests (created);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id     TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL,
    created         REAL NOT NULL,
    rating          INTEGER NOT NULL,   -- 1 good, 0 neutral, -1 bad
    corrected_text  TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_JSON_COLUMNS = ("params", "prompt_ids", "output_ids", "routing_experts", "routing_weights", "gate_entropy",
                 "logprobs")


@dataclass(frozen=True)
class TrafficRecord:
    """Everything about one served (or rejected) request that retraining and auditing need."""

    request_id: str
    created: float                       # unix seconds when the request arrived
    endpoint: str                        # "completions" | "chat.completions"
    model: str                           # "ensemble", an expert name, or what the client asked for
    params: dict                         # validated sampling parameters; never headers or keys
    prompt_ids: tuple[int, ...] = ()
    prompt_text: str = ""
    output_ids: tuple[int, ...] = ()
    output_text: str = ""
    routing_experts: tuple[tuple[str, ...], ...] = ()
    routing_weights: tuple[tuple[float, ...], ...] = ()
    gate_entropy: tuple[float, ...] = ()
    logprobs: tuple[float, ...] = ()
    gate_version: str = ""
    ttft_s: float | None = None
    duration_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int = 200
    # False for the provisional row written when generation starts: if the process is killed before the
    # request ends (e.g. a shutdown deadline), the request is still on record, marked incomplete.
    complete: bool = True


@dataclass(frozen=True)
class FeedbackRecord:
    feedback_id: str
    request_id: str
    created: float
    rating: int
    corrected_text: str | None = None


COLUMNS = tuple(f.name for f in fields(TrafficRecord))
_UPDATE_ALL = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "request_id")
FEEDBACK_COLUMNS = tuple(f.name for f in fields(FeedbackRecord))


def scrub(params: dict) -> dict:
    return {k: v for k, v in params.items() if not any(w in k.lower() for w in _SECRET_WORDS)}


def _row(record: TrafficRecord) -> tuple:
    d = asdict(record)
    d["params"] = scrub(d["params"])
    return tuple(json.dumps(d[c], separators=(",", ":")) if c in _JSON_COLUMNS else d[c] for c in COLUMNS)


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=30)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only an OS crash can drop the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        if "complete" not in have:            # logs written before provisional rows existed: all were final
            conn.execute("ALTER TABLE requests ADD COLUMN complete INTEGER NOT NULL DEFAULT 1")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.commit()
    return conn


class TrafficLog:
    """Queue + one writer thread in front of the SQLite file; safe to call from an event loop."""

    _STOP = object()

    def __init__(self, path: str | Path, *, batch_size: int = 256) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.written = 0          # rows inserted (duplicates ignored)
        self.failed = 0           # rows that could not be written after retries
        connect(self.path).close()                      # fail fast on a bad path, create the schema
        self._thread = threading.Thread(target=self._run, name="traffic-log-writer", daemon=True)
        self._thread.start()

    # ---- producers (event loop side): never block ----------------------------------------------------

    def write(self, record: TrafficRecord) -> None:
        if self._closed:
            logger.warning("traffic log closed; dropping late record %s", record.request_id)
            return
        self._queue.put(record)

    def add_feedback(self, request_id: str, rating: int, corrected_text: str | None = None) -> FeedbackRecord:
        fb = FeedbackRecord(f"fb-{uuid.uuid4().hex}", request_id, time.time(), rating, corrected_text)
        self._queue.put(fb)
        return fb

    @property
    def healthy(self) -> bool:
        return self._closed or self._thread.is_alive()

    # ---- blocking calls (run them in a thread from async code) -----------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is committed."""
        if self._closed:
            return not self._thread.is_alive()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def has_request(self, request_id: str) -> bool:
        with closing(connect(self.path, readonly=True)) as conn:
            return conn.execute("SELECT 1 FROM requests WHERE request_id = ?", (request_id,)).fetchone() is not None

    def close(self, timeout: float = 60.0) -> None:
        """Drain the queue, commit, stop the writer. Idempotent."""
        if not self._closed:
            self._closed = True
            self._queue.put(self._STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("traffic log writer did not finish within %.0fs", timeout)

    # ---- writer thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        conn = connect(self.path)
        try:
            while True:
                batch, markers, stop = [self._queue.get()], [], False
                while len(batch) < self.batch_size:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                items = []
                for item in batch:
                    if item is self._STOP:
                        stop = True
                    elif isinstance(item, threading.Event):
                        markers.append(item)
                    else:
                        items.append(item)
                self._insert(conn, items)
                for m in markers:
                    m.set()
                if stop:
                    break
        finally:
            conn.close()

    def _insert(self, conn: sqlite3.Connection, items: list) -> None:
        if not items:
            return
        records = [_row(r) for r in items if isinstance(r, TrafficRecord)]
        feedback = [tuple(asdict(f).values()) for f in items if isinstance(f, FeedbackRecord)]
        for attempt in range(5):
            try:
                with conn:   # one transaction per batch
                    before = conn.total_changes
                    # The first complete row wins; it replaces a provisional one, never another complete one.
                    conn.executemany(f"INSERT INTO requests ({', '.join(COLUMNS)}) "
                                     f"VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (request_id) DO UPDATE "
                                     f"SET {_UPDATE_ALL} WHERE requests.complete = 0 AND excluded.complete = 1",
                                     records)
                    self.written += conn.total_changes - before
                    conn.executemany(f"INSERT OR IGNORE INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) "
                                     f"VALUES ({', '.join('?' * len(FEEDBACK_COLUMNS))})", feedback)
                return
            except sqlite3.OperationalError as exc:     # e.g. locked by another replica's writer
                logger.warning("traffic log insert failed (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.2 * 2**attempt)
        self.failed += len(items)
        logger.error("traffic log dropped %d rows after retries", len(items))


# ---- readers -------------------------------------------------------------------------------------------


def _record_from_row(row: sqlite3.Row) -> TrafficRecord:
    d = dict(row)
    for c in _JSON_COLUMNS:
        d[c] = json.loads(d[c])
    d["routing_experts"] = tuple(tuple(x) for x in d["routing_experts"])
    d["routing_weights"] = tuple(tuple(x) for x in d["routing_weights"])
    for c in ("prompt_ids", "output_ids", "gate_entropy", "logprobs"):
        d[c] = tuple(d[c])
    d["complete"] = bool(d["complete"])
    return TrafficRecord(**d)


def iter_records(path: str | Path, *, since: float | None = None, until: float | None = None) -> Iterator[TrafficRecord]:
    """All logged requests in arrival order (optionally only those created in [since, until))."""
    with closing(connect(path, readonly=True)) as conn:
        conn.row_factory = sqlite3.Row
        where = [(c, v) for c, v in (("created >= ?", since), ("created < ?", until)) if v is not None]
        sql = f"SELECT {', '.join(COLUMNS)} FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(c for c, _ in where)
        for row in conn.execute(sql + " ORDER BY created, request_id", tuple(v for _, v in where)):
            yield _record_from_row(row)


def iter_feedback(path: str | Path) -> Iterator[FeedbackRecord]:
    with closing(connect(path, readonly=True)) as conn:
        conn.row_factory = sqlite3.Row
        for row in conn.execute(f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback ORDER BY created"):
            yield FeedbackRecord(**dict(row))
