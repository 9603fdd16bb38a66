"""The bench's arithmetic (deploy/bench: load.summarise, report.ratios, phases.per_token) on made-up timings.

No server and no clock: these check that the numbers `ensemble bench` prints are the ones its rows imply.
"""

from __future__ import annotations

import pytest

from deploy.bench import phases, report
from deploy.bench.load import LevelResult, RequestTiming, percentile, summarise


def level(target: str, c: int, wall_s: float, tokens: int, ttft_s: float, tpot_s: float, n: int = 4,
          failed: int = 0) -> LevelResult:
    ok = [RequestTiming(ok=True, ttft_s=ttft_s, last_s=ttft_s + tpot_s * (tokens - 1), tokens=tokens,
                        itl_s=[tpot_s] * (tokens - 1)) for _ in range(n)]
    bad = [RequestTiming(ok=False, status=429, error="busy") for _ in range(failed)]
    return LevelResult(target, c, wall_s, ok + bad)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(101)), 99) == 99


def test_summary_counts_only_successful_tokens_and_reports_tpot_and_errors() -> None:
    row = summarise([level("vllm", 1, wall_s=2.0, tokens=11, ttft_s=0.05, tpot_s=0.01, n=4, failed=1)])
    assert row["tokens"] == 44 and row["tokens_per_s"] == 22.0 and row["requests"] == 5
    assert row["ttft_ms_p50"] == 50.0 and row["itl_ms_p50"] == pytest.approx(10.0)
    assert row["errors"] == {"429": 1}


def test_ratios_compare_each_side_with_vllm_at_the_same_concurrency() -> None:
    rows = [summarise([level(name, c, wall_s=1.0, tokens=10 * k, ttft_s=0.01 * k, tpot_s=0.001 * k)])
            for c in (1, 8) for name, k in (("vllm", 4), ("gateway_single", 3), ("ensemble_top1", 2),
                                            ("ensemble_top2", 1))]
    r = report.ratios(rows)
    assert (r["concurrency_low"], r["concurrency_high"]) == (1, 8)
    # throughput is tokens over wall time: 30/40, 10/40
    assert r["gateway_single_tp"] == pytest.approx(0.75, abs=0.02) and r["ensemble_top2_tp"] == pytest.approx(0.25, abs=0.02)
    assert r["gateway_single_itl_c1"] == pytest.approx(0.75) and r["ensemble_top2_itl_c1"] == pytest.approx(0.25)
    assert r["gateway_single_ttft_ms_over_c1"] == pytest.approx(-10.0)
    table = report.format_table(rows)
    assert "gateway_single" in table and "0.75" in table


def test_throughput_ratios_are_also_given_round_by_round() -> None:
    rounds = {"vllm": (4.0, 2.0), "gateway_single": (3.0, 3.0), "ensemble_top2": (1.0, 1.0)}  # wall s per round
    rows = [summarise([level(name, c, wall_s=w, tokens=10, ttft_s=0.01, tpot_s=0.001) for w in walls])
            for c in (1, 32) for name, walls in rounds.items()]
    r = report.ratios(rows)
    assert rows[0]["rounds_tokens_per_s"] == [10.0, 20.0]
    assert r["gateway_single_tp_rounds"] == [pytest.approx(4 / 3, abs=0.01), pytest.approx(2 / 3, abs=0.01)]
    assert r["ensemble_top2_tp_rounds"] == [4.0, 2.0]
    assert r["gateway_single_tp"] == pytest.approx(1.0, abs=1e-3)      # the sums: 80 tokens in 6 s on both sides


def test_a_missing_side_gives_no_ratio_rather_than_a_wrong_one() -> None:
    rows = [summarise([level("gateway_single", 1, 1.0, 10, 0.01, 0.001)])]
    assert report.ratios(rows)["gateway_single_tp"] is None


def test_phase_breakdown_is_per_generated_token_and_orchestration_share_of_the_round() -> None:
    before = {"round": 1.0, "gate": 0.1, "gate_step": 0.0, "mix": 0.1, "sample": 0.0, "rpc": 0.2, "expert": 0.5,
              "emit": 0.1, "_tokens": 100}
    after = {"round": 3.0, "gate": 0.2, "gate_step": 0.05, "mix": 0.2, "sample": 0.1, "rpc": 0.4, "expert": 1.5,
             "emit": 0.3, "_tokens": 1100}
    b = phases.per_token("ensemble_top2", 8, phases.delta(before, after))
    assert b["tokens"] == 1000 and b["us_per_token"]["round"] == pytest.approx(2000.0)
    # gate routing + gate step + mix + sample + RPC; expert compute and emitting events are not orchestration
    assert b["orchestration_share"] == pytest.approx((0.1 + 0.05 + 0.1 + 0.1 + 0.2) / 2.0)


