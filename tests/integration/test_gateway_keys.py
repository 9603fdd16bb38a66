"""API keys on the real service (Ray Serve + vLLM experts): 401/200, 429 then 200 after Retry-After, a stream
limit, feedback ownership (404), admin scope (403), live revocation, and no key material in the log database,
the Ray session logs or /metrics. Keys go into the live gateway's own store and are all revoked at the end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from orchestrator.service import REQUEST_ID_HEADER

pytestmark = pytest.mark.integration
REFRESH_WAIT_S = 15       # the gateway reloads keys every ~2 s; allow for a loaded 2-core machine


def wait_until(check: Callable[[], bool], timeout_s: float = REFRESH_WAIT_S, every_s: float = 0.2) -> float:
    """Poll `check` until it holds -> seconds it took; fail after timeout_s."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every_s)
    return time.monotonic() - t0


def status(base_url: str, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{base_url}{path}", headers=headers, timeout=120, **kw)


def completion(**kw) -> dict:
    return {"model": "ensemble", "prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def keys(live_gateway):
    """Keys in the live gateway's store; on teardown all revoked and the gateway seen open again."""
    from orchestrator.keys import KeySpecError, KeyStore

    url = live_gateway.config.traffic_log.database_url()
    store = KeyStore(url)
    run = uuid.uuid4().hex[:6]
    names: dict[str, str] = {}
    tokens: dict[str, str] = {}

    def add(role: str, **kw) -> str:
        key, token = store.add(f"it-{run}-{role}", **kw)
        names[role], tokens[role] = key.name, token
        return token

    for role, kw in {"user": {}, "other": {}, "admin": {"scope": "admin"}, "limited": {"rpm": 6},
                     "streams": {"max_streams": 1}}.items():
        add(role, **kw)
    base = live_gateway.base_url
    wait_until(lambda: status(base, "GET", "/v1/models").status_code == 401)
    ns = SimpleNamespace(store=store, url=url, add=add, names=names, tokens=tokens, base=base)
    yield ns
    for name in names.values():
        try:
            store.revoke(name)
        except KeySpecError:
            pass                          # revoked by a test already
    store.close()
    # The next module runs without keys: wait until this gateway's cached view says so.
    wait_until(lambda: status(base, "GET", "/v1/models").status_code == 200)


def test_401_without_or_with_a_wrong_key_and_200_with_one(keys, live_gateway) -> None:
    import openai

    base, user = keys.base, keys.tokens["user"]
    wrong = user[:-4] + ("AAAA" if not user.endswith("AAAA") else "BBBB")
    for token in (None, "sk-test-not-checked", wrong):
        r = status(base, "POST", "/v1/completions", token, json=completion())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = status(base, "POST", "/v1/completions", user, json=completion())
    assert r.status_code == 200
    assert live_gateway.records()[r.headers[REQUEST_ID_HEADER]].key_name == keys.names["user"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=user, max_retries=0)
    assert client.completions.create(**completion()).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key=wrong, max_retries=0).models.list()
    assert status(base, "GET", "/health").status_code == 200                  # health stays open
    assert status(base, "GET", "/metrics").status_code == 401                 # metrics closed by default
    assert status(base, "GET", "/metrics", user).status_code == 200


def test_429_after_the_rpm_limit_then_200_after_retry_after(keys) -> None:
    base, token = keys.base, keys.tokens["limited"]
    t0, served = time.monotonic(), 0
    for _ in range(30):
        r = status(base, "POST", "/v1/completions", token, json=completion(max_tokens=1))
        if r.status_code != 200:
            break
        served += 1
    elapsed = time.monotonic() - t0
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    # A burst of rpm at once, then one per 60/rpm s: the refill during the loop is all that may add to it.
    assert 6 <= served <= 6 + int(elapsed / 10) + 1
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 10
    time.sleep(retry_after)                     # the server's own answer to "when": honour it exactly
    assert status(base, "POST", "/v1/completions", token, json=completion(max_tokens=1)).status_code == 200


def test_a_second_stream_over_max_streams_gets_429_until_the_first_ends(keys) -> None:
    base, token = keys.base, keys.tokens["streams"]
    body = completion(stream=True, max_tokens=200, ignore_eos=True)
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"},
                      timeout=120) as first:
        assert first.status_code == 200
        # Keep the line iterator referenced: dropping it (e.g. `next(first.iter_lines())`) closes the
        # connection at once, the gateway sees a client disconnect and frees the slot before the check below.
        lines = first.iter_lines()
        event = next(line for line in lines if line.startswith("data: "))
        assert '"error"' not in event, event      # the stream is running (not ended by an in-band error)
        r = status(base, "POST", "/v1/completions", token, json=completion())
        assert r.status_code == 429 and "max_streams" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        del lines                                 # now the client goes away
    # Closing the stream frees its slot (released off the event loop, so look for it).
    wait_until(lambda: status(base, "POST", "/v1/completions", token, json=completion()).status_code == 200,
               timeout_s=30)


