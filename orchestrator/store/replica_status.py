"""What each gateway replica serves right now, in the shared store: its live gate version and last gate error.

Every gateway replica writes its row (meta key `gateway/<replica id>`) at start and after every reconfigure;
a job that swaps the gate reads the rows of the replicas Serve reports as running (deploy/replicas.py) and
waits until each one serves the new version. Works across nodes because the store is shared.
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa

from orchestrator.store.database import create_store_engine, dialect_insert
from orchestrator.store.schema import ensure_schema, meta

_PREFIX = "gateway/"


def report_replica(url: str, replica_id: str, gate_version: str, gate_error: str | None) -> None:
    engine = create_store_engine(url)
    try:
        ensure_schema(engine)
        value = json.dumps({"gate_version": gate_version, "gate_error": gate_error, "at": time.time()})
        with engine.begin() as conn:
            ins = dialect_insert(conn.dialect.name)(meta)
            conn.execute(ins.on_conflict_do_update(index_elements=["key"], set_={"value": ins.excluded.value}),
                         [{"key": _PREFIX + replica_id, "value": value}])
    finally:
        engine.dispose()


def replica_reports(url: str, replica_ids: list[str]) -> dict[str, dict]:
    """replica id -> {"gate_version", "gate_error", "at"} for those that reported."""
    if not replica_ids:
        return {}
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(meta.c.key, meta.c.value)
                                .where(meta.c.key.in_([_PREFIX + r for r in replica_ids]))).all()
    finally:
        engine.dispose()
    return {key.removeprefix(_PREFIX): json.loads(value) for key, value in rows}
