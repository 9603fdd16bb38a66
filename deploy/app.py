"""The Serve application, wired in one function from a validated AppConfig, and the one way we deploy it.

    client ──HTTP/SSE──► gateway            orchestrator.gateway.Gateway: FastAPI ingress, EnsembleEngine,
                          │                 text layer, traffic log, /metrics; user_config = {gate, draining}
                          │ one DeploymentHandle per expert, one batched call per engine step
                          ├──► expert-code   experts.server.ExpertServer: one vLLM engine per replica
                          ├──► expert-prose
                          ├──► expert-math
                          └──► expert-json   (one deployment per entry of `experts:` in the YAML)

`build_app(config)` returns the bound graph; `app_builder(args)` is the same for Serve config files
(`import_path: deploy.app:app_builder`), so `serve run deploy/local.yaml` works; `deploy(config)` applies a
config the way `serve run`/`serve deploy` do, so later gate swaps are in-place user_config updates.
"""

from __future__ import annotations

import time
from typing import Any

from deploy.config import AppConfig, DeployConfig, parse_app_args


def build_app(config: AppConfig, *, draining: bool = False) -> Any:
    """AppConfig (paths resolved) -> bound Serve Application: the gateway over every expert deployment."""
    from experts.server import expert_app
    from orchestrator.gateway import Gateway

    experts = {e.name: expert_app(e) for e in config.experts}
    return Gateway.options(**config.gateway_options(draining)).bind(experts, config.gateway_settings())


def app_builder(args: dict) -> Any:
    """Serve's application-builder hook: validates the `args:` block of the config file, then builds."""
    # Serve may hand over a pydantic model when the annotation is one; we take the plain dict and validate
    # ourselves so errors name the field the same way `ensemble serve` does.
    return build_app(parse_app_args(dict(args), "applications[0].args"))


def deploy(config: DeployConfig, *, gateway_user_config: dict | None = None, timeout_s: float = 900.0) -> None:
    """Apply `config` through Serve's declarative path and wait until the app is RUNNING again.

    Redeploying with only a different `gateway_user_config` (a new gate version, or draining) restarts
    nothing: Serve calls Gateway.reconfigure on every replica. (`serve.run` from Python would give every
    deployment a fresh code version and restart all engines.) Needs a connected Ray.
    """
    from ray.serve._private.api import serve_start  # the client Serve's own `serve run <config>` uses
    from ray.serve.schema import ServeDeploySchema

    user_config = gateway_user_config or config.app.gateway_user_config()
    schema = ServeDeploySchema.model_validate(config.serve_config(user_config))
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    client.deploy_apps(schema)
    wait_running(config.applications[0].name, timeout_s)


def wait_running(app_name: str, timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)                  # let the controller register the new target before reading status
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"application {app_name!r} failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {app_name!r} not RUNNING after {timeout_s:.0f} s "
                               f"(status {app.status if app else 'missing'})")
        time.sleep(1.0)
