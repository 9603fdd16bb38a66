"""`ensemble export-log`: the traffic log (one or more SQLite files) -> Parquet, for retraining at scale.

Writes OUT/requests/date=YYYY-MM-DD/*.parquet (hive partitions, streamed in batches, deduplicated by request id)
and OUT/feedback/*.parquet; re-exporting replaces the partitions it writes, so the command is idempotent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.traffic_log import FeedbackRecord, TrafficRecord, iter_feedback, iter_records

BATCH_ROWS = 10_000


def request_schema():
    import pyarrow as pa

    return pa.schema([
        ("request_id", pa.string()), ("created", pa.float64()), ("date", pa.string()),
        ("endpoint", pa.string()), ("model", pa.string()), ("params", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())), ("prompt_text", pa.string()),
        ("output_ids", pa.list_(pa.int32())), ("output_text", pa.string()),
        ("routing_experts", pa.list_(pa.list_(pa.string()))), ("routing_weights", pa.list_(pa.list_(pa.float32()))),
        ("gate_entropy", pa.list_(pa.float32())), ("logprobs", pa.list_(pa.float32())),
        ("gate_version", pa.string()), ("ttft_s", pa.float64()), ("duration_s", pa.float64()),
        ("finish_reason", pa.string()), ("error", pa.string()), ("status", pa.int32()), ("complete", pa.bool_()),
    ])


def feedback_schema():
    import pyarrow as pa

    return pa.schema([("feedback_id", pa.string()), ("request_id", pa.string()), ("created", pa.float64()),
                      ("rating", pa.int8()), ("corrected_text", pa.string())])


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def _request_row(r: TrafficRecord) -> dict:
    return {**r.__dict__, "date": _date(r.created), "params": json.dumps(r.params, separators=(",", ":")),
            "routing_experts": [list(x) for x in r.routing_experts],
            "routing_weights": [list(x) for x in r.routing_weights]}


def _batches(rows: Iterable[dict], schema) -> Iterator:
    import pyarrow as pa

    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= BATCH_ROWS:
            yield pa.RecordBatch.from_pylist(chunk, schema=schema)
            chunk = []
    if chunk:
        yield pa.RecordBatch.from_pylist(chunk, schema=schema)


def _unique_records(dbs: list[Path], since: float | None, counter: dict) -> Iterator[dict]:
    seen: set[str] = set()
    for db in dbs:
        for rec in iter_records(db, since=since):
            if rec.request_id not in seen:      # replicas never share ids; copies of one file might
                seen.add(rec.request_id)
                counter["requests"] += 1
                yield _request_row(rec)


def export(dbs: list[Path], out: Path, since: float | None = None) -> dict:
    """-> {"requests": n, "feedback": m, "out": str(out)}."""
    import pyarrow.dataset as ds

    missing = [str(db) for db in dbs if not Path(db).exists()]
    if missing:
        raise FileNotFoundError(f"traffic log not found: {', '.join(missing)}")
    counter = {"requests": 0, "feedback": 0}
    schema = request_schema()
    ds.write_dataset(_batches(_unique_records(dbs, since, counter), schema), out / "requests", schema=schema,
                     format="parquet", partitioning=["date"], partitioning_flavor="hive",
                     existing_data_behavior="delete_matching", basename_template="part-{i}.parquet")
    fb_schema = feedback_schema()
    feedback: dict[str, FeedbackRecord] = {f.feedback_id: f for db in dbs for f in iter_feedback(db)}
    counter["feedback"] = len(feedback)
    ds.write_dataset(_batches((f.__dict__ for f in feedback.values()), fb_schema), out / "feedback",
                     schema=fb_schema, format="parquet", existing_data_behavior="delete_matching",
                     basename_template="part-{i}.parquet")
    return {**counter, "out": str(out)}


def _parse_since(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", action="append", type=Path,
                        help="traffic log SQLite file (repeat for one file per replica); "
                             "default: traffic_log.path of --config")
    parser.add_argument("--config", type=Path, default=None,
                        help="deploy config whose traffic log to export (default: deploy/local.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the Parquet dataset")
    parser.add_argument("--since", default=None, help="only requests created at/after this unix time or ISO date")


def run(args: argparse.Namespace) -> int:
    dbs = args.db
    if not dbs:
        from deploy.config import load_config  # the CLI may read the service's config; the library never does

        dbs = [Path(load_config(args.config).app.traffic_log.path)]
    t0 = time.perf_counter()
    try:
        summary = export(dbs, args.out, _parse_since(args.since))
    except FileNotFoundError as exc:
        print(f"ensemble export-log: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0
