"""Traffic log: WAL SQLite, non-blocking writes, idempotent by request id, nothing lost on close, no secrets."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

from orchestrator.traffic_log import TrafficLog, TrafficRecord, iter_feedback, iter_records


def record(i: int, **kw) -> TrafficRecord:
    return TrafficRecord(
        request_id=f"cmpl-{i}", created=1000.0 + i, endpoint="completions", model="ensemble",
        params={"temperature": 0.5, "max_tokens": 3, **kw.pop("params", {})}, prompt_ids=(0, 5, 6),
        prompt_text="hi", output_ids=(7, 8, 9), output_text="abc",
        routing_experts=(("code", "math"), ("code", "prose"), ("json", "code")),
        routing_weights=((0.7, 0.3), (0.6, 0.4), (0.5, 0.5)), gate_entropy=(1.1, 1.2, 1.3),
        logprobs=(-0.1, -0.2, -0.3), gate_version="gate-v1", ttft_s=0.01, duration_s=0.05,
        finish_reason="length", **kw)


def test_round_trip_preserves_every_field(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    log.write(record(1))
    log.close()
    (got,) = list(iter_records(tmp_path / "t.db"))
    assert got == record(1)
    mode = sqlite3.connect(tmp_path / "t.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_duplicate_request_ids_are_stored_once(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    for _ in range(3):
        log.write(record(1))
    log.write(record(1, error="late duplicate"))
    log.close()
    rows = list(iter_records(tmp_path / "t.db"))
    assert len(rows) == 1 and rows[0].error is None      # first write wins


def test_close_mid_load_loses_and_duplicates_nothing(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db", batch_size=16)
    n_threads, per_thread = 8, 250

    def producer(t: int) -> None:
        for i in range(per_thread):
            log.write(record(t * per_thread + i))

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()                                   # graceful stop while the writer is still busy
    ids = [r.request_id for r in iter_records(tmp_path / "t.db")]
    assert len(ids) == n_threads * per_thread == len(set(ids))


async def test_write_never_blocks_the_event_loop(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    assert log.flush()                            # the writer is up and idle (its schema setup also writes)
    hold = sqlite3.connect(tmp_path / "t.db", timeout=10)
    hold.execute("BEGIN IMMEDIATE")               # another writer holds the lock: inserts must wait
    t0 = time.perf_counter()
    for i in range(200):
        log.write(record(i))
        await asyncio.sleep(0)
    assert time.perf_counter() - t0 < 0.5
    hold.rollback()
    hold.close()
    assert await asyncio.to_thread(log.flush, 30)
    assert len(list(iter_records(tmp_path / "t.db"))) == 200
    log.close()


def test_secrets_in_params_are_never_stored(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    log.write(record(1, params={"api_key": "sk-1", "Authorization": "Bearer x", "user": "u1"}))
    log.close()
    raw = (tmp_path / "t.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("t.db-*"))
    assert b"sk-1" not in raw and b"Bearer" not in raw
    assert next(iter_records(tmp_path / "t.db")).params["user"] == "u1"


def test_feedback_is_kept_alongside_requests(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    log.write(record(1))
    assert log.flush() and log.has_request("cmpl-1") and not log.has_request("cmpl-2")
    fb = log.add_feedback("cmpl-1", 1, "a better answer")
    log.close()
    assert list(iter_feedback(tmp_path / "t.db")) == [fb]


def test_late_writes_after_close_are_dropped_not_raised(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    log.close()
    log.write(record(1))
    log.close()                                   # idempotent
    assert list(iter_records(tmp_path / "t.db")) == []


def test_read_since_filters_by_arrival_time(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    for i in range(5):
        log.write(record(i))
    log.close()
    assert [r.request_id for r in iter_records(tmp_path / "t.db", since=1003.0)] == ["cmpl-3", "cmpl-4"]
    assert [r.request_id for r in iter_records(tmp_path / "t.db", until=1001.0)] == ["cmpl-0"]
    assert [r.request_id for r in iter_records(tmp_path / "t.db", since=1001.0, until=1003.0)] == ["cmpl-1", "cmpl-2"]


def test_export_log_writes_partitioned_parquet_without_duplicates(tmp_path) -> None:
    import argparse
    import json

    import pyarrow.dataset as ds

    from orchestrator.export_log import add_arguments, run

    for name, ids in (("a.db", range(30)), ("b.db", range(20, 50))):      # overlapping copies
        log = TrafficLog(tmp_path / name)
        for i in ids:
            log.write(record(i))
        log.add_feedback("cmpl-3", -1)
        log.close()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--db", str(tmp_path / "a.db"), "--db", str(tmp_path / "b.db"), "--out", str(out)])
    assert run(args) == 0 and run(args) == 0                                # idempotent re-export
    table = ds.dataset(out / "requests", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 50 and len(set(table.column("request_id").to_pylist())) == 50
    row = table.filter(ds.field("request_id") == "cmpl-1").to_pylist()[0]
    assert row["output_ids"] == [7, 8, 9] and row["routing_experts"][0] == ["code", "math"]
    assert json.loads(row["params"])["max_tokens"] == 3 and row["date"] == "1970-01-01"
    assert ds.dataset(out / "feedback", format="parquet").to_table().num_rows == 2


def test_export_log_reports_a_missing_database(tmp_path, capsys) -> None:
    import argparse

    from orchestrator.export_log import run

    assert run(argparse.Namespace(db=[tmp_path / "nope.db"], config=None, out=tmp_path / "o", since=None)) == 1
    assert "not found" in capsys.readouterr().err


def test_a_provisional_row_is_replaced_once_by_the_final_one(tmp_path) -> None:
    import dataclasses

    log = TrafficLog(tmp_path / "t.db")
    log.write(dataclasses.replace(record(1), output_ids=(), complete=False, status=0))
    log.write(record(1))                                    # the request finished: replaces the provisional row
    log.write(dataclasses.replace(record(1), error="a late second final write"))    # ignored
    log.write(dataclasses.replace(record(2), complete=False, status=0))             # killed mid-request
    log.close()
    rows = {r.request_id: r for r in iter_records(tmp_path / "t.db")}
    assert rows["cmpl-1"] == record(1)
    assert rows["cmpl-2"].complete is False and rows["cmpl-2"].status == 0
