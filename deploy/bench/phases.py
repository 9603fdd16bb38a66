"""Where our per-token wall time goes: the gateway's phase counters, scraped from /metrics around a run.

The gateway counts seconds per phase (`ensemble_phase_seconds_total{phase=...}`, orchestrator/profile.py)
and generated tokens (`ensemble_completion_tokens_total`); a run's breakdown is the delta of both. It also
counts what it asked the experts to compute (`ensemble_expert_work_{rows,tokens}_total{kind=...}`, orchestrator/
decode_loop.py) and the requests' prompt tokens, so a run says how many context tokens the experts prefilled
per generated token, against the prompt tokens one model alone would prefill (vLLM serving one expert).
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deploy.bench.report import orchestration_share

PHASE_METRIC = "ensemble_phase_seconds"
TOKENS_METRIC = "ensemble_completion_tokens"
PROMPT_METRIC = "ensemble_prompt_tokens"
WORK_METRIC = "ensemble_expert_work"
WORK_KINDS = ("prompt", "join", "advance")


async def scrape(base_url: str) -> dict[str, float]:
    """{phase: seconds, "_tokens": completion tokens, "_prompt_tokens": prompt tokens, "_work_<kind>_<unit>":
    expert work} summed over label sets."""
    async with httpx.AsyncClient(timeout=30) as client:
        return parse((await client.get(f"{base_url}/metrics")).text)


def parse(text: str) -> dict[str, float]:
    """scrape() of a /metrics page already read."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{PHASE_METRIC}_total":
                out[s.labels["phase"]] = out.get(s.labels["phase"], 0.0) + s.value
            elif s.name == f"{TOKENS_METRIC}_total":
                out["_tokens"] = out.get("_tokens", 0.0) + s.value
            elif s.name == f"{PROMPT_METRIC}_total":
                out["_prompt_tokens"] = out.get("_prompt_tokens", 0.0) + s.value
            elif s.name.startswith(f"{WORK_METRIC}_") and s.name.endswith("_total"):
                unit = s.name[len(WORK_METRIC) + 1:-len("_total")]
                key = f"_work_{s.labels['kind']}_{unit}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _phases(d: dict[str, float]) -> dict[str, float]:
    """The phase seconds of a delta (its other keys start with "_")."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def share_of(d: dict[str, float]) -> float | None:
    """The orchestration share of one delta (report.orchestration_share over its phases)."""
    return orchestration_share(_phases(d))


def per_token(target: str, concurrency: int, d: dict[str, float],
              share_rounds: list[float | None] | None = None) -> dict:
    """One configuration's breakdown from the sum `d` of its rounds' deltas; `share_rounds`, each round's own
    orchestration share (as the throughput ratios give theirs), shows how far the share moves inside one run
    ([] for a configuration without rounds of its own, such as model=<expert>, which streams natively)."""
    tokens = d.get("_tokens", 0.0)
    phases = _phases(d)
    us = {k: round(1e6 * v / tokens, 1) for k, v in phases.items()} if tokens else {}
    rounds = list(share_rounds or [])
    return {"target": target, "concurrency": concurrency, "tokens": int(tokens), "us_per_token": us,
            "orchestration_share": orchestration_share(phases),
            "orchestration_share_rounds": rounds if any(r is not None for r in rounds) else [],
            "expert_work": expert_work(d)}


def expert_work(d: dict[str, float]) -> dict | None:
    """Per generated token: context tokens the experts prefilled (sessions opened with the prompt, or joined
    mid-sequence with the whole context), rows advanced and their tokens; and `prefill_x_one_model`, those
    prefilled tokens over the requests' prompt tokens, i.e. over what one model alone prefills for the same
    requests. None for a run without lockstep sequences (model=<expert> streams natively)."""
    tokens = d.get("_tokens", 0.0)
    if not tokens or not any(d.get(f"_work_{k}_rows", 0.0) for k in WORK_KINDS):
        return None
    prefill = d.get("_work_prompt_tokens", 0.0) + d.get("_work_join_tokens", 0.0)
    prompt = d.get("_prompt_tokens", 0.0)
    return {"prefill_tokens": round(prefill / tokens, 2),
            "prompt_opens": round(d.get("_work_prompt_rows", 0.0) / tokens, 4),
            "join_opens": round(d.get("_work_join_rows", 0.0) / tokens, 4),
            "advance_rows": round(d.get("_work_advance_rows", 0.0) / tokens, 3),
            "advance_tokens": round(d.get("_work_advance_tokens", 0.0) / tokens, 3),
            "prefill_x_one_model": round(prefill / prompt, 2) if prompt else None}
