"""The typed row of an API key: its name, scope and limits, and the salted digest of its secret (never the key).

A key is `user` (the OpenAI endpoints, feedback on its own requests) or `admin` (also /v1/admin/*).
Limits are None when unlimited; `public()` is what listings show (no salt, no digest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCOPES = ("user", "admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeySpecError(ValueError):
    """A key that cannot be created or changed as asked (bad name, name taken, unknown key)."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeySpecError(f"invalid key name {name!r}: 1-64 of letters, digits, '.', '_', '-' (first a letter "
                        "or digit)")
    return name


def check_limits(rpm: int | None, tpm: int | None, max_streams: int | None) -> None:
    for label, value in (("rpm", rpm), ("tpm", tpm), ("max_streams", max_streams)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise KeySpecError(f"{label} must be a positive integer (or absent for no limit), not {value!r}")


@dataclass(frozen=True)
class ApiKey:
    key_id: str                       # the lookup id inside the key (ens-<key_id>-<secret>)
    name: str                         # unique forever: the traffic log attributes requests by it
    scope: str = "user"
    rpm: int | None = None            # generation requests per minute
    tpm: int | None = None            # prompt + completion tokens per minute
    max_streams: int | None = None    # generation requests in flight at once (streamed or not)
    created: float = 0.0
    revoked: float | None = None
    salt: str = field(default="", repr=False)
    digest: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        assert self.scope in SCOPES, self.scope

    @property
    def admin(self) -> bool:
        return self.scope == "admin"

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_streams is not None

    def public(self) -> dict:
        return {"name": self.name, "scope": self.scope, "rpm": self.rpm, "tpm": self.tpm,
                "max_streams": self.max_streams, "created": self.created, "revoked": self.revoked}
