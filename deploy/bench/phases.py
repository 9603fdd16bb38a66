"""Where our per-token wall time goes: the gateway's phase counters, scraped from /metrics around a run.

The gateway counts seconds per phase (`ensemble_phase_seconds_total{phase=...}`, orchestrator/profile.py)
and generated tokens (`ensemble_completion_tokens_total`); a run's breakdown is the delta of both.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.bench.report import orchestration_share

PHASE_METRIC = "ensemble_phase_seconds"
TOKENS_METRIC = "ensemble_completion_tokens"


async def scrape(base_url: str) -> dict[str, float]:
    """{phase: seconds, "_tokens": completion tokens} summed over label sets."""
    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{PHASE_METRIC}_total":
                out[s.labels["phase"]] = out.get(s.labels["phase"], 0.0) + s.value
            elif s.name == f"{TOKENS_METRIC}_total":
                out["_tokens"] = out.get("_tokens", 0.0) + s.value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def per_token(target: str, concurrency: int, d: dict[str, float]) -> dict:
    tokens = d.get("_tokens", 0.0)
    phases = {k: v for k, v in d.items() if not k.startswith("_")}
    us = {k: round(1e6 * v / tokens, 1) for k, v in phases.items()} if tokens else {}
    return {"target": target, "concurrency": concurrency, "tokens": int(tokens), "us_per_token": us,
            "orchestration_share": orchestration_share(phases)}
