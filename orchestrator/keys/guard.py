"""The gateway's edge for keys: who is calling (401), may they (403 admin scope), within their limits (429).

FastAPI dependencies `user`, `admin` and `metrics` put the caller's ApiKey on `request.state.api_key`;
`admit`/`settle` bracket a generation with the shared-store limits, off the event loop. No key, digest or
secret ever goes into an error, a log line or a metric label: only key names, and only in the traffic log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.api import OpenAIError
from orchestrator.keys.limits import LEASE_TTL_S, Admitted, Lease, Limiter, Refusal
from orchestrator.keys.records import ApiKey
from orchestrator.keys.store import KeyStore
from orchestrator.keys.view import KeyView

logger = logging.getLogger(__name__)

REFRESH_S = 2.0             # how stale a replica's key view may be: revocation is live within this (+ a load)
_bearer = HTTPBearer(auto_error=False, description="an API key from `ensemble keys add` (once any key exists)")
_BEARER = Depends(_bearer)


def unauthorized(message: str) -> OpenAIError:
    return OpenAIError(message, status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class KeyGuard:
    def __init__(self, store: KeyStore, limiter: Limiter, *, metrics_public: bool = False,
                 refresh_s: float = REFRESH_S, registry=None, background: bool = True) -> None:
        self.store, self.limiter, self.metrics_public = store, limiter, metrics_public
        self.view = KeyView(store.active, store.url)
        self.view.refresh()
        self._leases: set[Lease] = set()
        self._lock = threading.Lock()
        # Limit checks get their own threads: a slow database must not starve the loop's default executor.
        self._db = ThreadPoolExecutor(max_workers=8, thread_name_prefix="keys-limits")
        self._settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keys-settle")
        self.rejected = None
        if registry is not None:
            from prometheus_client import Counter

            self.rejected = Counter("ensemble_key_rejected", "requests refused at the key check, by reason "
                                    "(missing, invalid, scope, rpm, tpm, max_streams, unavailable)", ["reason"],
                                    registry=registry)
        self._stop = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(refresh_s,), name="keys-refresh", daemon=True)
            self._thread.start()

    @classmethod
    def open(cls, store: str | Path, **kw) -> KeyGuard:
        """Blocking: open the key tables in the store at `store` and load the view once."""
        keys = KeyStore(store, lazy=True)         # an unreachable database: 503s until it answers
        return cls(keys, Limiter(keys.engine), **kw)

    def describe(self) -> str:
        return f"API keys: {self.view.describe()}"

    # ---- FastAPI dependencies ----------------------------------------------------------------------

    async def user(self, request: Request,
                   creds: HTTPAuthorizationCredentials | None = _BEARER) -> ApiKey | None:
        """Any active key, once one exists; None while the service runs open."""
        key = self._authenticate(creds, request.headers.get("authorization"))
        request.state.api_key = key
        return key

    async def admin(self, request: Request,
                    creds: HTTPAuthorizationCredentials | None = _BEARER) -> ApiKey:
        key = self._authenticate(creds, request.headers.get("authorization"))
        if key is None or not key.admin:
            self._count("scope")
            what = "an admin key" if key is not None else "an admin key, and none exists yet " \
                "(`ensemble keys add NAME --scope admin`)"
            raise OpenAIError(f"this endpoint needs {what}", status=403, type="permission_error",
                              code="insufficient_permissions")
        request.state.api_key = key
        return key

    async def metrics(self, request: Request,
                      creds: HTTPAuthorizationCredentials | None = _BEARER) -> None:
        if not self.metrics_public:
            self._authenticate(creds, request.headers.get("authorization"))

    def _authenticate(self, creds: HTTPAuthorizationCredentials | None, header: str | None) -> ApiKey | None:
        if not self.view.ready:
            self._count("unavailable")
            raise OpenAIError("API keys cannot be checked now (the key store is unreachable)", status=503,
                              type="server_error", code="key_store_unavailable", headers={"Retry-After": "2"})
        if not self.view.enforcing:
            return None
        if creds is None:
            self._count("missing")
            hint = " (the scheme must be Bearer)" if header else ""
            raise unauthorized("You didn't provide an API key: send `Authorization: Bearer <key>`" + hint)
        key = self.view.lookup(creds.credentials.strip())
        if key is None:
            self._count("invalid")
            raise unauthorized("Incorrect API key provided, or the key was revoked")
        return key

    def _count(self, reason: str) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason=reason).inc()

    # ---- limits ----------------------------------------------------------------------------------------

    async def admit(self, key: ApiKey | None, prompt_tokens: int) -> Admitted | None:
        """Charge a generation to its key's limits -> a ticket for `settle`; over a limit, a 429."""
        if key is None or not key.limited:
            return None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._db, self.limiter.admit, key, prompt_tokens)
        except sa.exc.SQLAlchemyError as exc:
            logger.error("API key limits: store error (%s: %s); refusing limited requests",
                         type(exc).__name__, getattr(exc, "orig", exc))
            self._count("unavailable")
            raise OpenAIError("this API key's limits cannot be checked now", status=503, type="server_error",
                              code="key_store_unavailable", headers={"Retry-After": "2"}) from None
        if isinstance(result, Refusal):
            self._count(result.limit)
            raise OpenAIError(result.message, status=429, type="rate_limit_error", code="rate_limit_exceeded",
                              headers={"Retry-After": str(result.retry_after_s)})
        if result.lease is not None:
            with self._lock:
                self._leases.add(result.lease)
        return result

    def settle(self, key: ApiKey | None, ticket: Admitted | None, completion_tokens: int) -> None:
        """The request ended: charge its completion tokens, free its stream slot. Never blocks the caller."""
        if key is None or ticket is None:
            return
        if ticket.lease is not None:
            with self._lock:
                self._leases.discard(ticket.lease)
        try:
            self._settler.submit(self._settle, key, ticket.lease, completion_tokens)
        except RuntimeError:                              # closed: the slot lapses after its TTL
            logger.warning("API key limits: closed; a request of key %s was not settled", key.name)

    def _settle(self, key: ApiKey, lease: Lease | None, completion_tokens: int) -> None:
        try:
            self.limiter.add_tokens(key, completion_tokens)
            if lease is not None:
                self.limiter.release(lease)
        except Exception as exc:                          # noqa: BLE001 - a lapsed lease frees itself
            logger.warning("API key limits: could not settle a request of key %s (%s)", key.name,
                           type(exc).__name__)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every settle so far has reached the store (tests)."""
        self._settler.submit(lambda: None).result(timeout)

    # ---- background: view refresh and lease renewal ----------------------------------------------------

    def _run(self, refresh_s: float) -> None:
        renew_every, last_renew = LEASE_TTL_S / 3, time.monotonic()
        while not self._stop.wait(refresh_s):
            self.view.refresh()
            if time.monotonic() - last_renew >= renew_every:
                last_renew = time.monotonic()
                with self._lock:
                    held = list(self._leases)
                try:
                    self.limiter.renew(held)
                except Exception as exc:                  # noqa: BLE001
                    logger.warning("API key limits: could not renew %d stream slots (%s)", len(held),
                                   type(exc).__name__)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._settler.shutdown(wait=True)
        self._db.shutdown(wait=False)
        self.store.close()
