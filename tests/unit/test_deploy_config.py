"""Deploy YAML: the shipped files validate (ours and Serve's schema), bad values name their field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from deploy.config import DEFAULT_CONFIG, PROJECT_ROOT, ConfigError, load_config, parse_app_args
from deploy.serve_cli import apply_overrides
from deploy.serve_cli import run as serve_run

DEPLOY_DIR = Path(DEFAULT_CONFIG).parent


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    mutate(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def args_of(raw: dict) -> dict:
    return raw["applications"][0]["args"]


def test_local_yaml_is_valid_and_paths_resolve_against_the_project_root() -> None:
    c = load_config()
    assert c.url == "http://127.0.0.1:8000"
    assert [e.name for e in c.app.experts] == ["code", "prose", "math", "json"]
    assert c.app.experts[0].model_path == str(PROJECT_ROOT / "artifacts/demo/experts/code")
    assert c.app.gate.path == str(PROJECT_ROOT / "artifacts/demo/gate")
    assert Path(c.app.traffic_log.path).is_absolute()
    # Replicas reserve fractions of a CPU, so `serve run` on a 2-core box (2 logical CPUs) can place them all.
    assert sum(e.num_cpus for e in c.app.experts) + c.app.gateway.num_cpus <= 2


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_shipped_configs_are_also_valid_serve_config_files(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((DEPLOY_DIR / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.applications[0].import_path == "deploy.app:app_builder"
    parse_app_args(schema.applications[0].args)


def test_kuberay_manifest_embeds_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    docs = list(yaml.safe_load_all((DEPLOY_DIR / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in docs if d and d.get("kind") == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = ServeDeploySchema.model_validate(serve_config).applications[0]
    assert app.import_path == "deploy.app:app_builder"
    parse_app_args(app.args)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: args_of(r).update(top_k=0), "applications[0].args.top_k"),
    (lambda r: args_of(r).update(top_k=9), "top_k (9) cannot exceed the number of experts (4)"),
    (lambda r: args_of(r)["experts"][1].update(num_cpus=-1), "applications[0].args.experts[1].num_cpus"),
    (lambda r: args_of(r)["experts"][2].update(name="code"), "repeated: ['code']"),
    (lambda r: args_of(r)["experts"][0].update(name="ensemble"), "'ensemble' is the model id"),
    (lambda r: args_of(r)["experts"][0].update(num_replicaz=2), "applications[0].args.experts[0].num_replicaz"),
    (lambda r: args_of(r).update(mix_space="geometric"), "applications[0].args.mix_space"),
    (lambda r: args_of(r).update(logprobs_k=40), "logprobs_k (40) exceeds max_top_k"),
    (lambda r: args_of(r).pop("experts"), "applications[0].args.experts"),
    (lambda r: r["http_options"].update(port=70000), "http_options.port"),
    (lambda r: r["ray_init"].update(address="auto"), "num_cpus/num_gpus only apply"),
    (lambda r: r.update(applications=[]), "applications"),
])
def test_invalid_values_get_an_error_naming_the_field(tmp_path, mutate, field) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, mutate))
    assert field in str(info.value)
    assert str(tmp_path / "c.yaml") in str(info.value)


def test_error_shows_the_bad_value(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"num_cpus: .*\(got -1\)"):
        load_config(write(tmp_path, lambda r: args_of(r)["experts"][1].update(num_cpus=-1)))


def test_unreadable_files_are_config_errors(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("applications: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_hub_ids_are_kept_and_base_dir_anchors_relative_paths(tmp_path) -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    args = {**args_of(raw), "base_dir": str(tmp_path), "top_k": 1}
    args["experts"] = [{**args["experts"][0], "model_path": "mistralai/Mixtral-8x7B-Instruct-v0.1"}]
    app = parse_app_args(args)
    assert app.experts[0].model_path == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert app.gate.path == str(tmp_path / "artifacts/demo/gate")


def test_gate_travels_as_user_config_so_it_can_be_swapped_live() -> None:
    opts = load_config().app.gateway_options()
    assert opts["user_config"] == {"gate": {"path": str(PROJECT_ROOT / "artifacts/demo/gate"), "version": None},
                                   "draining": False}
    assert opts["ray_actor_options"] == {"num_cpus": 0.1}


def test_cli_overrides_host_port_and_address() -> None:
    ns = argparse.Namespace(host="0.0.0.0", port=9001, address="auto")
    c = apply_overrides(load_config(), ns)
    assert (c.http_options.host, c.http_options.port, c.url) == ("0.0.0.0", 9001, "http://0.0.0.0:9001")
    assert c.ray_init.address == "auto" and c.ray_init.num_cpus is None


def test_serve_refuses_missing_local_paths_naming_the_field(tmp_path, capsys) -> None:
    path = write(tmp_path, lambda r: args_of(r).update(gate={"path": str(tmp_path / "no-gate")}))
    ns = argparse.Namespace(config=path, host=None, port=None, address=None)
    assert serve_run(ns) == 2
    assert "gate.path:" in capsys.readouterr().err


def test_app_builder_binds_the_gateway_over_one_deployment_per_expert() -> None:
    from deploy.app import app_builder

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = app_builder(args_of(raw))
    gateway = app._bound_deployment             # no public accessor for a bound graph without Ray
    experts, settings = gateway.init_args
    assert gateway.name == "gateway" and sorted(experts) == ["code", "json", "math", "prose"]
    assert {a._bound_deployment.name for a in experts.values()} == {"expert-code", "expert-prose", "expert-math",
                                                                     "expert-json"}
    assert settings.top_k == 2 and settings.traffic_log_path.endswith("traffic.db")


def test_a_gate_swap_or_drain_changes_only_the_gateway_user_config_not_the_code_version() -> None:
    """Serve restarts replicas when an app's code version changes; it hashes import_path + args, not the
    deployments' user_config overrides, so these redeploys are reconfigure-only."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    c = load_config()
    base = c.serve_config(c.app.gateway_user_config())
    drained = c.serve_config(c.app.gateway_user_config(draining=True))
    swapped = c.serve_config({"gate": {"path": c.app.gate.path, "version": "gate-v7"}, "draining": False})
    apps = [ServeDeploySchema.model_validate(x).applications[0] for x in (base, drained, swapped)]
    assert len({get_app_code_version(a) for a in apps}) == 1
    assert apps[1].deployments[0].name == "gateway" and apps[1].deployments[0].user_config["draining"] is True
    assert "ray_init" not in base and base["http_options"]["port"] == 8000
    parse_app_args(apps[2].args)                       # the resolved args still validate on the cluster side


