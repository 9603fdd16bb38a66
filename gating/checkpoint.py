"""Versioned gate checkpoints and the registry that says which version is live.

A registry is a directory: versions/<version>.pt (immutable), CURRENT (the live version's name) and
history.jsonl (one line per promotion or restore). Writes are atomic (temp file + rename), so an
interrupted job never leaves a half-written checkpoint or a CURRENT that points at nothing.
`open_registry` also opens the same interface in a database (gating/registry_store.py) for clusters.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gating.model import Gate, GateArgs

FORMAT = "ensemble-gate/1"
_VERSION_RE = re.compile(r"^gate-v(\d+)$")


class GateMismatchError(ValueError):
    """The checkpoint was trained for other experts or another tokenizer."""


@dataclass
class GateCheckpoint:
    version: str
    args: GateArgs
    state_dict: dict
    expert_names: list[str]
    tokenizer_fingerprint: str
    top_k: int = 2
    mix_space: str = "logits"
    parent: str | None = None
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def build(self) -> Gate:
        gate = Gate(self.args)
        gate.load_state_dict(self.state_dict)
        return gate.eval()

    def check_matches(self, expert_names: list[str], tokenizer_fingerprint: str | None) -> None:
        if list(expert_names) != list(self.expert_names):
            raise GateMismatchError(
                f"gate {self.version} was trained for experts {self.expert_names} (in this order), "
                f"but the service is configured with {list(expert_names)}; retrain the gate "
                "(`ensemble train-gate`) or fix the experts list in the config"
            )
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise GateMismatchError(
                f"gate {self.version} was trained with tokenizer {self.tokenizer_fingerprint[:12]}, "
                f"but the experts use tokenizer {tokenizer_fingerprint[:12]}"
            )


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _payload(ckpt: GateCheckpoint) -> dict:
    return {
        "format": FORMAT, "version": ckpt.version, "args": ckpt.args.to_dict(),
        "state_dict": ckpt.state_dict, "expert_names": list(ckpt.expert_names),
        "tokenizer_fingerprint": ckpt.tokenizer_fingerprint, "top_k": ckpt.top_k,
        "mix_space": ckpt.mix_space, "parent": ckpt.parent, "metrics": ckpt.metrics, "created": ckpt.created,
    }


def _from_payload(payload, source: str) -> GateCheckpoint:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{source} is not an ensemble gate checkpoint (format {FORMAT})")
    return GateCheckpoint(
        version=payload["version"], args=GateArgs(**payload["args"]), state_dict=payload["state_dict"],
        expert_names=list(payload["expert_names"]), tokenizer_fingerprint=payload["tokenizer_fingerprint"],
        top_k=int(payload["top_k"]), mix_space=payload["mix_space"], parent=payload.get("parent"),
        metrics=dict(payload.get("metrics") or {}), created=float(payload.get("created") or 0.0),
    )


def save_checkpoint(ckpt: GateCheckpoint, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(_payload(ckpt), f))


def load_checkpoint(path: Path) -> GateCheckpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"gate checkpoint not found: {path}") from None
    return _from_payload(payload, str(path))


def checkpoint_bytes(ckpt: GateCheckpoint) -> bytes:
    """The checkpoint file's exact bytes (what a database registry stores)."""
    buf = io.BytesIO()
    torch.save(_payload(ckpt), buf)
    return buf.getvalue()


def checkpoint_from_bytes(data: bytes, source: str) -> GateCheckpoint:
    return _from_payload(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), source)


class GateRegistry:
    """Directory of versions with one live pointer; history is kept so any version can be restored."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        """Where the registry is, for messages and for a gateway's `gate.path`."""
        return str(self.root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def path_of(self, version: str) -> Path:
        return self.versions_dir / f"{version}.pt"

    def versions(self) -> list[str]:
        found = [p.stem for p in self.versions_dir.glob("gate-v*.pt") if _VERSION_RE.match(p.stem)]
        return sorted(found, key=lambda v: int(_VERSION_RE.match(v).group(1)))

    def next_version(self) -> str:
        existing = self.versions()
        return f"gate-v{int(_VERSION_RE.match(existing[-1]).group(1)) + 1 if existing else 1}"

    def current(self) -> str | None:
        pointer = self.root / "CURRENT"
        return pointer.read_text().strip() if pointer.exists() else None

    def current_path(self) -> Path:
        version = self.current()
        if version is None:
            raise FileNotFoundError(f"no live gate in {self.root} (missing CURRENT); run `ensemble train-gate`")
        return self.path_of(version)

    def load_current(self) -> GateCheckpoint:
        return load_checkpoint(self.current_path())

    def load(self, version: str) -> GateCheckpoint:
        if not self.path_of(version).exists():
            raise FileNotFoundError(f"unknown gate version {version!r} in {self.root}; "
                                    f"known: {', '.join(self.versions()) or 'none'}")
        ckpt = load_checkpoint(self.path_of(version))
        if ckpt.version != version:
            raise ValueError(f"{self.path_of(version)} holds gate {ckpt.version}, not the requested {version}")
        return ckpt

    def add(self, ckpt: GateCheckpoint, *, promote: bool, reason: str = "") -> Path:
        """Store a new immutable version; make it live only if `promote`."""
        path = self.path_of(ckpt.version)
        if path.exists():
            raise FileExistsError(f"gate version {ckpt.version} already exists in {self.root}")
        save_checkpoint(ckpt, path)
        self._log({"event": "added", "version": ckpt.version, "parent": ckpt.parent, "metrics": ckpt.metrics})
        if promote:
            self.set_current(ckpt.version, reason=reason or "promoted")
        return path

    def set_current(self, version: str, *, reason: str = "restore") -> None:
        if not self.path_of(version).exists():
            raise FileNotFoundError(f"unknown gate version {version!r}; known: {', '.join(self.versions()) or 'none'}")
        previous = self.current()
        _atomic_write(self.root / "CURRENT", lambda f: f.write(f"{version}\n".encode()))
        self._log({"event": "live", "version": version, "previous": previous, "reason": reason})

    def history(self) -> list[dict]:
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _log(self, entry: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")


def resolve_gate_path(path: Path) -> Path:
    """A config may name a registry directory (use its live version) or one checkpoint file."""
    path = Path(path)
    return GateRegistry(path).current_path() if path.is_dir() else path


def is_registry_url(location: str | Path) -> bool:
    """A database URL (sqlite:///..., postgresql://...) names a registry in a database, not on disk."""
    from gating.registry_store import is_database_url

    return is_database_url(location)


def open_registry(location: str | Path):
    """-> GateRegistry for a directory, StoreGateRegistry for a database URL (same methods)."""
    if is_registry_url(location):
        from gating.registry_store import StoreGateRegistry

        return StoreGateRegistry(str(location))
    return GateRegistry(Path(location))


def load_gate_checkpoint(location: str | Path, version: str | None = None) -> GateCheckpoint:
    """A registry (directory or database URL: its live version, or `version`) or one checkpoint file."""
    if is_registry_url(location) or Path(location).is_dir():
        registry = open_registry(location)
        return registry.load(version) if version else registry.load_current()
    ckpt = load_checkpoint(Path(location))
    if version and ckpt.version != version:
        raise ValueError(f"{location} holds gate {ckpt.version}, not the requested {version}")
    return ckpt
