"""The typed rows of the traffic store: one TrafficRecord per request, FeedbackRecords beside it.

`to_row`/`record_from_row` convert between them and the column values of orchestrator/store/schema.py; a
record written and read back compares equal (except NUL characters in text, see `_text`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# Parameter names that could carry credentials; never persisted even if a future schema passes them on.
_SECRET_WORDS = ("api_key", "apikey", "authorization", "secret", "password", "bearer")


@dataclass(frozen=True)
class TrafficRecord:
    """Everything about one served (or rejected) request that retraining and auditing need."""

    request_id: str
    created: float                       # unix seconds when the request arrived
    endpoint: str                        # "completions" | "chat.completions"
    model: str                           # "ensemble", an expert name, or what the client asked for
    params: dict                         # validated sampling parameters; never headers or keys
    prompt_ids: tuple[int, ...] = ()
    prompt_text: str = ""
    output_ids: tuple[int, ...] = ()
    output_text: str = ""
    routing_experts: tuple[tuple[str, ...], ...] = ()
    routing_weights: tuple[tuple[float, ...], ...] = ()
    gate_entropy: tuple[float, ...] = ()
    logprobs: tuple[float, ...] = ()
    gate_version: str = ""
    ttft_s: float | None = None
    duration_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int = 200
    # False for the provisional row written when generation starts: if the process is killed before the
    # request ends (e.g. a shutdown deadline), the request is still on record, marked incomplete.
    complete: bool = True
    key_name: str | None = None          # the API key's name once keys exist; never the key itself
    # Output positions whose gate choice was routed around an expert that could not answer (degraded routing).
    degraded_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class FeedbackRecord:
    feedback_id: str
    request_id: str
    created: float
    rating: int                          # 1 good, 0 neutral, -1 bad
    corrected_text: str | None = None


COLUMNS = tuple(f.name for f in fields(TrafficRecord))
FEEDBACK_COLUMNS = tuple(f.name for f in fields(FeedbackRecord))
_TEXT = ("prompt_text", "output_text", "error", "corrected_text")


def scrub(params: dict) -> dict:
    return {k: v for k, v in params.items() if not any(w in k.lower() for w in _SECRET_WORDS)}


def _text(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL; a client may send one. Both backends store U+FFFD instead, so the row
    # is kept (and identical on either backend); the token ids still say exactly what was sent.
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def to_row(item: TrafficRecord | FeedbackRecord) -> dict:
    """Column values of a record. Field by field, not dataclasses.asdict: the values are immutable (tuples,
    strings, numbers) but for `params`, which is copied by `scrub`, and asdict's recursive deep copy of the
    per-token tuples was the traffic-log writer's largest cost (3 % of the gateway's samples at c=32)."""
    names = COLUMNS if isinstance(item, TrafficRecord) else FEEDBACK_COLUMNS
    row = {k: getattr(item, k) for k in names}
    if isinstance(item, TrafficRecord):
        row["params"] = scrub(row["params"])
    for k in _TEXT:
        if k in row:
            row[k] = _text(row[k])
    return row


def record_from_row(row: Mapping) -> TrafficRecord:
    d = dict(row)
    d["routing_experts"] = tuple(tuple(x) for x in d["routing_experts"])
    d["routing_weights"] = tuple(tuple(x) for x in d["routing_weights"])
    for c in ("prompt_ids", "output_ids", "gate_entropy", "logprobs", "degraded_tokens"):
        d[c] = tuple(d.get(c) or ())
    d["complete"] = bool(d.get("complete", True))        # logs older than provisional rows: all final
    return TrafficRecord(**d)


def feedback_from_row(row: Mapping) -> FeedbackRecord:
    return FeedbackRecord(**dict(row))
