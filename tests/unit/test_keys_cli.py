"""`ensemble keys add|list|revoke` on a store URL, and retraining/export limited to chosen keys (`--keys`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from orchestrator.cli import main
from orchestrator.keys import KeyStore
from orchestrator.store import TrafficLog, TrafficRecord


def test_add_prints_the_key_once_list_never_does_and_revoke_works(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    assert main(["keys", "add", "team-a", "--rpm", "10", "--max-streams", "2", "--json", "--store", url]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["name"] == "team-a" and made["key"].startswith("ens-") and made["rpm"] == 10
    assert main(["keys", "--store", url, "add", "boss", "--scope", "admin"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().startswith("ens-") and "only time" in err
    assert main(["keys", "list", "--store", url]) == 0
    listing = capsys.readouterr().out
    assert "team-a" in listing and "admin" in listing and "ens-" not in listing
    assert main(["keys", "revoke", "team-a", "--store", url]) == 0
    assert [k.name for k in KeyStore(url).active().values()] == ["boss"]
    assert main(["keys", "revoke", "team-a", "--store", url]) == 1
    assert main(["keys", "add", "boss", "--store", url]) == 1
    assert "exists already" in capsys.readouterr().err


def _record(i: int, key: str | None) -> TrafficRecord:
    return TrafficRecord(f"cmpl-{i}", 1000.0 + i, "completions", "ensemble", {}, (1, 2), "x", (3,), "y",
                         (("code", "math"),), ((0.5, 0.5),), (0.7,), (-0.1,), "gate-v1", key_name=key)


@pytest.fixture
def store(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 't.db'}"
    log = TrafficLog(url)
    for i, key in enumerate(["a", "b", None, "a"]):
        log.write(_record(i, key))
    for i in range(4):
        log.add_feedback(f"cmpl-{i}", 1)
    log.close()
    return url


def test_retrain_reads_only_the_chosen_keys_traffic(store, tmp_path) -> None:
    from deploy.retrain_job import add_arguments, read_log
    from orchestrator.export_log import export

    args = SimpleNamespace(parquet=None, ray_data=False, store=store, log=None, since=None, until=None, keys=["a"])
    records, _ = read_log(None, args)
    assert [r.request_id for r in records] == ["cmpl-0", "cmpl-3"]
    args.keys = None
    assert len(read_log(None, args)[0]) == 4
    summary = export([store], tmp_path / "pq", keys=["b"])
    assert summary["requests"] == 1 and summary["feedback"] == 1
    export([store], tmp_path / "all")
    pq = SimpleNamespace(parquet=tmp_path / "all", ray_data=False, since=None, until=None, keys=["a", "b"])
    assert sorted(r.request_id for r in read_log(None, pq)[0]) == ["cmpl-0", "cmpl-1", "cmpl-3"]
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--keys", "a, b"]).keys == ["a", "b"]
