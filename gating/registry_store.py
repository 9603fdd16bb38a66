"""The gate registry in a database (SQLite file or PostgreSQL), so every node reads the same versions.

Same methods as gating.checkpoint.GateRegistry; versions are immutable rows (the checkpoint's file bytes),
the live pointer and the history change in the same transaction as the version they name.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import NullPool

from gating.checkpoint import GateCheckpoint, _atomic_write, checkpoint_bytes, checkpoint_from_bytes

_VERSION_RE = re.compile(r"^gate-v(\d+)$")
_DATABASE_URL = re.compile(r"^(sqlite|postgres|postgresql)(\+\w+)?://", re.IGNORECASE)
_LIVE = "current"           # the one row of gate_live

metadata = sa.MetaData()
gate_versions = sa.Table(
    "gate_versions", metadata,
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("number", sa.Integer),                       # N of gate-vN, for ordering; None for other names
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("parent", sa.Text),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("checkpoint", sa.LargeBinary, nullable=False),   # the .pt file's bytes (a small GRU gate)
)
gate_live = sa.Table(
    "gate_live", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, nullable=False),
)
gate_history = sa.Table(
    "gate_history", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Double, nullable=False),
    # What GateRegistry writes to history.jsonl, as JSON text (metrics may hold NaN, which PostgreSQL's json rejects).
    sa.Column("entry", sa.Text, nullable=False),
)


def is_database_url(location: str | Path) -> bool:
    return bool(_DATABASE_URL.match(str(location)))


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _engine(url: str) -> sa.Engine:
    """A small copy of orchestrator/store/database.py (gating must not import the service): psycopg 3 for
    PostgreSQL, WAL for a SQLite file. NullPool: registry calls are rare, so no connection outlives one."""
    u = sa.make_url(url)
    if u.get_backend_name() in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
        args = {} if "connect_timeout" in u.query else {"connect_timeout": 5}
        return sa.create_engine(u, poolclass=NullPool, connect_args=args)
    if u.get_backend_name() != "sqlite":
        raise ValueError(f"unsupported registry URL {_redact(url)!r}: use sqlite:///FILE or postgresql://...")
    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(u, poolclass=NullPool, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _wal(dbapi_conn, _record) -> None:
        dbapi_conn.execute("PRAGMA journal_mode=WAL")

    return engine


def _insert(conn: sa.Connection):
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[conn.dialect.name]


class StoreGateRegistry:
    """Gate versions with one live pointer, in the database at `url`.

    `root` is a local cache directory (checkpoints are copied there when a caller wants a file: `path_of`,
    `current_path`; score caches of `ensemble train-gate` go there too); the database stays the truth.
    """

    def __init__(self, url: str, *, cache_dir: Path | None = None) -> None:
        self.url = url
        self.location = _redact(url)
        self._engine = _engine(url)
        key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "ensemble-gate-cache" / key
        self._tables_ready = False

    def _has_tables(self) -> bool:
        """Whether anything was ever written here. Reading never creates tables, so a gateway whose database
        role may only read can load gates, and an empty registry reads as empty."""
        if not self._tables_ready:
            with self._engine.connect() as conn:
                self._tables_ready = sa.inspect(conn).has_table(gate_live.name)
        return self._tables_ready

    def _connect(self) -> sa.Connection | None:
        """A connection for reading (close it), or None while the registry has no tables yet."""
        return self._engine.connect() if self._has_tables() else None

    def _create_tables(self) -> None:
        # IF NOT EXISTS, and once more on PostgreSQL's race: several processes may create a registry at once.
        for attempt in range(2):
            try:
                with self._engine.begin() as conn:
                    for table in metadata.sorted_tables:
                        conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
                self._tables_ready = True
                return
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                if attempt:
                    raise

    def __repr__(self) -> str:
        return f"StoreGateRegistry({self.location!r})"

    # ---- reading -------------------------------------------------------------------------------------

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def _scalar(self, query) -> Any:
        """One value, or None (also when the registry has no tables yet)."""
        conn = self._connect()
        if conn is None:
            return None
        with conn:
            return conn.execute(query).scalar()

    def versions(self) -> list[str]:
        conn = self._connect()
        if conn is None:
            return []
        with conn:
            return list(conn.execute(sa.select(gate_versions.c.version).where(gate_versions.c.number.is_not(None))
                                     .order_by(gate_versions.c.number)).scalars())

    def next_version(self) -> str:
        top = self._scalar(sa.select(sa.func.max(gate_versions.c.number)))
        return f"gate-v{(top or 0) + 1}"

    def current(self) -> str | None:
        return self._scalar(sa.select(gate_live.c.version).where(gate_live.c.name == _LIVE))

    def load(self, version: str) -> GateCheckpoint:
        data = self._scalar(sa.select(gate_versions.c.checkpoint).where(gate_versions.c.version == version))
        if data is None:
            raise FileNotFoundError(self._unknown(version))
        return checkpoint_from_bytes(data, f"{self.location} {version}")

    def load_current(self) -> GateCheckpoint:
        version = self.current()
        if version is None:
            raise FileNotFoundError(f"no live gate in {self.location}; run `ensemble train-gate`")
        return self.load(version)

    def path_of(self, version: str) -> Path:
        """A local file holding `version` (copied from the database once; versions never change)."""
        sha = self._scalar(sa.select(gate_versions.c.sha256).where(gate_versions.c.version == version))
        if sha is None:
            raise FileNotFoundError(self._unknown(version))
        # The digest in the name: a cache left by another database at the same URL is never mistaken.
        path = self.versions_dir / f"{version}.{sha[:16]}.pt"
        if not path.exists():
            data = self._scalar(sa.select(gate_versions.c.checkpoint).where(gate_versions.c.version == version))
            _atomic_write(path, lambda f: f.write(data))
        return path

    def current_path(self) -> Path:
        version = self.current()
        if version is None:
            raise FileNotFoundError(f"no live gate in {self.location}; run `ensemble train-gate`")
        return self.path_of(version)

    def history(self) -> list[dict]:
        conn = self._connect()
        if conn is None:
            return []
        with conn:
            rows = conn.execute(sa.select(gate_history.c.time, gate_history.c.entry).order_by(gate_history.c.id))
            return [{"time": t, **json.loads(entry)} for t, entry in rows]

    # ---- writing -------------------------------------------------------------------------------------

    def add(self, ckpt: GateCheckpoint, *, promote: bool, reason: str = "") -> Path:
        """Store a new immutable version; make it live only if `promote` (one transaction)."""
        data = checkpoint_bytes(ckpt)
        match = _VERSION_RE.match(ckpt.version)
        if not self._has_tables():
            self._create_tables()
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.insert(gate_versions).values(
                    version=ckpt.version, number=int(match.group(1)) if match else None, created=ckpt.created,
                    parent=ckpt.parent, sha256=hashlib.sha256(data).hexdigest(), checkpoint=data))
                self._log(conn, {"event": "added", "version": ckpt.version, "parent": ckpt.parent,
                                 "metrics": ckpt.metrics})
                if promote:
                    self._point(conn, ckpt.version, reason or "promoted")
        except sa.exc.IntegrityError:
            raise FileExistsError(f"gate version {ckpt.version} already exists in {self.location}") from None
        return self.path_of(ckpt.version)

    def set_current(self, version: str, *, reason: str = "restore") -> None:
        if not self._has_tables():                      # no tables: no versions either
            raise FileNotFoundError(self._unknown(version))
        with self._engine.begin() as conn:
            known = conn.execute(sa.select(gate_versions.c.version).where(gate_versions.c.version == version)).first()
            if known is None:
                raise FileNotFoundError(self._unknown(version))
            self._point(conn, version, reason)

    def _point(self, conn: sa.Connection, version: str, reason: str) -> None:
        previous = conn.execute(sa.select(gate_live.c.version).where(gate_live.c.name == _LIVE)).scalar()
        ins = _insert(conn)(gate_live).values(name=_LIVE, version=version)
        conn.execute(ins.on_conflict_do_update(index_elements=[gate_live.c.name], set_={"version": version}))
        self._log(conn, {"event": "live", "version": version, "previous": previous, "reason": reason})

    def _log(self, conn: sa.Connection, entry: dict) -> None:
        conn.execute(sa.insert(gate_history).values(time=time.time(), entry=json.dumps(entry)))

    def _unknown(self, version: str) -> str:
        return f"unknown gate version {version!r}; known: {', '.join(self.versions()) or 'none'}"
