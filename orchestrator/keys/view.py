"""A replica's cached view of the active keys, reloaded from the store every ~2 s (revocation goes live there).

Authentication reads only this in-memory snapshot: no database work per request. Until the first load
succeeds nobody can be checked (`ready` is False) and the gateway answers 503 rather than run open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from orchestrator.keys.records import ApiKey
from orchestrator.keys.secret import parse, verify

logger = logging.getLogger(__name__)


class KeyView:
    def __init__(self, load: Callable[[], dict[str, ApiKey]], where: str = "the store") -> None:
        self._load, self._where = load, where
        self._keys: dict[str, ApiKey] | None = None       # key_id -> key; swapped whole, never mutated
        self.loaded_at = 0.0                              # monotonic time of the last successful load
        self._failing = False

    @property
    def ready(self) -> bool:
        return self._keys is not None

    @property
    def enforcing(self) -> bool:
        """Whether any active key exists: then every /v1 request needs one."""
        return bool(self._keys)

    @property
    def count(self) -> int:
        return len(self._keys or {})

    def refresh(self) -> bool:
        """Reload from the store -> whether it worked (on failure the last snapshot stays in force)."""
        try:
            keys = self._load()
        except Exception as exc:                          # noqa: BLE001 - a background loop must survive
            if not self._failing:
                logger.error("API keys: cannot reload from %s (%s: %s); keeping the last view",
                             self._where, type(exc).__name__, getattr(exc, "orig", exc))
            self._failing = True
            return False
        if self._failing:
            logger.warning("API keys: reloading from %s works again", self._where)
        before, self._keys, self._failing = self._keys, keys, False
        self.loaded_at = time.monotonic()
        if before is None or bool(before) != bool(keys):
            logger.info("API keys: %s", self.describe())
        return True

    def describe(self) -> str:
        if self._keys is None:
            return f"unknown (cannot read {self._where}): every /v1 request is refused with 503"
        if not self._keys:
            return ("none active: the service is OPEN to anyone who can reach it "
                    "(`ensemble keys add NAME` to require keys)")
        return f"{len(self._keys)} active; every /v1 request needs `Authorization: Bearer <key>`"

    def lookup(self, token: str) -> ApiKey | None:
        """The active key `token` is, or None (malformed, unknown, revoked, or a wrong secret)."""
        parts = parse(token)
        key = (self._keys or {}).get(parts[0]) if parts else None
        if key is None or not verify(token, key.key_id, key.salt, key.digest):
            return None
        return key
