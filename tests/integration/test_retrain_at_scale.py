"""Retraining at scale: the Parquet export read by Ray Data, and scoring as a Ray Data job whose actors call
the live expert deployments, give the same records and the same scores as the in-process path."""

from __future__ import annotations

import argparse
import asyncio
import time

import pytest

from deploy.replay import replay, shift_prompts

pytestmark = pytest.mark.integration


def parse(*argv: str) -> argparse.Namespace:
    from orchestrator.cli import parse_command

    return parse_command("retrain", list(argv))[1]


def test_ray_data_reads_the_export_and_scores_like_the_in_process_path(live_gateway, tmp_path) -> None:
    from deploy.retrain_job import read_log
    from experts.server import connect_experts
    from gating.ray_data_scoring import score_with_ray_data
    from gating.scores import score_sequences
    from orchestrator.export_log import export
    from tests.integration.conftest import DEMO

    since = time.time()
    stats = asyncio.run(replay(live_gateway.base_url, shift_prompts(DEMO, "devtools", 12, seed=7), max_tokens=2))
    assert stats.ok == 12, stats.errors
    until = time.time()
    live_gateway.flush_log()
    export([live_gateway.db], tmp_path / "export")

    window = ("--parquet", str(tmp_path / "export"), "--since", str(since), "--until", str(until))
    plain, _ = read_log(live_gateway.deploy_config, parse(*window))
    distributed, _ = read_log(live_gateway.deploy_config, parse(*window, "--ray-data"))
    assert len(plain) == 12
    assert {r.request_id: tuple(r.prompt_ids) for r in plain} == {r.request_id: tuple(r.prompt_ids) for r in distributed}

    names = [e.name for e in live_gateway.config.experts]
    sequences = [list(r.prompt_ids) for r in sorted(plain, key=lambda r: r.request_id)]
    by_ray = score_with_ray_data(live_gateway.app_name, names, sequences, 20, batch=4)
    direct = asyncio.run(score_sequences(connect_experts(names, live_gateway.app_name), sequences, 20))
    assert by_ray.sequences == direct.sequences and by_ray.doc_offsets == direct.doc_offsets
    assert by_ray.targets.equal(direct.targets) and by_ray.context.equal(direct.context)
    for e, name in enumerate(names):
        # Same engines, different batch composition: float32 experts agree to rounding; the bf16 one loosely.
        tol = 1e-3 if live_gateway.config.experts[e].dtype == "float32" else 0.05
        diff = (by_ray.lps[:, e, 0] - direct.lps[:, e, 0]).abs().mean()
        assert float(diff) <= tol, f"{name}: mean |d top-1 logprob| {float(diff):.2e}"
