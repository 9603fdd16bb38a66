"""The service on a real multi-node Ray cluster: a head and a worker node (two `ray start`s on this machine),
PostgreSQL as the one traffic store and gate registry, 2 gateway replicas and a 2-replica expert.

    head node   (head_node, gateway_slot, code_slot)     gateway #1, expert-code #1, expert-prose, HAProxy
    worker node (worker_node, gateway_slot, code_slot)   gateway #2, expert-code #2
    PostgreSQL  (throwaway, tests/postgres.py)           requests, feedback, gate versions

Custom resources pin the shape: each node offers one `gateway_slot` and one `code_slot`, so the two gateway
replicas and the two code replicas land one per node. ENSEMBLE_STORE_URL (in every node's environment, as
an operator would set it) points the whole service at PostgreSQL; the YAML's SQLite URL must stay unused.
Three vLLM engines in all (~2 GiB each with a 0.25 GiB KV cache).

In order, on one deployed service: placement; 200 requests through both gateway replicas, each logged once;
feedback for every one through either replica; metrics of both replicas through Ray's pipeline; `ensemble
retrain` reads the whole log, promotes and both replicas serve the new gate; identical greedy output with
2 and 1 code replicas; the worker node stopped, the head keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import REPO, LocalCluster, free_port

DEMO = Path(os.environ.get("ENSEMBLE_DEMO_DIR", REPO / "artifacts" / "demo"))
APP = "ensemble-cluster"
EXPERTS = ("code", "prose")
N_REQUESTS = 200
PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):",
    "The old lighthouse keeper", "Once upon a time, in a quiet village,", "for i in range(10):",
    "The committee met on Tuesday to discuss", "def parse_args(argv):", "It was a cold morning when",
    "with open(path) as f:", "The history of the river begins", "try:\n    import json\nexcept",
]


def two_expert_gate(version: str, parent: str | None, seed: int):
    """A gate for the two experts this cluster serves: the demo gate's shape and tokenizer, fresh weights (the
    GRU's input width depends on the number of experts, so the 4-expert demo gate cannot be cut down)."""
    import torch

    from gating.checkpoint import GateCheckpoint, load_gate_checkpoint
    from gating.model import Gate, GateArgs

    demo = load_gate_checkpoint(DEMO / "gate")
    args = GateArgs(**{**demo.args.to_dict(), "n_experts": len(EXPERTS)})
    torch.manual_seed(seed)
    return GateCheckpoint(version=version, args=args, state_dict=Gate(args).state_dict(), expert_names=list(EXPERTS),
                          tokenizer_fingerprint=demo.tokenizer_fingerprint, top_k=2, mix_space=demo.mix_space,
                          parent=parent, metrics={"source": "cluster test, untrained"})


def cluster_config(root: Path, port: int):
    from deploy.config import Application, DeployConfig, HttpOptions, parse_app_args

    def expert(name: str, replicas: int, resources: dict, bind: str) -> dict:
        return {"name": name, "model_path": str(DEMO / "experts" / name), "dtype": "float32",
                "max_model_len": 256, "kv_cache_space_gib": 0.25, "max_num_seqs": 64, "num_cpus": 0.5,
                "cpu_threads_bind": bind, "num_replicas": replicas, "resources": resources}

    args = parse_app_args({
        "experts": [expert("code", 2, {"code_slot": 1}, "0"), expert("prose", 1, {"head_node": 1}, "1")],
        "gate": {"path": "store"},                       # the registry in the store's database
        "top_k": 2, "logprobs_k": 20,
        # ENSEMBLE_STORE_URL (PostgreSQL) overrides this in every process: the file must never appear.
        "traffic_log": {"url": f"sqlite:///{root / 'must-stay-unused.db'}"},
        "gateway": {"num_replicas": 2, "num_cpus": 0.1, "resources": {"gateway_slot": 1}, "default_max_tokens": 8},
    }, "cluster test config")
    return DeployConfig(proxy_location="HeadOnly", http_options=HttpOptions(host="127.0.0.1", port=port),
                        applications=[Application(name=APP, args=args)])


