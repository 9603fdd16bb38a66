"""API key material: the key format `ens-<id>-<secret>`, and the salted HMAC-SHA256 digest the store keeps.

The id (12 hex digits) is the row's primary key, so a lookup is O(1); only the secret is hashed. Pure
functions, no I/O; a key in plain text exists only in the return value of `new_key` and in client headers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "ens"
_ID_HEX = 12                # 48 bits: collisions need ~16M keys; the primary key refuses one anyway
_SECRET_BYTES = 32          # 256 bits of randomness: no guessing, so no slow KDF is needed (see digest)
_FORMAT = re.compile(rf"^{PREFIX}-([0-9a-f]{{{_ID_HEX}}})-([A-Za-z0-9_-]{{20,100}})$")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret: str = ""        # never printed by repr
    salt: str = ""
    digest: str = ""

    @property
    def token(self) -> str:
        """The full key as the client sends it (shown once, by `ensemble keys add`)."""
        return f"{PREFIX}-{self.key_id}-{self.secret}"

    def __repr__(self) -> str:
        return f"NewKey(key_id={self.key_id!r})"


def digest(key_id: str, secret: str, salt: str) -> str:
    """HMAC-SHA256 over id and secret, keyed with the key's own salt (hex).

    Why not scrypt/argon2: those slow down guessing a low-entropy password; these secrets are 256 random bits,
    which no amount of hashing speed makes guessable, and a fast digest keeps verification at ~1 us."""
    return hmac.new(bytes.fromhex(salt), f"{key_id}:{secret}".encode(), hashlib.sha256).hexdigest()


def new_key() -> NewKey:
    key_id, secret, salt = secrets.token_hex(_ID_HEX // 2), secrets.token_urlsafe(_SECRET_BYTES), secrets.token_hex(16)
    return NewKey(key_id, secret, salt, digest(key_id, secret, salt))


def parse(token: str) -> tuple[str, str] | None:
    """`ens-<id>-<secret>` -> (id, secret); None for anything else."""
    m = _FORMAT.match(token)
    return (m.group(1), m.group(2)) if m else None


def verify(token: str, key_id: str, salt: str, expected: str) -> bool:
    """Whether `token` is the key whose row is (key_id, salt, expected digest); constant-time compare."""
    parts = parse(token)
    if parts is None or parts[0] != key_id:
        return False
    return hmac.compare_digest(digest(parts[0], parts[1], salt), expected)
