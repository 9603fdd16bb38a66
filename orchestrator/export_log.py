"""`ensemble export-log`: the traffic store (SQLite or PostgreSQL; old per-replica files too) -> Parquet.

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

from orchestrator.store import (
    FeedbackRecord,
    StoreError,
    TrafficRecord,
    iter_feedback,
    iter_records,
    redact,
    traffic_log_exists,
)

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
        ("key_name", pa.string()),
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


def _unique_records(stores: list[str | Path], since: float | None, counter: dict,
                    keys: list[str] | None = None) -> Iterator[dict]:
    seen: set[str] = set()
    for store in stores:
        for rec in iter_records(store, since=since, keys=keys):
            if rec.request_id not in seen:      # one store holds each id once; old per-replica copies might not
                seen.add(rec.request_id)
                counter["requests"] += 1
                yield _request_row(rec)


def export(stores: list[str | Path], out: Path, since: float | None = None, keys: list[str] | None = None) -> dict:
    """`stores`: URLs or SQLite file paths -> {"requests": n, "feedback": m, "out": str(out)}; `keys`: only
    requests made with these API keys (by name), and only the feedback on those requests."""
    import pyarrow.dataset as ds

    missing = [redact(str(s)) for s in stores if not traffic_log_exists(s)]
    if missing:
        raise FileNotFoundError(f"traffic log not found: {', '.join(missing)}")
    counter = {"requests": 0, "feedback": 0}
    schema = request_schema()
    exported: set[str] | None = set() if keys is not None else None
    rows = _unique_records(stores, since, counter, keys)
    if exported is not None:
        rows = (exported.add(r["request_id"]) or r for r in rows)
    ds.write_dataset(_batches(rows, schema), out / "requests", schema=schema,
                     format="parquet", partitioning=["date"], partitioning_flavor="hive",
                     existing_data_behavior="delete_matching", basename_template="part-{i}.parquet")
    fb_schema = feedback_schema()
    feedback: dict[str, FeedbackRecord] = {f.feedback_id: f for s in stores for f in iter_feedback(s)
                                           if exported is None or f.request_id in exported}
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
    parser.add_argument("--store", action="append", metavar="URL",
                        help="traffic store URL (sqlite:///FILE or postgresql://...), repeatable; default: "
                             "ENSEMBLE_STORE_URL, else traffic_log.url of --config")
    parser.add_argument("--db", action="append", type=Path,
                        help="a SQLite traffic log file, repeatable (e.g. the per-replica files of older versions)")
    parser.add_argument("--config", type=Path, default=None,
                        help="deploy config whose traffic store to export (default: deploy/local.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the Parquet dataset")
    parser.add_argument("--since", default=None, help="only requests created at/after this unix time or ISO date")
    parser.add_argument("--keys", default=None, metavar="NAME,NAME",
                        help="only requests made with these API keys (and the feedback on them)")


def run(args: argparse.Namespace) -> int:
    stores: list[str | Path] = [*(getattr(args, "store", None) or []), *(args.db or [])]
    if not stores:
        from deploy.config import load_config  # the CLI may read the service's config; the library never does

        stores = [load_config(args.config).app.traffic_log.database_url()]
    t0 = time.perf_counter()
    try:
        keys = [n.strip() for n in args.keys.split(",") if n.strip()] if getattr(args, "keys", None) else None
        summary = export(stores, args.out, _parse_since(args.since), keys)
    except (FileNotFoundError, StoreError) as exc:
        print(f"ensemble export-log: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0
