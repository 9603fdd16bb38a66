"""The traffic store, on SQLite and on a real PostgreSQL: each request stored exactly once by id, feedback
through any replica, time windows, nothing blocking the event loop, no secrets, and nothing lost while the
database is down (buffered and counted, then written once it returns)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import sqlite3
import threading
import time

import pytest

from orchestrator.store import (
    ENV_VAR,
    StoreError,
    TrafficLog,
    TrafficRecord,
    iter_feedback,
    iter_records,
    registry_location,
    resolve_store_url,
)


def record(i: int, **kw) -> TrafficRecord:
    return TrafficRecord(
        request_id=f"cmpl-{i}", created=1000.0 + i, endpoint="completions", model="ensemble",
        params={"temperature": 0.5, "max_tokens": 3, **kw.pop("params", {})}, prompt_ids=(0, 5, 6),
        prompt_text="hi", output_ids=(7, 8, 9), output_text="abc",
        routing_experts=(("code", "math"), ("code", "prose"), ("json", "code")),
        routing_weights=((0.7, 0.3), (0.6, 0.4), (0.5, 0.5)), gate_entropy=(1.1, 1.2, 1.3),
        logprobs=(-0.1, -0.2, -0.3), gate_version="gate-v1", ttft_s=0.01, duration_s=0.05,
        finish_reason="length", **kw)


def provisional(i: int) -> TrafficRecord:
    return dataclasses.replace(record(i), output_ids=(), complete=False, status=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty store: a SQLite file, or a new database on the throwaway PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 't.db'}"
    return request.getfixturevalue("postgres_server").new_database()


# ---- the same behaviour on both backends ---------------------------------------------------------------


def test_round_trip_preserves_every_field(store_url) -> None:
    log = TrafficLog(store_url)
    log.write(record(1, key_name="team-a"))
    log.close()
    assert list(iter_records(store_url)) == [record(1, key_name="team-a")]


def test_duplicate_request_ids_are_stored_once(store_url) -> None:
    log = TrafficLog(store_url)
    for _ in range(3):
        log.write(record(1))
    log.write(record(1, error="late duplicate"))
    log.close()
    rows = list(iter_records(store_url))
    assert len(rows) == 1 and rows[0].error is None      # first write wins


@pytest.mark.parametrize("separate_commits", [False, True])
def test_a_provisional_row_is_replaced_once_by_the_final_one(store_url, separate_commits) -> None:
    log = TrafficLog(store_url)
    writes = [provisional(1), record(1),                                       # finished: replaces it
              dataclasses.replace(record(1), error="a late second final write"),   # never overwrites the final
              provisional(1),                                                  # nor does a replayed provisional
              dataclasses.replace(provisional(2), output_ids=(7,))]            # killed mid-request
    for w in writes:
        log.write(w)
        if separate_commits:                     # one transaction per row instead of one batch for all
            assert log.flush()
    log.close()
    rows = {r.request_id: r for r in iter_records(store_url)}
    assert rows["cmpl-1"] == record(1)
    assert rows["cmpl-2"].complete is False and rows["cmpl-2"].status == 0 and rows["cmpl-2"].output_ids == (7,)


def test_close_mid_load_loses_and_duplicates_nothing(store_url) -> None:
    log = TrafficLog(store_url, batch_size=16)
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
    ids = [r.request_id for r in iter_records(store_url)]
    assert len(ids) == n_threads * per_thread == len(set(ids))
    assert log.stats().dropped == 0


def test_feedback_is_kept_alongside_requests(store_url) -> None:
    log = TrafficLog(store_url)
    log.write(record(1))
    assert log.flush() and log.has_request("cmpl-1") and not log.has_request("cmpl-2")
    fb = log.add_feedback("cmpl-1", 1, "a better answer")
    log.close()
    assert list(iter_feedback(store_url)) == [fb]


def test_read_since_until_filters_by_arrival_time(store_url) -> None:
    log = TrafficLog(store_url)
    for i in (4, 2, 0, 3, 1):
        log.write(record(i))
    log.close()
    assert [r.request_id for r in iter_records(store_url)] == [f"cmpl-{i}" for i in range(5)]
    assert [r.request_id for r in iter_records(store_url, since=1003.0)] == ["cmpl-3", "cmpl-4"]
    assert [r.request_id for r in iter_records(store_url, until=1001.0)] == ["cmpl-0"]
    assert [r.request_id for r in iter_records(store_url, since=1001.0, until=1003.0)] == ["cmpl-1", "cmpl-2"]


def test_late_writes_after_close_are_counted_not_raised(store_url) -> None:
    log = TrafficLog(store_url)
    log.close()
    log.write(record(1))
    log.close()                                   # idempotent
    assert list(iter_records(store_url)) == [] and log.stats().dropped == 1


def test_secrets_are_never_stored_and_awkward_values_are(store_url) -> None:
    """Credentials are scrubbed; a NUL from a client (PostgreSQL text cannot hold it) and non-finite floats
    (PostgreSQL's json type rejects them) must not cost the row."""
    odd = dataclasses.replace(record(1, params={"api_key": "sk-1", "Authorization": "Bearer x", "user": "u1"}),
                              prompt_text="a\x00b", logprobs=(-math.inf, -0.2, -0.3), gate_entropy=(math.nan, 1.2, 1.3))
    log = TrafficLog(store_url)
    log.write(odd)
    log.close()
    (got,) = list(iter_records(store_url))
    assert got.params == {"temperature": 0.5, "max_tokens": 3, "user": "u1"}
    assert got.prompt_text == "a\ufffdb" and got.logprobs[0] == -math.inf and math.isnan(got.gate_entropy[0])
    assert log.stats().dropped == 0


def test_two_replicas_share_one_store_and_feedback_works_through_either(store_url) -> None:
    """Each gateway replica has its own writer on the one database: every request once, whichever replica
    served it; feedback is accepted by a replica that never saw the request."""
    started: list[TrafficLog] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            started.append(TrafficLog(store_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    starts = [threading.Thread(target=start) for _ in range(2)]
    for t in starts:                              # both create the schema at once, as replicas starting do
        t.start()                                 # (a new SQLite file: both switch it to WAL at once)
    for t in starts:
        t.join()
    assert not failed, failed
    a, b = started
    assert a.db_ok and b.db_ok
    for i in range(40):
        served_by = a if i % 2 else b
        served_by.write(provisional(i))
        served_by.write(record(i))
    b.write(record(1))                                     # a replayed final row on the other replica
    assert a.flush() and b.flush()
    assert b.has_request("cmpl-1") and a.has_request("cmpl-0")
    fb = b.add_feedback("cmpl-1", 1, "through the other replica")
    a.close()
    b.close()
    rows = list(iter_records(store_url))
    assert sorted(r.request_id for r in rows) == sorted(f"cmpl-{i}" for i in range(40))
    assert all(r == record(int(r.request_id.split("-")[1])) for r in rows)
    assert list(iter_feedback(store_url)) == [fb]


def test_stats_and_metrics_count_the_rows(store_url) -> None:
    from orchestrator.metrics import GatewayMetrics

    log, metrics = TrafficLog(store_url), GatewayMetrics()
    metrics.attach_store(log)
    for i in range(3):
        log.write(record(i))
    assert log.flush()
    text = metrics.render()[0].decode()
    for line in ("ensemble_traffic_log_written_rows_total 3.0", "ensemble_traffic_log_buffered_rows 0.0",
                 "ensemble_traffic_log_failed_rows 0.0", "ensemble_traffic_log_db_errors_total 0.0",
                 "ensemble_traffic_log_db_up 1.0"):
        assert line in text
    log.close()


# ---- the database goes away ----------------------------------------------------------------------------


def test_rows_written_while_postgres_is_down_arrive_exactly_once(postgres_server) -> None:
    """The server is really stopped (pg_ctl stop) while a producer writes: requests keep being accepted, the
    rows wait in the buffer (counted, nothing dropped), and once it is back every row is there once."""
    url = postgres_server.new_database()
    log = TrafficLog(url, batch_size=32, retry_min_s=0.02, retry_max_s=0.2)
    stop, sent = threading.Event(), []

    def producer() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            log.write(record(i))
            sent.append(i)
            time.sleep(0.001)          # pacing (about 1000 requests/s), not ordering

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        assert log.wait(lambda s: s.written >= 50, timeout=30)           # rows are flowing
        postgres_server.stop()
        try:
            assert log.wait(lambda s: not s.db_ok and s.buffered >= 200, timeout=30)
            during = log.stats()
            assert during.dropped == 0 and during.db_errors >= 1 and log.healthy
            t0 = time.monotonic()
            assert not log.flush()                     # says "not written yet" at once, does not hang
            assert time.monotonic() - t0 < 1
        finally:
            postgres_server.start()
        assert log.wait(lambda s: s.db_ok and s.written > during.written, timeout=60)
    finally:
        stop.set()
        thread.join()
    assert log.flush(timeout=60, wait_for_db=True)
    log.close()
    ids = [r.request_id for r in iter_records(url)]
    assert len(ids) == len(set(ids)) == len(sent) > during.written
    assert set(ids) == {f"cmpl-{i}" for i in sent}
    assert log.stats().dropped == 0 and log.stats().buffered == 0


def test_a_full_buffer_counts_and_logs_what_it_cannot_keep(caplog) -> None:
    """Nothing listens on this port: the database is down from the start. The gateway still starts and
    accepts requests; beyond the bound each row is counted as dropped and logged as an error."""
    from deploy.serve_env import free_port

    url = f"postgresql://postgres:secret-pw@127.0.0.1:{free_port()}/nowhere"
    with caplog.at_level(logging.ERROR, logger="orchestrator.store.writer"):
        log = TrafficLog(url, max_buffer_rows=10, retry_min_s=0.05, retry_max_s=0.05)
        for i in range(15):
            log.write(record(i))
        s = log.stats()
        assert (s.buffered, s.dropped, s.db_ok) == (10, 5, False) and log.healthy
        assert log.has_request("cmpl-3")                   # buffered here
        assert log.has_request("cmpl-99")                  # cannot ask the database: accept the feedback
        assert not log.flush()
        log.close(timeout=0.2)                             # still down at shutdown: the rest is counted too
    assert log.stats().dropped == 15 and log.stats().buffered == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("dropped" in m and "buffer is full" in m for m in errors)
    assert any("unreachable at shutdown" in m for m in errors)
    assert all("secret-pw" not in m for m in errors) and "secret-pw" not in log.url


def test_reading_an_unreachable_store_says_so() -> None:
    from deploy.serve_env import free_port

    with pytest.raises(StoreError, match="cannot reach"):
        list(iter_records(f"postgresql://postgres:pw@127.0.0.1:{free_port()}/nowhere"))


# ---- SQLite specifics ----------------------------------------------------------------------------------


def test_sqlite_store_is_a_wal_file_and_paths_still_work(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")                  # a plain path means that SQLite file
    log.write(record(1))
    log.close()
    assert list(iter_records(f"sqlite:///{tmp_path / 't.db'}")) == [record(1)]
    mode = sqlite3.connect(tmp_path / "t.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_secrets_never_reach_the_sqlite_file(tmp_path) -> None:
    log = TrafficLog(tmp_path / "t.db")
    log.write(record(1, params={"api_key": "sk-1", "Authorization": "Bearer x", "user": "u1"}))
    log.close()
    raw = (tmp_path / "t.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("t.db-*"))
    assert b"sk-1" not in raw and b"Bearer" not in raw
    assert next(iter_records(tmp_path / "t.db")).params["user"] == "u1"


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


def test_a_log_from_before_the_store_is_read_and_upgraded(tmp_path) -> None:
    """A file written by the old traffic_log.py (no `complete`, no `key_name`): readers see its rows as final
    without changing it; the first writer adds the columns."""
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE requests (request_id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL,
            model TEXT NOT NULL, params TEXT NOT NULL, prompt_ids TEXT NOT NULL, prompt_text TEXT NOT NULL,
            output_ids TEXT NOT NULL, output_text TEXT NOT NULL, routing_experts TEXT NOT NULL,
            routing_weights TEXT NOT NULL, gate_entropy TEXT NOT NULL, logprobs TEXT NOT NULL,
            gate_version TEXT NOT NULL, ttft_s REAL, duration_s REAL, finish_reason TEXT, error TEXT,
            status INTEGER NOT NULL);
        CREATE TABLE feedback (feedback_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, created REAL NOT NULL,
            rating INTEGER NOT NULL, corrected_text TEXT);
        INSERT INTO requests VALUES ('old-1', 5.0, 'completions', 'ensemble', '{"max_tokens":2}', '[1,2]', 'p',
            '[3]', 'o', '[["code","math"]]', '[[0.6,0.4]]', '[0.7]', '[-0.5]', 'gate-v1', 0.1, 0.2, 'length',
            NULL, 200);
    """)
    conn.commit()
    conn.close()
    (old,) = list(iter_records(db))
    assert old.complete is True and old.key_name is None and old.routing_experts == (("code", "math"),)
    assert "complete" not in {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(requests)")}
    log = TrafficLog(db)
    log.write(record(1))
    log.close()
    assert [r.request_id for r in iter_records(db)] == ["old-1", "cmpl-1"]


# ---- export -------------------------------------------------------------------------------------------


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


def test_export_log_reads_the_configured_store_by_url(store_url, tmp_path, monkeypatch) -> None:
    """No --db/--store: the config's store, which ENSEMBLE_STORE_URL overrides (here: either backend)."""
    import pyarrow.dataset as ds

    from orchestrator.cli import parse_command

    log = TrafficLog(store_url)
    for i in range(5):
        log.write(record(i))
    log.add_feedback("cmpl-2", 1)
    log.close()
    monkeypatch.setenv(ENV_VAR, store_url)
    module, args = parse_command("export-log", ["--out", str(tmp_path / "out")])
    assert module.run(args) == 0
    assert ds.dataset(tmp_path / "out" / "requests", format="parquet", partitioning="hive").count_rows() == 5
    module, args = parse_command("export-log", ["--store", store_url, "--out", str(tmp_path / "out2")])
    assert module.run(args) == 0
    assert ds.dataset(tmp_path / "out2" / "feedback", format="parquet").count_rows() == 1


def test_export_log_reports_a_missing_database(tmp_path, capsys) -> None:
    import argparse

    from orchestrator.export_log import run

    assert run(argparse.Namespace(db=[tmp_path / "nope.db"], config=None, out=tmp_path / "o", since=None)) == 1
    assert "not found" in capsys.readouterr().err


# ---- which store: config, URL, environment -------------------------------------------------------------


def test_config_url_env_override_and_the_old_path_key(tmp_path, monkeypatch) -> None:
    from deploy.config import PROJECT_ROOT, ConfigError, parse_app_args

    monkeypatch.delenv(ENV_VAR, raising=False)
    experts = [{"name": "code", "model_path": str(tmp_path)}]
    old = parse_app_args({"experts": experts, "top_k": 1, "traffic_log": {"path": "logs/t.db"}})
    assert old.traffic_log.url == f"sqlite:///{PROJECT_ROOT / 'logs/t.db'}"        # relative to the project
    assert old.traffic_log.path == str(PROJECT_ROOT / "logs/t.db")
    pg = "postgresql://ensemble@db.internal:5432/ensemble"
    app = parse_app_args({"experts": experts, "top_k": 1, "traffic_log": {"url": pg}, "gate": {"path": "store"}})
    assert app.traffic_log.url == app.gate.path == pg == app.gateway_settings().store_url
    assert app.missing_local_paths() == []                 # a registry in a database is not a local path
    secret = "postgresql://ensemble:pw@db.internal:5432/ensemble"
    monkeypatch.setenv(ENV_VAR, secret)
    assert app.traffic_log.database_url() == resolve_store_url(app.gateway_settings().store_url) == secret
    assert app.gate.location() == registry_location(app.gate.path) == secret
    assert registry_location(str(tmp_path)) == str(tmp_path)          # a directory registry is not redirected
    assert ":pw@" not in str(app.model_dump())          # the password never enters what Serve is sent
    with pytest.raises(ConfigError, match="traffic_log.*replica"):
        parse_app_args({"experts": experts, "top_k": 1, "traffic_log": {"path": "traffic-{replica}.db"}})
    with pytest.raises(ConfigError, match="traffic_log.url"):
        parse_app_args({"experts": experts, "top_k": 1, "traffic_log": {"url": "mysql://x/y"}})
