"""The gate registry in a database (SQLite file or a real PostgreSQL) behaves as the directory registry does:
versions, promotion, the live pointer, history, restore; the CLI and the gateway's loader take either."""

from __future__ import annotations

import json

import pytest
import torch

from gating.checkpoint import (
    GateCheckpoint,
    GateRegistry,
    load_checkpoint,
    load_gate_checkpoint,
    open_registry,
)
from gating.model import Gate, GateArgs
from gating.registry_store import StoreGateRegistry

NAMES = ["code", "prose", "math", "json"]
ARGS = GateArgs(64, len(NAMES), 8, 8)


def checkpoint(version: str, seed: int, parent: str | None = None) -> GateCheckpoint:
    torch.manual_seed(seed)
    return GateCheckpoint(version, ARGS, Gate(ARGS).state_dict(), NAMES, "fp", 2, "probs", parent=parent,
                          metrics={"val_nll": 1.0 + seed, "nan_is_fine": float("nan")})


@pytest.fixture(params=["directory", "sqlite", "postgresql"])
def location(request, tmp_path) -> str:
    if request.param == "directory":
        return str(tmp_path / "gate")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_server").new_database()


def same_weights(a: GateCheckpoint, b: GateCheckpoint) -> bool:
    return a.state_dict.keys() == b.state_dict.keys() and all(torch.equal(a.state_dict[k], b.state_dict[k])
                                                              for k in a.state_dict)


def test_open_registry_picks_the_backend_from_the_location(location) -> None:
    reg = open_registry(location)
    assert isinstance(reg, GateRegistry if location.startswith("/") else StoreGateRegistry)
    assert reg.versions() == [] and reg.current() is None and reg.history() == []
    assert reg.next_version() == "gate-v1"
    with pytest.raises(FileNotFoundError, match="no live gate"):
        reg.load_current()


def test_promote_current_history_and_restore(location) -> None:
    reg = open_registry(location)
    for i, promote in enumerate((True, False, True), start=1):
        reg.add(checkpoint(reg.next_version(), seed=i, parent=reg.current()), promote=promote, reason=f"r{i}")
    assert reg.versions() == ["gate-v1", "gate-v2", "gate-v3"] and reg.current() == "gate-v3"
    assert same_weights(reg.load_current(), checkpoint("gate-v3", seed=3))
    assert reg.load("gate-v2").parent == "gate-v1" and reg.load("gate-v2").metrics["val_nll"] == 3.0

    reg.set_current("gate-v1", reason="rollback")
    assert reg.current() == "gate-v1" and reg.load_current().version == "gate-v1"
    with pytest.raises(FileNotFoundError, match="unknown gate version 'gate-v9'"):
        reg.set_current("gate-v9")
    assert reg.current() == "gate-v1"
    with pytest.raises(FileExistsError):
        reg.add(checkpoint("gate-v2", seed=7), promote=True)          # versions are immutable
    assert same_weights(reg.load("gate-v2"), checkpoint("gate-v2", seed=2)) and reg.current() == "gate-v1"

    history = reg.history()
    assert [h["event"] for h in history] == ["added", "live", "added", "added", "live", "live"]
    assert [(h["version"], h.get("previous"), h.get("reason")) for h in history if h["event"] == "live"] == [
        ("gate-v1", None, "r1"), ("gate-v3", "gate-v1", "r3"), ("gate-v1", "gate-v3", "rollback")]
    assert all(isinstance(h["time"], float) for h in history)

    # Callers that want a file (reports, resolve_gate_path) get one holding exactly that version.
    assert load_checkpoint(reg.path_of("gate-v3")).version == "gate-v3"
    assert load_checkpoint(reg.current_path()).version == "gate-v1"
    again = open_registry(location)                      # another process / node sees the same registry
    assert again.versions() == reg.versions() and again.current() == "gate-v1"


def test_the_gateway_loads_a_pinned_or_live_version_from_either(location) -> None:
    from orchestrator.gateway import GateSource, load_gate

    reg = open_registry(location)
    for i in (1, 2):
        reg.add(checkpoint(reg.next_version(), seed=i), promote=True)
    assert load_gate_checkpoint(location).version == "gate-v2"
    assert load_gate(GateSource(path=location), NAMES, "fp", 2, None).version == "gate-v2"
    assert load_gate(GateSource(path=location, version="gate-v1"), NAMES, "fp", 2, None).version == "gate-v1"
    with pytest.raises(FileNotFoundError):
        load_gate(GateSource(path=location, version="gate-v5"), NAMES, "fp", 2, None)


def test_gate_history_cli_lists_and_restores_a_database_registry(location, capsys) -> None:
    from orchestrator.cli import parse_command

    reg = open_registry(location)
    for i in (1, 2):
        reg.add(checkpoint(reg.next_version(), seed=i), promote=True)

    def run(*argv: str) -> int:
        module, args = parse_command("gate-history", list(argv))
        return module.run(args)

    base = ["--registry", location, "--no-swap"]
    assert run(*base, "--restore", "gate-v1") == 0 and reg.current() == "gate-v1"
    assert run(*base, "--restore", "gate-v9") == 2 and reg.current() == "gate-v1"
    assert "unknown gate version 'gate-v9'" in capsys.readouterr().err
    assert run("--registry", location, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["live"]) for r in rows] == [("gate-v1", True), ("gate-v2", False)]


def test_a_config_gate_in_the_store_follows_ensemble_store_url(tmp_path, monkeypatch) -> None:
    """`gate.path: store` in a YAML: the registry sits in the store's database, and in each process that
    opens it ENSEMBLE_STORE_URL (which carries the password) names that database."""
    from deploy.config import parse_app_args

    db = f"sqlite:///{tmp_path / 'shared.db'}"
    reg = open_registry(db)
    reg.add(checkpoint("gate-v1", seed=1), promote=True)
    app = parse_app_args({"experts": [{"name": n, "model_path": str(tmp_path)} for n in NAMES],
                          "traffic_log": {"url": "sqlite:///placeholder-not-used.db"}, "gate": {"path": "store"}})
    monkeypatch.setenv("ENSEMBLE_STORE_URL", db)
    assert app.gate.location() == db
    assert open_registry(app.gate.location()).load_current().version == "gate-v1"
