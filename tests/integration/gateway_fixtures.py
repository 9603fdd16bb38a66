"""Session fixture for the gateway tests: the full application (deploy.app.build_app) on real Serve + vLLM.

Registered as a pytest plugin (tests/conftest.py: pytest_plugins), or run with `-p tests.integration.gateway_fixtures`.
Builds on `ray_cluster`/`expert_configs` from tests/integration/conftest.py: same Ray, same expert settings.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.config import AppConfig, Application, DeployConfig, HttpOptions, parse_app_args
from deploy.serve_env import free_port

APP_NAME = "ensemble-test"
LIVE_MAX_QUEUED = 8           # the live gateway's admission queue (max_active stays at its default, 48)


@dataclass
class LiveGateway:
    base_url: str              # http://127.0.0.1:PORT (the OpenAI base URL is base_url + "/v1")
    db: Path                   # this app's traffic log
    gate_dir: Path             # a private copy of the demo gate registry (tests may add versions)
    deploy_config: DeployConfig
    app_name: str = APP_NAME

    @property
    def config(self) -> AppConfig:
        return self.deploy_config.app

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="sk-test-not-checked", max_retries=0, **kw)

    def fingerprint(self) -> str:
        """The gate version a new request is answered with (its system_fingerprint)."""
        r = httpx.post(f"{self.base_url}/v1/completions", json={"model": "ensemble", "prompt": "{", "max_tokens": 1},
                       timeout=60)
        return r.json()["system_fingerprint"]

    def flush_log(self) -> None:
        """Wait until the gateway has committed every record so far (then read self.db)."""
        from ray import serve

        assert serve.get_app_handle(self.app_name).flush_log.remote().result(timeout_s=60)

    def records(self) -> dict:
        from orchestrator.traffic_log import iter_records

        self.flush_log()
        return {r.request_id: r for r in iter_records(self.db)}

    def set_gateway_user_config(self, user_config: dict) -> None:
        """What retraining does to swap the gate: an in-place update (reconfigure on every gateway replica)."""
        from deploy.app import deploy

        deploy(self.deploy_config, gateway_user_config=user_config)


def wait_healthy(base_url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def live_config(expert_configs, gate_dir: Path, db: Path, **overrides) -> AppConfig:
    args = {"experts": [c.model_dump() for c in expert_configs], "gate": {"path": str(gate_dir)},
            "traffic_log": {"url": f"sqlite:///{db}"}, "top_k": 2, "logprobs_k": 20, **overrides}
    return parse_app_args(args, "test config")


@pytest.fixture(scope="session")
def live_gateway(ray_cluster, expert_configs, tmp_path_factory) -> LiveGateway:
    from ray import serve
    from ray.serve.context import _get_global_client

    from deploy.app import deploy
    from tests.integration.conftest import DEMO

    if not (DEMO / "gate" / "CURRENT").exists():
        pytest.skip(f"no demo gate at {DEMO / 'gate'}: run `make gate`")
    tmp = tmp_path_factory.mktemp("gateway")
    gate_dir = tmp / "gate"
    shutil.copytree(DEMO / "gate", gate_dir, ignore=shutil.ignore_patterns("cache", "*.npz"))
    # A short admission queue, so that tests/integration/test_gateway_capacity.py can fill it on real engines.
    app = live_config(expert_configs, gate_dir, tmp / "traffic.db", gateway={"max_queued": LIVE_MAX_QUEUED})
    # The port is ignored (with a log line) when an earlier fixture already started Serve; we ask Serve for the
    # real one below. `deploy` is the declarative path `ensemble serve` uses, so user_config updates are in place.
    config = DeployConfig(http_options=HttpOptions(host="127.0.0.1", port=free_port()),
                          applications=[Application(name=APP_NAME, args=app)])
    deploy(config)
    http = _get_global_client().http_config
    host = "127.0.0.1" if http.host in (None, "", "0.0.0.0", "::") else http.host
    base_url = f"http://{host}:{http.port}"
    wait_healthy(base_url)
    yield LiveGateway(base_url, tmp / "traffic.db", gate_dir, config)
    serve.delete(APP_NAME)
