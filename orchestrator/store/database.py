"""SQLAlchemy engines for the store: SQLite in WAL mode for one machine, PostgreSQL (psycopg 3) for clusters.

WAL needs memory shared by every process on the file, so a SQLite store must not sit on a network filesystem;
`create_store_engine` is the one place that knows such backend quirks, everything above it is portable Core.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from orchestrator.store.url import backend, sqlite_file

# Seconds a connection attempt may take before the writer counts the database as down and backs off.
PG_CONNECT_TIMEOUT_S = 5
# Seconds a SQLite writer waits for another process's write lock (replicas share one file) before retrying.
SQLITE_BUSY_TIMEOUT_S = 30


def create_store_engine(url: str, *, readonly: bool = False) -> sa.Engine:
    """An engine for `url`; `readonly` (SQLite only) opens an existing file without creating or locking it."""
    kind = backend(url)
    if kind == "postgresql":
        u = sa.make_url(url).set(drivername="postgresql+psycopg")     # plain postgresql:// means psycopg 3 here
        connect_args = {} if "connect_timeout" in u.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        # pre_ping: after a database restart the pool's old connections are dead; test them on checkout.
        return sa.create_engine(u, pool_pre_ping=True, connect_args=connect_args)
    file = sqlite_file(url)
    if readonly:
        if file is None:
            raise ValueError(f"a read-only SQLite store needs a file, not {url!r}")
        creator = lambda: sqlite3.connect(f"file:{file}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S,
                                          check_same_thread=False)
        return sa.create_engine("sqlite://", creator=creator)
    if file is not None:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    if file is not None:
        sa.event.listen(engine, "connect", _sqlite_wal)
    return engine


def _sqlite_wal(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is locked" at once
    # (no busy wait) when another process switches it at the same moment: two replicas starting together.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    # NORMAL in WAL mode survives a process crash; only an OS crash can drop the last commits.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def dialect_insert(dialect_name: str):
    """The backend's INSERT construct, which has the portable upsert `on_conflict_do_update/do_nothing`."""
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect_name]