def test_each_rounds_orchestration_share_is_its_own_and_the_runs_is_of_the_sum() -> None:
    """A run of two rounds: each round's share comes from that round's phase delta alone, the run's from the
    sum of both (not the mean of the two shares), and the printed breakdown shows both; a configuration with no
    rounds of its own (model=<expert>) has neither."""
    one = {"round": 1.0, "gate": 0.02, "gate_step": 0.02, "mix": 0.02, "sample": 0.02, "rpc": 0.02, "_tokens": 100}
    two = {"round": 3.0, "gate": 0.1, "gate_step": 0.1, "mix": 0.1, "sample": 0.1, "rpc": 0.2, "_tokens": 300}
    total = {k: one[k] + two[k] for k in one}
    rounds = [phases.share_of(one), phases.share_of(two)]
    assert rounds == [pytest.approx(0.1), pytest.approx(0.2)]
    b = phases.per_token("ensemble_top2", 32, total, rounds)
    assert b["orchestration_share"] == pytest.approx(0.70 / 4.0)             # not the rounds' mean, 0.15
    assert b["orchestration_share_rounds"] == rounds
    assert report.format_phases([b]).splitlines()[-1].endswith("17.5%  (10.0%, 20.0%)")
    assert phases.per_token("ensemble_top2", 32, total)["orchestration_share_rounds"] == []
    native = phases.per_token("gateway_single", 32, {"detokenize": 0.1, "_tokens": 400}, [None, None])
    assert native["orchestration_share"] is None and native["orchestration_share_rounds"] == []


def test_plot_writes_a_png(tmp_path) -> None:
    rows = [summarise([level(n, c, 1.0, 10, 0.01, 0.001)]) for n in report.ORDER for c in (1, 8)]
    report.plot(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expert_work_is_per_generated_token_and_prefill_is_compared_with_the_prompt() -> None:
    before = {"_tokens": 0, "_prompt_tokens": 0}
    after = {"_tokens": 64, "_prompt_tokens": 100, "_work_prompt_rows": 2, "_work_prompt_tokens": 200,
             "_work_join_rows": 2, "_work_join_tokens": 320, "_work_advance_rows": 124, "_work_advance_tokens": 190}
    w = phases.per_token("ensemble_top2", 32, phases.delta(before, after))["expert_work"]
    assert w["prefill_tokens"] == pytest.approx(520 / 64, abs=0.01)
    assert w["prefill_x_one_model"] == pytest.approx(5.2)              # one model prefills the 100 prompt tokens
    assert w["join_opens"] == pytest.approx(2 / 64, abs=1e-4) and w["advance_rows"] == pytest.approx(124 / 64, abs=1e-3)
    assert "5.20" in report.format_work([phases.per_token("ensemble_top2", 32, phases.delta(before, after))])
    native = phases.per_token("gateway_single", 32, phases.delta(before, {"_tokens": 64, "_prompt_tokens": 100}))
    assert native["expert_work"] is None and report.format_work([native]) == ""


async def test_the_gateways_expert_work_counters_reach_the_bench_as_the_engine_counted_them() -> None:
    """Decode loop -> /metrics text -> the bench's parser: the same numbers at the far end."""
    from orchestrator.metrics import GatewayMetrics
    from tests.unit.test_engine import collect, req, started

    engine, _ = await started()
    metrics = GatewayMetrics()
    metrics.attach_engine(engine)
    prompt = (0, 5, 6, 7)
    before = phases.parse(metrics.render()[0].decode())
    events = await collect(engine, req(prompt=prompt, max_tokens=20, temperature=1.0, seed=3))
    metrics.prompt_tokens.labels(model="ensemble").inc(len(prompt))        # as the service counts them
    for i, ev in enumerate(events):
        metrics.token("ensemble", ev, 0.01, i == 0)
    d = phases.delta(before, phases.parse(metrics.render()[0].decode()))
    counted = engine.expert_work()
    assert {k: v for k, v in d.items() if k.startswith("_work_")} == {
        f"_work_{kind}_{unit}": n for (kind, unit), n in counted.items()}
    w = phases.per_token("ensemble_top2", 1, d)["expert_work"]
    prefill = counted["prompt", "tokens"] + counted.get(("join", "tokens"), 0)
    assert w["prefill_tokens"] == pytest.approx(prefill / 20, abs=0.01)
    assert w["prefill_x_one_model"] == pytest.approx(prefill / len(prompt), abs=0.01)
