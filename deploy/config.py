"""The service's YAML config, validated once with pydantic: a Ray Serve config file plus our `ray_init` block.

The file is what `serve run`/`serve deploy` read (http_options, applications[0].import_path/args); the args
are an AppConfig. Errors name the field (`applications[0].args.experts[1].num_cpus: ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from experts.config import ExpertConfig, check_custom_resources
from orchestrator.service import GatewaySettings
from orchestrator.store.url import (
    DEFAULT_URL,
    REGISTRY_IN_STORE,
    is_database_url,
    redact,
    registry_location,
    resolve_sqlite_url,
    resolve_store_url,
    sqlite_file,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent     # the directory holding deploy/
DEFAULT_CONFIG = Path(__file__).resolve().parent / "local.yaml"
RESERVED_MODEL = "ensemble"
GATEWAY_DEPLOYMENT = "gateway"        # orchestrator.gateway.Gateway's deployment name


class ConfigError(ValueError):
    """A config that cannot be served; the message names every offending field."""


class RayInitOptions(BaseModel):
    """How `ensemble serve` starts or joins Ray. Serve itself ignores this block."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None        # None: start a local Ray; "auto" or ray://...: join a running cluster
    # Logical CPUs of a local Ray. Replicas reserve CPUs (1 each by default): on a 2-core box too few logical
    # CPUs leaves deployments waiting forever with no error (see shared/FACTS.md).
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    include_dashboard: bool = False
    log_to_driver: bool = True
    namespace: str = "serve"          # the namespace `serve run` uses, so Serve CLI commands see the app
    # Extra environment of every process of a local Ray, over deploy/serve_env.py's defaults (HAProxy ingress).
    # Ignored when joining a cluster: there, the variables must be set where `ray start` runs.
    serve_env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _local_resources_only_for_local_ray(self) -> RayInitOptions:
        if self.address and (self.num_cpus is not None or self.num_gpus is not None):
            raise ValueError("num_cpus/num_gpus only apply when starting a local Ray (no address)")
        return self

    def init_kwargs(self) -> dict[str, Any]:
        from deploy.serve_env import serve_env

        kw = self.model_dump(exclude_none=True, exclude={"serve_env"})
        if self.address:
            kw.pop("include_dashboard")
        else:
            # ENSEMBLE_STORE_URL reaches a local Ray's workers by inheritance from this process, on purpose not
            # through runtime_env: Ray records that and shows it in its dashboard, and the URL has a password.
            kw["runtime_env"] = {"env_vars": serve_env(self.serve_env)}
        return kw


class HttpOptions(BaseModel):
    # Serve accepts more keys (request_timeout_s, root_path, ...): passed through untouched.
    model_config = ConfigDict(extra="allow")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A gate registry directory (its live version), one checkpoint file, a registry in a database
    # (sqlite:///FILE, postgresql://...), or `store`: in the traffic store's database, which every node reads.
    path: str
    version: str | None = None         # pin a version of the registry instead of its CURRENT

    def location(self) -> str:
        """`path` as this process opens it: a database URL yields to ENSEMBLE_STORE_URL (one database)."""
        return registry_location(self.path)


