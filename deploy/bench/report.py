"""What `ensemble bench` prints: the side-by-side table, the ratios to vLLM alone, the phase breakdown, a plot.

All functions are pure over the summaries of deploy/bench/load.py (plus the scraped phase counters).
"""

from __future__ import annotations

from pathlib import Path

BASELINE = "vllm"
ORDER = ("vllm", "gateway_single", "ensemble_top1", "ensemble_top2")
# Phases of our per-token path, in the order they happen (orchestrator/profile.py names them).
# The gate's work is routing (gate) and the GRU step over each round's new tokens (gate_step).
ORCHESTRATION = ("gate", "gate_step", "mix", "sample", "rpc")


def by_key(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["target"], r["concurrency"]): r for r in rows}


def ratios(rows: list[dict]) -> dict:
    """The ratios the issue names, to vLLM alone in the same run (None where a side is missing)."""
    table = by_key(rows)
    levels = sorted({r["concurrency"] for r in rows})
    hi, lo = levels[-1], levels[0]

    def ratio(target: str, c: int, field: str) -> float | None:
        ours, base = table.get((target, c)), table.get((BASELINE, c))
        if not ours or not base or not ours.get(field) or not base.get(field):
            return None
        return round(ours[field] / base[field], 3)

    def over(target: str, c: int, field: str) -> float | None:
        ours, base = table.get((target, c)), table.get((BASELINE, c))
        if not ours or not base or ours.get(field) is None or base.get(field) is None:
            return None
        return round(ours[field] - base[field], 2)

    def per_round(target: str, c: int) -> list[float | None] | None:
        ours = (table.get((target, c)) or {}).get("rounds_tokens_per_s")
        base = (table.get((BASELINE, c)) or {}).get("rounds_tokens_per_s")
        if not ours or not base or len(ours) != len(base):
            return None
        return [round(o / b, 3) if b else None for o, b in zip(ours, base)]

    return {
        "concurrency_high": hi, "concurrency_low": lo,
        # The throughput ratios below are of sums over the ABBA rounds; these are round by round (round r of
        # ours against round r of vLLM), to show how far one run's ratio can move. Within a round the sides run
        # in alternating order (vLLM first in odd rounds, last in even ones), so a single round's ratio leans
        # with the machine's drift in alternating directions; only the sums cancel it.
        "gateway_single_tp_rounds": per_round("gateway_single", hi),
        "ensemble_top1_tp_rounds": per_round("ensemble_top1", hi),
        "ensemble_top2_tp_rounds": per_round("ensemble_top2", hi),
        "gateway_single_tp": ratio("gateway_single", hi, "tokens_per_s"),
        "ensemble_top1_tp": ratio("ensemble_top1", hi, "tokens_per_s"),
        "ensemble_top2_tp": ratio("ensemble_top2", hi, "tokens_per_s"),
        "gateway_single_itl_c1": ratio("gateway_single", lo, "itl_ms_p50"),
        "ensemble_top2_itl_c1": ratio("ensemble_top2", lo, "itl_ms_p50"),
        "gateway_single_ttft_ms_over_c1": over("gateway_single", lo, "ttft_ms_p50"),
        "ensemble_top2_ttft_ms_over_c1": over("ensemble_top2", lo, "ttft_ms_p50"),
    }


def orchestration_share(phases: dict[str, float]) -> float | None:
    """(gate routing + gate step + mix + sample + RPC beyond expert compute) / round wall time, from one run's
    phase deltas."""
    wall = phases.get("round")
    if not wall:
        return None
    return round(sum(phases.get(p, 0.0) for p in ORCHESTRATION) / wall, 4)


def format_table(rows: list[dict]) -> str:
    table = by_key(rows)
    head = (f"{'served by':<16}{'conc':>5}{'tok/s':>9}{'vs vLLM':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50':>9}{'ITL p99':>9}  errors")
    lines = [head, "-" * len(head)]
    for c in sorted({r["concurrency"] for r in rows}):
        base = table.get((BASELINE, c))
        for name in ORDER:
            r = table.get((name, c))
            if r is None:
                continue
            rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base and base["tokens_per_s"] else "-"
            errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            lines.append(f"{name:<16}{c:>5}{r['tokens_per_s']:>9.1f}{rel:>9}{_ms(r['ttft_ms_p50']):>10}"
                         f"{_ms(r['ttft_ms_p99']):>10}{_ms(r['itl_ms_p50']):>9}{_ms(r['itl_ms_p99']):>9}  {errs}")
    return "\n".join(lines)


def format_phases(breakdown: list[dict]) -> str:
    """One line per (target, concurrency): microseconds per generated token in each phase."""
    if not breakdown:
        return ""
    names = sorted({p for b in breakdown for p in b["us_per_token"]}, key=_phase_order)
    head = f"{'us per token':<16}{'conc':>5}" + "".join(f"{n:>12}" for n in names) + f"{'orch share':>12}  (rounds)"
    lines = [head, "-" * len(head)]
    for b in breakdown:
        cells = "".join(f"{b['us_per_token'].get(n, 0.0):>12.0f}" for n in names)
        share = b.get("orchestration_share")
        rounds = [r for r in b.get("orchestration_share_rounds", []) if r is not None]
        each = f"  ({', '.join(f'{r:.1%}' for r in rounds)})" if len(rounds) > 1 else ""
        lines.append(f"{b['target']:<16}{b['concurrency']:>5}{cells}{'-' if share is None else f'{share:.1%}':>12}{each}")
    return "\n".join(lines)


def format_work(breakdown: list[dict]) -> str:
    """One line per lockstep (target, concurrency): what the experts computed per generated token."""
    rows = [b for b in breakdown if b.get("expert_work")]
    if not rows:
        return ""
    head = (f"{'expert work':<16}{'conc':>5}{'prefill tok':>13}{'x one model':>13}{'prompt opens':>14}"
            f"{'join opens':>12}{'adv rows':>10}{'adv tok':>9}   (per generated token)")
    lines = [head, "-" * len(head)]
    for b in rows:
        w = b["expert_work"]
        x = "-" if w["prefill_x_one_model"] is None else f"{w['prefill_x_one_model']:.2f}"
        lines.append(f"{b['target']:<16}{b['concurrency']:>5}{w['prefill_tokens']:>13.2f}{x:>13}"
                     f"{w['prompt_opens']:>14.4f}{w['join_opens']:>12.4f}{w['advance_rows']:>10.3f}"
                     f"{w['advance_tokens']:>9.3f}")
    return "\n".join(lines)


def _phase_order(name: str) -> tuple[int, str]:
    order = ("round", "gate", "expert", "rpc", "mix", "sample", "emit", "gate_step", "detokenize", "sse", "log")
    return (order.index(name) if name in order else len(order), name)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in ORDER:
        pts = sorted((r["concurrency"], r["tokens_per_s"]) for r in rows if r["target"] == name)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    levels = sorted({r["concurrency"] for r in rows})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput against concurrency (same run, same machine)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
