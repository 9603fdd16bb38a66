"""The store's tables, declared once in SQLAlchemy Core and created on SQLite or PostgreSQL alike.

`ensure_schema(engine)` creates what is missing and adds columns that older logs lack; it is idempotent and
safe when several replicas start at once. Gate versions keep their own tables (gating/registry_store.py).
"""

from __future__ import annotations

import json
import logging

import sqlalchemy as sa

from orchestrator.store.database import dialect_insert

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3          # 2: requests.key_name; 3: requests.degraded_tokens
metadata = sa.MetaData()


class JSONText(sa.TypeDecorator):
    """JSON kept as text, exactly as Python writes it, on both backends. Not PostgreSQL's json type: that
    rejects NaN and ±Infinity, which a logprob or an entropy can be, and the row must still be stored.
    (Query it in SQL with `column::json` where the values are finite.)"""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def process_result_value(self, value, dialect):
        return None if value is None else json.loads(value)


# One row per request, keyed by its id: a provisional row (complete = false) when generation starts, replaced
# once by the final row (orchestrator/store/writes.py). JSON columns hold lists per output token.
requests = sa.Table(
    "requests", metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("params", JSONText, nullable=False),           # object
    sa.Column("prompt_ids", JSONText, nullable=False),       # list[int]
    sa.Column("prompt_text", sa.Text, nullable=False),
    sa.Column("output_ids", JSONText, nullable=False),       # list[int]
    sa.Column("output_text", sa.Text, nullable=False),
    sa.Column("routing_experts", JSONText, nullable=False),  # list[list[str]], per output token
    sa.Column("routing_weights", JSONText, nullable=False),  # list[list[float]], per output token
    sa.Column("gate_entropy", JSONText, nullable=False),     # list[float], per output token (nats)
    sa.Column("logprobs", JSONText, nullable=False),         # list[float], log p(token) per output token
    sa.Column("gate_version", sa.Text, nullable=False),
    sa.Column("ttft_s", sa.Double),
    sa.Column("duration_s", sa.Double),
    sa.Column("finish_reason", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("status", sa.Integer, nullable=False),
    # Logs written before provisional rows existed hold only final rows: the default fills them in.
    sa.Column("complete", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("key_name", sa.Text),                          # API key name (not the key); None before keys
    sa.Column("degraded_tokens", JSONText, nullable=False, server_default="[]"),  # list[int] output positions
    sa.Index("requests_created", "created"),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("feedback_id", sa.Text, primary_key=True),
    sa.Column("request_id", sa.Text, nullable=False),        # no foreign key: feedback may arrive first
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("rating", sa.Integer, nullable=False),         # 1 good, 0 neutral, -1 bad
    sa.Column("corrected_text", sa.Text),
    sa.Index("feedback_request", "request_id"),
)

meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# ---- more tables go here -----------------------------------------------------------------------------------
# API keys and rate-limit usage belong in this database too: declare each as `sa.Table(name, metadata, ...)`
# below, bump SCHEMA_VERSION, and ensure_schema creates it on every backend. Queries on them go in a module
# of this package named after the table (e.g. keys.py), never in the gateway.


def ensure_schema(engine: sa.Engine) -> None:
    """Create missing tables and indexes, add columns older databases lack, record the schema version."""
    for attempt in range(2):
        try:
            with engine.begin() as conn:
                _create_and_upgrade(conn)
            return
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            # PostgreSQL: another replica created the same table or column at the same moment; look again.
            if attempt:
                raise


def _create_and_upgrade(conn: sa.Connection) -> None:
    # Only what is missing: a database role that may write rows but not create tables works once they exist.
    # IF NOT EXISTS: replicas starting together must not fail on each other's tables.
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
            have_columns, have_indexes = {c.name for c in table.columns}, set()
        else:
            have_columns = {c["name"] for c in inspector.get_columns(table.name)}
            have_indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for column in table.columns:
            if column.name not in have_columns:           # a log written by an older version
                logger.info("store: adding column %s.%s", table.name, column.name)
                ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
        for index in table.indexes:
            if index.name not in have_indexes:
                conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
    ins = dialect_insert(conn.dialect.name)(meta)
    conn.execute(ins.on_conflict_do_update(index_elements=["key"], set_={"value": ins.excluded.value},
                                           where=meta.c.value != ins.excluded.value),
                 [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
