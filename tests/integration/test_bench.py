"""A tiny `ensemble bench` run end to end: vLLM's own OpenAI server (started by the bench) against the live
gateway, every configuration, two concurrency levels. It checks what the bench reports and that nothing
errored; timing is never asserted (benchmarks are separate from tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_a_tiny_bench_run_reports_every_configuration_and_the_ratios(live_gateway, tmp_path) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(live_gateway.deploy_config.model_dump(mode="json")))
    expert = live_gateway.config.experts[0].name
    cmd = [str(Path(sys.executable).parent / "ensemble"), "bench", "--config", str(config), "--url",
           live_gateway.base_url, "--expert", expert, "--concurrency", "1,2", "--requests-per-stream", "1",
           "--max-tokens", "6", "--rounds", "1", "--prompt-chars", "120", "--plot", str(tmp_path / "bench.png"),
           "--logs", str(tmp_path / "logs"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)

    rows = {(r["target"], r["concurrency"]): r for r in result["rows"]}
    for target in ("vllm", "gateway_single", "ensemble_top1", "ensemble_top2"):
        for c in (1, 2):
            row = rows[(target, c)]
            assert row["errors"] == {} and row["tokens"] == 6 * row["requests"], (target, c, row)
            assert row["tokens_per_s"] > 0 and row["ttft_ms_p50"] is not None and row["itl_ms_p50"] is not None
    ratios = result["ratios"]
    for key in ("gateway_single_tp", "ensemble_top2_tp", "gateway_single_itl_c1", "ensemble_top2_itl_c1",
                "gateway_single_ttft_ms_over_c1"):
        assert isinstance(ratios[key], float) and math.isfinite(ratios[key]), (key, ratios)
    phases = {(b["target"], b["concurrency"]): b for b in result["phases_us_per_token"]}
    top2 = phases[("ensemble_top2", 2)]
    assert top2["tokens"] > 0 and {"round", "expert", "mix", "sample"} <= set(top2["us_per_token"]), top2
    # one round: that round's own share is the run's
    assert top2["orchestration_share_rounds"] == [top2["orchestration_share"]] and top2["orchestration_share"] > 0
    assert result["peak_rss_gib"]["vllm"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