@pytest.fixture(scope="module")
def service(cluster_root, postgres_server):
    """Start the two nodes, fill the registry, deploy; tear everything down by pid even on failure."""
    if not (DEMO / ".built").exists() or not (DEMO / "gate" / "CURRENT").exists():
        pytest.skip(f"demo experts or gate missing under {DEMO}: run `make demo gate`")
    import ray

    from deploy.app import deploy
    from deploy.serve_env import serve_env
    from gating.registry_store import StoreGateRegistry

    db_url = postgres_server.new_database()
    StoreGateRegistry(db_url).add(two_expert_gate("gate-v1", None, seed=1), promote=True, reason="cluster test")
    haproxy = cluster_root / "haproxy"
    env = {**os.environ, **serve_env({
        "ENSEMBLE_STORE_URL": db_url, "VLLM_LOGGING_LEVEL": "WARNING",
        # HAProxy's files under this cluster's root, not /tmp/haproxy-serve shared with other services.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
    })}
    env.pop("RAY_ADDRESS", None)
    cluster = LocalCluster(cluster_root, env)
    # The driver (swap, registry) uses the same database, and joins with the cluster's token.
    driver_env = {"ENSEMBLE_STORE_URL": db_url, **cluster.auth_env}
    saved_env = {k: os.environ.get(k) for k in driver_env}
    os.environ.update(driver_env)
    config = cluster_config(cluster_root, free_port())
    try:
        head = cluster.start_head({"head_node": 10, "gateway_slot": 1, "code_slot": 1})
        worker = cluster.add_worker("worker", {"worker_node": 10, "gateway_slot": 1, "code_slot": 1})
        ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
        alive = [n for n in ray.nodes() if n["Alive"]]
        head.node_id = next(n["NodeID"] for n in alive if "head_node" in n["Resources"])
        worker.node_id = next(n["NodeID"] for n in alive if "worker_node" in n["Resources"])
        t0 = time.monotonic()
        try:
            deploy(config, timeout_s=600)
        except (RuntimeError, TimeoutError) as exc:
            from ray import serve

            app = serve.status().applications.get(APP)
            detail = {name: (d.status, d.message) for name, d in (app.deployments if app else {}).items()}
            raise RuntimeError(f"{exc}; deployments: {detail}") from exc
        deploy_s = time.monotonic() - t0
        base_url = f"http://127.0.0.1:{config.http_options.port}"
        _wait_healthy(base_url)
        yield {"cluster": cluster, "config": config, "db_url": db_url, "base_url": base_url, "head": head,
               "worker": worker, "deploy_s": deploy_s, "results": {},
               "haproxy_stats": int(env["RAY_SERVE_HAPROXY_STATS_PORT"])}
    finally:
        try:
            if ray.is_initialized():
                from ray import serve

                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            left = cluster.stop()
            assert not left, f"processes of the test cluster survived teardown: {left}"


def _wait_healthy(base_url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/health not 200 after {timeout_s:.0f} s")


def _replicas(deployment: str):
    from deploy.replicas import replicas

    return replicas(APP, deployment)


def _sql(db_url: str, query: str, **params):
    import sqlalchemy as sa

    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(query), params).all()
    finally:
        engine.dispose()


def _flush_every_gateway() -> None:
    from ray import serve

    handle = serve.get_app_handle(APP)
    for r in _replicas("gateway"):
        assert handle.flush_log.remote(replica=r.replica_id).result(timeout_s=60)


class RequestFailed(Exception):
    """An HTTP error from the gateway, with the error body it sent (what the service said went wrong)."""


