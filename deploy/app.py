"""The Serve application, wired in one function from a validated AppConfig.

    client ──HTTP/SSE──► gateway            orchestrator.gateway.Gateway: FastAPI ingress, EnsembleEngine,
                          │                 text layer, traffic log, /metrics; user_config = the gate (live swap)
                          │ one DeploymentHandle per expert, one batched call per engine step
                          ├──► expert-code   experts.server.ExpertServer: one vLLM engine per replica
                          ├──► expert-prose
                          ├──► expert-math
                          └──► expert-json   (one deployment per entry of `experts:` in the YAML)

`build_app(config)` returns the bound graph for `serve.run`; `app_builder(args)` is the same for Serve config
files (`import_path: deploy.app:app_builder`, `args:` = AppConfig), so `serve run deploy/local.yaml` works.
"""

from __future__ import annotations

from typing import Any

from deploy.config import AppConfig, parse_app_args


def build_app(config: AppConfig, *, draining: bool = False) -> Any:
    """AppConfig (paths resolved) -> bound Serve Application: the gateway over every expert deployment.

    `draining=True` gives the same graph with the gateway told to finish in-flight requests and accept no
    more: redeploying it is a user_config-only update (no restart), done before deleting the app.
    """
    from experts.server import expert_app
    from orchestrator.gateway import Gateway

    experts = {e.name: expert_app(e) for e in config.experts}
    return Gateway.options(**config.gateway_options(draining)).bind(experts, config.gateway_settings())


def app_builder(args: dict) -> Any:
    """Serve's application-builder hook: validates the `args:` block of the config file, then builds."""
    # Serve may hand over a pydantic model when the annotation is one; we take the plain dict and validate
    # ourselves so errors name the field the same way `ensemble serve` does.
    return build_app(parse_app_args(dict(args), "applications[0].args"))
