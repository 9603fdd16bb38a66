"""Gateway replicas report their live gate version in the shared store (orchestrator/store/replica_status.py)."""

from __future__ import annotations

from orchestrator.store.replica_status import replica_reports, report_replica


def test_each_replica_has_one_row_that_its_last_report_overwrites(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    report_replica(url, "a", "gate-v1", None)
    report_replica(url, "b", "gate-v1", None)
    report_replica(url, "a", "gate-v2", None)
    report_replica(url, "b", "gate-v1", "gate gate-v2 not loaded: bad file")
    got = replica_reports(url, ["a", "b", "gone"])
    assert set(got) == {"a", "b"}
    assert got["a"]["gate_version"] == "gate-v2" and got["a"]["gate_error"] is None
    assert got["b"]["gate_version"] == "gate-v1" and "bad file" in got["b"]["gate_error"]
    assert replica_reports(url, []) == {}
