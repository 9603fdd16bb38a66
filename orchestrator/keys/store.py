"""The api_keys table: add, list, revoke, and load the active keys (blocking; async callers use a thread).

Opened on the traffic store's URL (`ENSEMBLE_STORE_URL` wins, as for the traffic log); creates its tables.
Only the salted digest is stored; `add` returns the one copy of the key there will ever be.
"""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from orchestrator.keys.records import SCOPES, ApiKey, KeySpecError, check_limits, check_name
from orchestrator.keys.secret import new_key
from orchestrator.keys.tables import api_keys, ensure_tables
from orchestrator.store.database import create_store_engine
from orchestrator.store.url import StoreError, as_url, redact


class KeyStore:
    def __init__(self, store: str | Path, *, engine: sa.Engine | None = None, lazy: bool = False) -> None:
        """`lazy` (a gateway): a database that cannot be reached yet is not an error; the tables are created
        on the first call that reaches it (until then the gateway's view is not ready and answers 503)."""
        url = as_url(store)
        self.url = redact(url)
        self.engine = engine or create_store_engine(url)
        self._ready = False
        try:
            self._ensure()
        except StoreError:
            if not lazy:
                raise

    def _ensure(self) -> None:
        if self._ready:
            return
        try:
            ensure_tables(self.engine)
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot reach the key store {self.url}: {exc.orig}") from None
        self._ready = True

    def add(self, name: str, scope: str = "user", *, rpm: int | None = None, tpm: int | None = None,
            max_streams: int | None = None) -> tuple[ApiKey, str]:
        """-> (the stored key, the key itself). Names are unique forever, revoked ones included."""
        check_name(name)
        check_limits(rpm, tpm, max_streams)
        if scope not in SCOPES:
            raise KeySpecError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        made = new_key()
        key = ApiKey(made.key_id, name, scope, rpm, tpm, max_streams, time.time(), None, made.salt, made.digest)
        row = {c.name: getattr(key, c.name) for c in api_keys.columns}
        self._ensure()
        try:
            with self.engine.begin() as conn:
                conn.execute(api_keys.insert(), row)
        except sa.exc.IntegrityError:
            raise KeySpecError(f"a key named {name!r} exists already (names stay taken after revocation, so "
                               "the traffic log keeps meaning one tenant per name)") from None
        return key, made.token

    def list(self, *, include_revoked: bool = True) -> list[ApiKey]:
        self._ensure()
        query = sa.select(api_keys).order_by(api_keys.c.created, api_keys.c.name)
        if not include_revoked:
            query = query.where(api_keys.c.revoked.is_(None))
        with self.engine.connect() as conn:
            return [ApiKey(**row) for row in conn.execute(query).mappings()]

    def active(self) -> dict[str, ApiKey]:
        """key_id -> key, for every unrevoked key (the gateway's view reloads this every ~2 s)."""
        return {k.key_id: k for k in self.list(include_revoked=False)}

    def revoke(self, name: str) -> ApiKey:
        self._ensure()
        with self.engine.begin() as conn:
            done = conn.execute(api_keys.update()
                                .where(api_keys.c.name == name, api_keys.c.revoked.is_(None))
                                .values(revoked=time.time())).rowcount
        if not done:
            raise KeySpecError(f"no active key named {name!r}")
        return next(k for k in self.list() if k.name == name)

    def close(self) -> None:
        self.engine.dispose()
