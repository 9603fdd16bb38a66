"""Which database a process uses: a URL (`sqlite:///traffic.db` by default, `postgresql://...` on a cluster).

`ENSEMBLE_STORE_URL`, where set, names the service's one database and wins over every database URL in the
YAML (the store's `url`, and `gate.path` when it names a database), so a password never sits in a config file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_VAR = "ENSEMBLE_STORE_URL"
DEFAULT_URL = "sqlite:///traffic.db"
# `gate.path: store` in a config: the gate registry lives in the store's database (deploy/config.py resolves it).
REGISTRY_IN_STORE = "store"
_DATABASE_URL = re.compile(r"^(sqlite|postgres|postgresql)(\+\w+)?://", re.IGNORECASE)


class StoreError(RuntimeError):
    """The store cannot be used: an unsupported URL, or a database that cannot be reached."""


def is_database_url(value: str | Path) -> bool:
    return bool(_DATABASE_URL.match(str(value)))


def as_url(store: str | Path) -> str:
    """A database URL as it is; anything else is a SQLite file path (old configs and `--db FILE`)."""
    return str(store) if is_database_url(store) else f"sqlite:///{Path(store).expanduser().resolve()}"


def backend(url: str) -> str:
    """-> "sqlite" | "postgresql" (the only two backends the store is tested on)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgres", "postgresql"):
        return "postgresql"
    raise StoreError(f"unsupported store URL {redact(url)!r}: use sqlite:///FILE or postgresql://...")


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (relative as written); None for an in-memory database or another backend."""
    if backend(url) != "sqlite":
        return None
    rest = url.split("://", 1)[1]
    path = rest.removeprefix("/").split("?", 1)[0]        # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
    return Path(path) if path and path != ":memory:" else None


def resolve_sqlite_url(url: str, base: Path) -> str:
    """A SQLite URL with a relative file made absolute against `base`; other URLs unchanged."""
    file = sqlite_file(url)
    if file is None or file.is_absolute():
        return url
    query = url.split("?", 1)[1] if "?" in url else ""
    return f"sqlite:///{(base / file).resolve()}" + (f"?{query}" if query else "")


def resolve_store_url(configured: str | None = None) -> str:
    """The store this process writes and reads: ENSEMBLE_STORE_URL if set, else the configured URL."""
    return os.environ.get(ENV_VAR) or configured or DEFAULT_URL


def registry_location(configured: str) -> str:
    """A configured gate location as this process opens it: a database URL yields to ENSEMBLE_STORE_URL
    (one database per service); a directory or checkpoint file is kept."""
    return resolve_store_url(configured) if is_database_url(configured) else configured


def redact(url: str) -> str:
    """The URL with its password masked, for logs, errors and /health."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(url))