async def _raise_for_status(r: httpx.Response) -> None:
    if r.status_code >= 400:
        await r.aread()
        raise RequestFailed(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")


def _kinds(errors: list[Exception]) -> dict[str, int]:
    """Failed requests by what went wrong (the error text without its request ids)."""
    from collections import Counter

    return dict(Counter(re.sub(r"(chat)?cmpl-[0-9a-f]+", "<id>", repr(e))[:300] for e in errors).most_common(8))


def _failure_context(service) -> str:
    """What a failed request test prints besides the error: /health now, and the last warnings and errors of
    every replica (gateways and experts), from the nodes' Serve logs: CI keeps only pytest's output."""
    try:
        health = httpx.get(f"{service['base_url']}/health", timeout=30).text
    except httpx.HTTPError as exc:
        health = repr(exc)
    lines = [f"/health: {health[:2000]}"]
    for log in sorted(service["cluster"].root.glob("*/session_latest/logs/serve/replica_*.log")):
        text = log.read_text(errors="replace").splitlines()
        tail = [line for line in text if line.startswith(("WARNING", "ERROR")) or "Traceback" in line][-12:]
        if tail:
            lines += [f"{log.parts[-5]}/{log.name}:"] + [f"  {line[:400]}" for line in tail]
    return "\n".join(lines)


async def _one(client: httpx.AsyncClient, i: int, *, stream: bool, chat: bool, prompt: str,
               max_tokens: int = 8, temperature: float = 0.8) -> dict:
    body: dict = {"model": "ensemble", "max_tokens": max_tokens, "temperature": temperature, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        r = await client.post(path, json=body)
        await _raise_for_status(r)
        data = r.json()
        text = data["choices"][0]["message"]["content"] if chat else data["choices"][0]["text"]
        return {"id": data["id"], "text": text, "fingerprint": data["system_fingerprint"]}
    ids, parts, fingerprint = set(), [], None
    async with client.stream("POST", path, json=body) as r:
        await _raise_for_status(r)
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            import json

            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            ids.add(chunk["id"])
            fingerprint = chunk.get("system_fingerprint", fingerprint)
            for c in chunk.get("choices", []):
                parts.append((c.get("delta") or {}).get("content") or "" if chat else c.get("text") or "")
        assert done, "stream ended without [DONE]"
    assert len(ids) == 1, ids
    return {"id": ids.pop(), "text": "".join(parts), "fingerprint": fingerprint}


async def _send_all(base_url: str, specs: list[dict], concurrency: int = 16) -> list:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)   # new connection per
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:  # request: HAProxy
        async def run(i: int, spec: dict):                                               # spreads them
            async with sem:
                try:
                    return await _one(client, i, **spec)
                except Exception as exc:  # noqa: BLE001 - counted, not raised: the test reports every error
                    return exc
        return await asyncio.gather(*(run(i, s) for i, s in enumerate(specs)))


def _scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def _series(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {label string: value} for one metric name (a counter with or without `_total`)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:_total)?\{{(.*)\}} ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _haproxy_sessions(port: int) -> dict[str, int]:
    """HAProxy's cumulative sessions per backend server (= per gateway replica) from its CSV stats page."""
    import csv
    import io

    text = httpx.get(f"http://127.0.0.1:{port}/stats;csv", timeout=10).text.lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {f"{r['pxname']}/{r['svname']}": int(r["stot"] or 0) for r in rows
            if r["svname"] not in ("FRONTEND", "BACKEND") and r["pxname"] != "stats"}


def _spread(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


# ---- the tests, in order: they share one deployed service ---------------------------------------------------


def test_replicas_land_on_both_nodes(service) -> None:
    head, worker = service["head"].node_id, service["worker"].node_id
    gateways = _replicas("gateway")
    code = _replicas("expert-code")
    prose = _replicas("expert-prose")
    assert len(gateways) == 2 and {r.node_id for r in gateways} == {head, worker}, gateways
    assert len(code) == 2 and {r.node_id for r in code} == {head, worker}, code
    assert [r.node_id for r in prose] == [head], prose
    mem = service["cluster"].rss_gib()
    service["results"]["rss_gib_after_deploy"] = round(mem, 2)
    print(f"\ncluster up: deploy {service['deploy_s']:.0f} s, RSS of the cluster's processes {mem:.1f} GiB")


def test_200_requests_through_both_gateway_replicas_logged_once(service) -> None:
    specs = [{"stream": i % 2 == 0, "chat": i % 4 in (1, 2), "prompt": PROMPTS[i % len(PROMPTS)]}
             for i in range(N_REQUESTS)]
    before = _haproxy_sessions(service["haproxy_stats"])
    t0 = time.monotonic()
    results = asyncio.run(_send_all(service["base_url"], specs))
    elapsed = time.monotonic() - t0
    spread = _spread(before, _haproxy_sessions(service["haproxy_stats"]))
    print(f"\nHAProxy sessions per gateway replica: {spread}")
    assert len(spread) >= 2, f"requests did not reach both gateway replicas: {spread}"
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of {N_REQUESTS} failed: {_kinds(errors)}\n{_failure_context(service)}"
    ids = [r["id"] for r in results]
    assert len(set(ids)) == N_REQUESTS
    service["results"].update(ids=ids, rps=round(N_REQUESTS / elapsed, 2))
    print(f"\n{N_REQUESTS} requests (half streaming) in {elapsed:.1f} s: {N_REQUESTS / elapsed:.1f} req/s")

    _flush_every_gateway()
    rows = _sql(service["db_url"], "SELECT request_id, count(*) FROM requests GROUP BY request_id")
    logged = dict(rows)
    assert set(ids) <= set(logged), f"{len(set(ids) - set(logged))} requests missing from PostgreSQL"
    assert all(logged[i] == 1 for i in ids)
    assert len(logged) == N_REQUESTS, f"{len(logged)} rows for {N_REQUESTS} requests"
    assert not (Path(service["config"].app.traffic_log.url.removeprefix("sqlite:///"))).exists(), \
        "the YAML's SQLite store was written: ENSEMBLE_STORE_URL did not reach a replica"


def test_feedback_accepted_for_every_request_through_any_replica(service) -> None:
    ids = service["results"].get("ids")
    if not ids:
        pytest.skip("needs the requests of the previous test")

    async def post_all() -> list[int]:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=service["base_url"], timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(8)

            async def one(rid: str, rating: int) -> int:
                async with sem:
                    r = await client.post("/v1/feedback", json={"request_id": rid, "rating": rating})
                    return r.status_code
            return await asyncio.gather(*(one(rid, 1 - (i % 3)) for i, rid in enumerate(ids)))

    before = _haproxy_sessions(service["haproxy_stats"])
    statuses = asyncio.run(post_all())
    spread = _spread(before, _haproxy_sessions(service["haproxy_stats"]))
    print(f"\nfeedback: HAProxy sessions per gateway replica: {spread}")
    assert statuses.count(200) == len(ids), {s: statuses.count(s) for s in set(statuses)}
    # Both replicas took feedback, for requests that (by the same spread) the other one had served.
    assert len(spread) >= 2, f"feedback did not reach both gateway replicas: {spread}"
    _flush_every_gateway()
    (count,), = _sql(service["db_url"], "SELECT count(DISTINCT request_id) FROM feedback")
    assert count == len(ids)


def test_metrics_of_both_gateway_replicas_through_rays_pipeline(service) -> None:
    """Each node's metrics agent exports the replicas on it; together they show both gateway replicas, each
    having served completions."""
    ids = service["results"].get("ids")
    if not ids:
        pytest.skip("needs the requests of the previous tests")
    ports = [n.metrics_port for n in service["cluster"].nodes]
    gateways = {r.replica_id for r in _replicas("gateway")}
    deadline = time.monotonic() + 90
    while True:
        series = {}
        for port in ports:
            for labels, v in _series(_scrape(port), "ray_ensemble_requests_total").items():
                series[labels] = series.get(labels, 0.0) + v
        per_replica: dict[str, dict[str, float]] = {}
        for labels, v in series.items():
            rep = re.search(r'replica="([^"]+)"', labels)
            ep = re.search(r'endpoint="([^"]+)"', labels)
            if rep and ep:
                per_replica.setdefault(rep.group(1), {}).setdefault(ep.group(1), 0.0)
                per_replica[rep.group(1)][ep.group(1)] += v
        served = lambda d: sum(d.values())
        done = set(per_replica) >= gateways and sum(served(d) for d in per_replica.values()) >= N_REQUESTS
        if done or time.monotonic() > deadline:
            break
        time.sleep(3)
    print(f"\nray_ensemble_requests_total per gateway replica: {per_replica}")
    service["results"]["per_replica"] = per_replica
    assert set(per_replica) >= gateways, f"metrics of {sorted(gateways - set(per_replica))} not exported"
    for rid in gateways:
        assert served(per_replica[rid]) > 0, (rid, per_replica[rid])


def test_retrain_reads_every_logged_request_promotes_and_both_replicas_serve_it(service) -> None:
    """`ensemble retrain` on the cluster: it reads the whole PostgreSQL log, scores it with the live experts,
    fits, promotes (--force: the promotion rule itself is tests/integration/test_retrain_demo.py's) and swaps;
    the swap is confirmed on both gateway replicas, and new requests through either carry the new version."""
    import argparse

    from deploy.retrain_job import add_arguments, retrain_from_log

    if not service["results"].get("ids"):
        pytest.skip("needs the requests and feedback of the previous tests")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--force", "--epochs", "4", "--json"])
    _flush_every_gateway()
    (logged,), = _sql(service["db_url"], "SELECT count(*) FROM requests")
    result = asyncio.run(retrain_from_log(args, config=service["config"]))
    print(f"\nretrain on the cluster: {({k: result[k] for k in ('records_read', 'feedback_read', 'new_version')})}, "
          f"swap confirmed on {result['swap']['replicas']} gateway replicas")
    assert result["records_read"] == logged >= N_REQUESTS and result["feedback_read"] == N_REQUESTS, result
    assert result["promoted"] and result["new_version"] != result["old_version"], result
    assert result["swapped_live"] and result["swap"]["replicas"] == 2, result
    service["results"]["gate"] = result["new_version"]

    # Each replica reported the new version itself (the swap's confirmation above, read per replica from the
    # store); new requests, spread by HAProxy, all carry it. (HAProxy's per-server counters are not compared
    # here: the swap's redeploy may reload HAProxy, which resets them.)
    specs = [{"stream": i % 2 == 0, "chat": False, "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(16)]
    results = asyncio.run(_send_all(service["base_url"], specs, concurrency=8))
    assert all(not isinstance(r, Exception) for r in results), results
    assert {r["fingerprint"] for r in results} == {result["new_version"]}


def test_greedy_output_identical_with_one_and_two_code_replicas(service) -> None:
    """temperature 0: the same prompts give the same text whichever code replica (or how many) serve them."""
    from deploy.app import deploy
    from deploy.config import Application

    specs = [{"stream": i % 2 == 0, "chat": False, "prompt": p, "max_tokens": 16, "temperature": 0.0}
             for i, p in enumerate(PROMPTS * 2)]
    two = asyncio.run(_send_all(service["base_url"], specs, concurrency=12))
    assert all(not isinstance(r, Exception) for r in two), two
    texts_two = [r["text"] for r in two]
    assert texts_two[: len(PROMPTS)] == texts_two[len(PROMPTS):], "greedy output differs between repeats"

    config = service["config"]
    entry = config.applications[0]
    one_code = Application(**{**entry.model_dump(exclude={"args"}), "args": entry.args,
                              "deployments": [{"name": "expert-code", "num_replicas": 1}]})
    scaled = config.model_copy(update={"applications": [one_code]})
    # A `deployments:` override of num_replicas only scales: no other replica (nor engine) restarts.
    gate = service["results"].get("gate", "gate-v1")
    deploy(scaled, gateway_user_config={"gate": {"path": config.app.gate.path, "version": gate},
                                        "draining": False}, timeout_s=300)
    deadline = time.monotonic() + 120
    while len(_replicas("expert-code")) != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(_replicas("expert-code")) == 1
    one = asyncio.run(_send_all(service["base_url"], specs, concurrency=12))
    assert all(not isinstance(r, Exception) for r in one), one
    assert [r["text"] for r in one] == texts_two


def test_stopping_the_worker_node_leaves_the_head_serving(service) -> None:
    """The worker node goes away (its raylet and every process on it stopped). Once Serve has noticed (no
    replica left on the worker, every deployment running on the head), requests succeed with no error."""
    cluster, head, worker = service["cluster"], service["head"], service["worker"]
    cluster.stop_node(worker)

    def head_only() -> bool:
        running = {d: _replicas(d) for d in ("gateway", "expert-code", "expert-prose")}
        return all(reps and all(r.node_id == head.node_id for r in reps) for reps in running.values())

    deadline = time.monotonic() + 300
    while not head_only():
        assert time.monotonic() < deadline, "Serve did not settle on the head node within 300 s"
        time.sleep(1)
    _wait_healthy(service["base_url"])
    deadline = time.monotonic() + 300
    while httpx.get(f"{service['base_url']}/health", timeout=30).json()["status"] != "ok":
        assert time.monotonic() < deadline, "the head's service did not report ok within 300 s"
        time.sleep(1)
    specs = [{"stream": i % 2 == 0, "chat": i % 4 == 1, "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(40)]
    results = asyncio.run(_send_all(service["base_url"], specs, concurrency=8))
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, (f"{len(errors)} of {len(specs)} failed after the worker stopped: {_kinds(errors)}\n"
                        f"{_failure_context(service)}")
    print(f"\nworker stopped: head serves with {len(_replicas('gateway'))} gateway and "
          f"{len(_replicas('expert-code'))} code replica(s), {len(specs)} requests, 0 errors")