def test_feedback_only_from_the_requests_key_or_an_admin(keys) -> None:
    base, t = keys.base, keys.tokens
    rid = status(base, "POST", "/v1/completions", t["user"], json=completion()).headers[REQUEST_ID_HEADER]
    fb = {"request_id": rid, "rating": -1, "corrected_text": "steer the next gate"}
    r = status(base, "POST", "/v1/feedback", t["other"], json=fb)
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    assert status(base, "POST", "/v1/feedback", t["user"], json=fb).status_code == 200
    assert status(base, "POST", "/v1/feedback", t["admin"], json=fb).status_code == 200


def test_admin_actions_need_an_admin_key(keys) -> None:
    base, t = keys.base, keys.tokens
    r = status(base, "GET", "/v1/admin/keys", t["user"])
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
    assert status(base, "DELETE", f"/v1/admin/keys/{keys.names['other']}", t["user"]).status_code == 403
    r = status(base, "GET", "/v1/admin/keys", t["admin"])
    assert r.status_code == 200 and keys.names["user"] in {k["name"] for k in r.json()["data"]}


def test_revocation_takes_effect_live(keys) -> None:
    from orchestrator.cli import main

    base, token = keys.base, keys.add("victim")
    wait_until(lambda: status(base, "GET", "/v1/models", token).status_code == 200)
    assert main(["keys", "revoke", keys.names["victim"], "--store", keys.url]) == 0
    took = wait_until(lambda: status(base, "GET", "/v1/models", token).status_code == 401)
    assert took < 10, f"revocation took {took:.1f} s"
    # ... and over HTTP, by an admin.
    other = keys.tokens["other"]
    assert status(base, "DELETE", f"/v1/admin/keys/{keys.names['other']}", keys.tokens["admin"]).status_code == 200
    wait_until(lambda: status(base, "GET", "/v1/models", other).status_code == 401)


def _ray_log_files() -> list[Path]:
    import ray

    node = ray._private.worker._global_node
    logs = Path(node.get_logs_dir_path()) if node is not None else Path("/tmp/ray/session_latest/logs")
    return [p for p in logs.rglob("*") if p.is_file()]


def test_no_key_material_in_the_log_database_ray_logs_or_metrics(keys, live_gateway) -> None:
    live_gateway.flush_log()
    metrics = status(keys.base, "GET", "/metrics", keys.tokens["admin"]).text
    assert "ensemble_key_rejected_total" in metrics
    secrets = [s for t in keys.tokens.values() for s in (t, t.split("-", 2)[2])]
    places = {"metrics": metrics.encode()}
    for db in live_gateway.db.parent.glob(live_gateway.db.name + "*"):      # the file and its WAL
        places[str(db)] = db.read_bytes()
    files = _ray_log_files()
    assert files, "no Ray session logs found"
    for f in files:
        places[str(f)] = f.read_bytes()
    leaks = [(where, s[:12]) for where, blob in places.items() for s in secrets if s.encode() in blob]
    assert not leaks, f"key material found in {leaks}"
