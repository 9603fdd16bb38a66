"""The key tables, in the traffic store's database (same URL, same engine helper), declared in SQLAlchemy Core.

api_keys: one row per key, never deleted (revocation stamps `revoked`, so names stay attributable).
key_usage: one row per limited key, two GCRA clocks (requests, tokens). key_streams: one row per held
stream slot, with an expiry a live holder keeps pushing forward (a crashed replica's slots lapse).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("salt", sa.Text, nullable=False),                # hex, per key
    sa.Column("digest", sa.Text, nullable=False),              # HMAC-SHA256(salt, id:secret), hex
    sa.Column("rpm", sa.Integer),
    sa.Column("tpm", sa.Integer),
    sa.Column("max_streams", sa.Integer),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("revoked", sa.Double),                           # unix time; NULL while active
)

# GCRA ("virtual scheduling"): each clock is the theoretical arrival time (unix s) of the next unit; a charge
# of n units moves it by n * 60/limit, and is refused when that would put it more than 60 s ahead of now.
key_usage = sa.Table(
    "key_usage", metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("request_tat", sa.Double, nullable=False),
    sa.Column("token_tat", sa.Double, nullable=False),
)

key_streams = sa.Table(
    "key_streams", metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),           # 0 .. max_streams-1
    sa.Column("holder", sa.Text, nullable=False),              # the lease id of the request holding it
    sa.Column("expires", sa.Double, nullable=False),           # unix s; renewed while the request runs
)


def ensure_tables(engine: sa.Engine) -> None:
    """Create the key tables where missing; idempotent, and safe when replicas start together."""
    for attempt in range(2):
        try:
            with engine.begin() as conn:
                have = set(sa.inspect(conn).get_table_names())
                for table in metadata.sorted_tables:
                    if table.name not in have:
                        conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
            return
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt:          # PostgreSQL: another process created the same table at the same moment
                raise