class TrafficLogConfig(BaseModel):
    """The store every gateway replica writes requests and feedback to: one database for all of them.

    `url`: sqlite:///FILE (the default; WAL, one machine) or postgresql://USER@HOST/DB (clusters). The
    environment variable ENSEMBLE_STORE_URL overrides it, so a password never has to be in this file.
    The old key `path: FILE` still works and means sqlite:///FILE.
    """

    model_config = ConfigDict(extra="forbid")

    url: str = DEFAULT_URL
    # Rows each replica keeps in memory while the database is unreachable; beyond it they are counted as
    # dropped (ensemble_traffic_log_failed_rows) and logged. A row holds its per-token lists: measured
    # ~10 KiB at 40 output tokens, ~57 KiB at 256, so 100k rows of short requests is about 1 GiB.
    buffer_rows: int = Field(100_000, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _path_means_sqlite(cls, data: Any) -> Any:
        if isinstance(data, dict) and "path" in data:
            data = dict(data)
            path = str(data.pop("path"))
            if "url" in data:
                raise ValueError("give `url` or the older `path`, not both")
            if "{replica}" in path:
                raise ValueError("'{replica}' is gone: every gateway replica now writes one shared store "
                                 "(set `url`: sqlite:///FILE on one machine, postgresql://... on a cluster)")
            data["url"] = f"sqlite:///{path}"          # relative: resolved against base_dir later
        return data

    @field_validator("url")
    @classmethod
    def _supported(cls, url: str) -> str:
        if not is_database_url(url):
            raise ValueError(f"not a database URL: {url!r} (use sqlite:///FILE or postgresql://...)")
        return url

    @property
    def path(self) -> str:
        """For messages: the SQLite file, or the URL with its password masked."""
        file = sqlite_file(self.url)
        return str(file) if file is not None else redact(self.url)

    def database_url(self) -> str:
        """The store this process uses: ENSEMBLE_STORE_URL if set, else `url`."""
        return resolve_store_url(self.url)


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    # Serve's autoscaling_config for the gateway (min_replicas, max_replicas, target_ongoing_requests, ...);
    # replaces num_replicas when set. Every endpoint behaves the same whichever replica answers.
    autoscaling_config: dict | None = None
    num_cpus: float = Field(0.1, ge=0)
    # Custom Ray resources each gateway replica reserves, for placement (see ExpertConfig.resources).
    resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(256, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    default_max_tokens: int = Field(16, ge=1)
    graceful_shutdown_timeout_s: float = Field(60.0, gt=0)
    # A call to an expert replica slower than this counts as a dead replica (migrate, or route around it).
    expert_timeout_s: float = Field(10.0, gt=0)
    # Admission control per gateway replica: running generations, then a bounded queue, then 429.
    max_active: int = Field(48, ge=1)
    max_queued: int = Field(256, ge=0)
    queue_timeout_s: float = Field(30.0, ge=0)
    # Once API keys exist (`ensemble keys add`), /metrics needs one too, unless this is true (a scraper
    # inside a trusted network). With no active key everything is open anyway.
    metrics_public: bool = False

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v)


class AppConfig(BaseModel):
    """The application's `args`: what deploy.app.app_builder receives."""

    model_config = ConfigDict(extra="forbid")

    experts: list[ExpertConfig] = Field(min_length=1)
    gate: GateConfig | None = None     # None: no trained gate yet, the ensemble mixes all experts uniformly
    top_k: int = Field(2, ge=1)
    mix_space: Literal["logits", "probs"] | None = None    # None: the gate checkpoint's own (trained) space
    logprobs_k: int = Field(20, ge=1, le=64)
    traffic_log: TrafficLogConfig = Field(default_factory=TrafficLogConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    # Relative paths (model_path, gate.path, sqlite store files) are resolved against this directory (itself
    # relative to the project root); default: the project root. The app builder never learns where the YAML
    # file was, so anchoring at the project root makes `ensemble serve`, `serve run` and any cwd agree.
    base_dir: str | None = None

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[ExpertConfig]) -> list[ExpertConfig]:
        names = [e.name for e in experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {dupes}")
        if RESERVED_MODEL in names:
            raise ValueError(f"'{RESERVED_MODEL}' is the model id of the whole ensemble; rename that expert")
        return experts

    @model_validator(mode="after")
    def _cross_field(self) -> AppConfig:
        if self.top_k > len(self.experts):
            raise ValueError(f"top_k ({self.top_k}) cannot exceed the number of experts ({len(self.experts)})")
        too_small = [e.name for e in self.experts if e.max_top_k < self.logprobs_k]
        if too_small:
            raise ValueError(f"logprobs_k ({self.logprobs_k}) exceeds max_top_k of experts {too_small}")
        return self

    def resolved(self) -> AppConfig:
        """A copy with every relative local path made absolute (hub ids like org/model are kept)."""
        base = PROJECT_ROOT / self.base_dir if self.base_dir else PROJECT_ROOT   # `/` keeps an absolute base_dir

        def local(p: str) -> str:
            return p if Path(p).is_absolute() else str((base / p).resolve())

        def model(p: str) -> str:
            # "org/name" that does not exist locally is a Hugging Face hub id: leave it for vLLM to download.
            hub_id = p.count("/") == 1 and not p.startswith((".", "/")) and not (base / p).exists()
            return p if hub_id else local(p)

        def registry(p: str) -> str:
            if p == REGISTRY_IN_STORE:      # the gate registry shares the store's database
                return log.url
            return resolve_sqlite_url(p, base) if is_database_url(p) else local(p)

        experts = [e.model_copy(update={"model_path": model(e.model_path)}) for e in self.experts]
        log = self.traffic_log.model_copy(update={"url": resolve_sqlite_url(self.traffic_log.url, base)})
        gate = self.gate.model_copy(update={"path": registry(self.gate.path)}) if self.gate else None
        return self.model_copy(update={"experts": experts, "gate": gate, "traffic_log": log,
                                       "base_dir": str(base.resolve())})

    def missing_local_paths(self) -> list[str]:
        """Preflight for a local start: fields whose paths do not exist here (call on a resolved copy)."""
        errors = [f"experts[{i}].model_path: {e.model_path} does not exist"
                  for i, e in enumerate(self.experts) if e.model_path.startswith("/") and not Path(e.model_path).exists()]
        if self.gate and not is_database_url(self.gate.path) and not Path(self.gate.path).exists():
            errors.append(f"gate.path: {self.gate.path} does not exist (train one with `make gate`)")
        return errors

    def gateway_settings(self) -> GatewaySettings:
        return GatewaySettings(store_url=self.traffic_log.url, store_buffer_rows=self.traffic_log.buffer_rows,
                               top_k=self.top_k, mix_space=self.mix_space,
                               logprobs_k=self.logprobs_k, max_request_bytes=self.gateway.max_request_bytes,
                               default_max_tokens=self.gateway.default_max_tokens,
                               drain_timeout_s=self.gateway.graceful_shutdown_timeout_s / 2,
                               expert_timeout_s=self.gateway.expert_timeout_s,
                               max_active=self.gateway.max_active, max_queued=self.gateway.max_queued,
                               queue_timeout_s=self.gateway.queue_timeout_s,
                               metrics_public=self.gateway.metrics_public)

    def gateway_user_config(self, draining: bool = False) -> dict[str, Any]:
        """The gateway's Serve user_config (orchestrator.gateway.GatewayUserConfig): the gate, swappable live,
        and the drain switch used before a planned stop."""
        return {"gate": self.gate.model_dump() if self.gate else None, "draining": draining}

    def gateway_options(self, draining: bool = False) -> dict[str, Any]:
        """serve.deployment options of the gateway."""
        g = self.gateway
        scale = {"autoscaling_config": g.autoscaling_config} if g.autoscaling_config else {"num_replicas": g.num_replicas}
        return {**scale, "max_ongoing_requests": g.max_ongoing_requests,
                "graceful_shutdown_timeout_s": g.graceful_shutdown_timeout_s,
                "ray_actor_options": {"num_cpus": g.num_cpus, **({"resources": dict(g.resources)} if g.resources else {})},
                "user_config": self.gateway_user_config(draining)}


class Application(BaseModel):
    """One entry of Serve's `applications:` list (other Serve keys such as runtime_env pass through)."""

    model_config = ConfigDict(extra="allow")

    name: str = "ensemble"
    route_prefix: str = "/"
    import_path: str = "deploy.app:app_builder"
    args: AppConfig


class DeployConfig(BaseModel):
    model_config = ConfigDict(extra="allow")          # other Serve top-level keys (logging_config, ...)

    ray_init: RayInitOptions = Field(default_factory=RayInitOptions)
    proxy_location: str = "HeadOnly"
    http_options: HttpOptions = Field(default_factory=HttpOptions)
    applications: list[Application] = Field(min_length=1, max_length=1)

    @property
    def app(self) -> AppConfig:
        return self.applications[0].args

    def serve_config(self, gateway_user_config: dict | None = None) -> dict[str, Any]:
        """This file as Serve reads it (ServeDeploySchema), with `args` resolved. `gateway_user_config`, when
        given, overrides the gateway's user_config through `deployments:`; Serve applies a change of only
        that in place (reconfigure on every replica) because the app's code version hashes the args, not it."""
        entry = self.applications[0].model_dump(mode="json")
        entry["args"] = self.app.model_dump(mode="json")
        if gateway_user_config is not None:
            others = [d for d in entry.get("deployments") or [] if d.get("name") != GATEWAY_DEPLOYMENT]
            entry["deployments"] = [*others, {"name": GATEWAY_DEPLOYMENT, "user_config": gateway_user_config}]
        top = {k: v for k, v in (self.model_extra or {}).items()}
        return {**top, "proxy_location": self.proxy_location, "http_options": self.http_options.model_dump(),
                "applications": [entry]}

    @property
    def url(self) -> str:
        return f"http://{self.http_options.host}:{self.http_options.port}{self.applications[0].route_prefix.rstrip('/')}"


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        lines.append(f"  {_loc(err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}{got}")
    return f"{source}: invalid config\n" + "\n".join(lines)


def parse_app_args(args: dict, source: str = "application args") -> AppConfig:
    try:
        return AppConfig.model_validate(args).resolved()
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def load_config(path: str | Path | None = None) -> DeployConfig:
    """Read, validate and resolve a deploy YAML (default: the embedded deploy/local.yaml)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with an `applications:` list at the top level")
    try:
        config = DeployConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(path))) from None
    config.applications[0].args = config.app.resolved()
    return config