def test_free_ports_are_outside_the_ephemeral_range_so_no_outgoing_connection_takes_them_first():
    import socket

    from deploy.serve_env import SERVE_REPLICA_PORTS, _ephemeral_range, free_port

    lo, hi = _ephemeral_range()
    for _ in range(50):
        port = free_port()
        assert not lo <= port <= hi, (port, lo, hi)
        assert not any(a <= port <= b for a, b in SERVE_REPLICA_PORTS), port     # Serve's replicas' ports
        with socket.socket() as s:
            s.bind(("", port))                 # and it is free


def test_a_local_ray_gets_a_short_ingress_draining_window_that_the_config_can_override():
    from deploy.config import RayInitOptions as RayInit

    env = RayInit().init_kwargs()["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 5     # Serve's own default is 30 s
    longer = RayInit(serve_env={"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"}).init_kwargs()
    assert longer["runtime_env"]["env_vars"]["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"


def test_every_local_service_gets_its_own_fallback_proxy_and_haproxy_ports():
    """Serve's fallback proxy binds a fixed port (8500) with SO_REUSEPORT: two services on one machine shared it
    and one answered the other's requests. Each local Ray now gets free, distinct ports for every such listener."""
    from deploy.serve_env import PER_SERVICE_PORTS, serve_env

    assert {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"} <= set(PER_SERVICE_PORTS)
    a, b = serve_env(), serve_env()
    for env in (a, b):
        ports = [int(env[name]) for name in PER_SERVICE_PORTS]
        assert len(set(ports)) == len(ports) and 8500 not in ports and 9500 not in ports
    assert any(a[name] != b[name] for name in PER_SERVICE_PORTS)
