"""Faults on the real service (Serve + vLLM experts): real processes are killed, stopped and disconnected.

- an expert's only replica is SIGKILLed mid-stream: no stream fails; each session continues on Serve's
  replacement replica (migration) or, until that answers, the tokens it missed are marked degraded (response,
  traffic log, metric), and the expert is used again once Serve replaced it;
- one of two replicas of an expert is SIGKILLed: its sessions migrate to the other replica by replaying
  their tokens, and the temperature-0 outputs are identical to a run without the kill;
- a replica's vLLM EngineCore process is SIGKILLed: Serve's health check replaces the replica, no stream fails;
- a replica hangs (SIGSTOP): the per-step timeout treats it as dead, no stream fails;
- one of two replicas of an expert starts answering NaN (a weight of its live model set to NaN): its sessions
  move to the sound replica, which gets every new session (quarantine), with identical temperature-0 output;
- a replica resets the direct (data-plane) sockets the gateway's per-token calls use: no stream fails, the
  gateway reconnects, and nothing is left open on the replica;
- 200 clients cut their sockets mid-stream (RST): every session and generation on every expert replica is
  closed, and every request is in the traffic log.

Each test leaves the service healthy (it waits for Serve to replace what it killed), so later modules run on
an intact service. Runs inside the session's live gateway (tests/integration/gateway_fixtures.py).
"""

from __future__ import annotations

import math
import signal
import threading

import httpx
import pytest

from deploy.config import Application, DeployConfig
from deploy.replica_load import replica_stats
from tests.integration.faults import (
    engine_core_pid,
    health,
    kill,
    read_first_event,
    replicas,
    reset,
    run_streams,
    send_completion,
    wait_all_experts_ok,
    wait_for,
)
from tests.integration.faults import metric as base_metric

pytestmark = pytest.mark.integration

PROMPTS = ["def parse_config(path):", "The river wound through the valley", "Solve: 12 * (3 + 4) =",
           '{"items": [', "import os\nimport sys\n", "Once upon a time"]


# Long enough that no stream ends while the others are still starting (the fault must find all of them running).
MAX_TOKENS = 128


def bodies(n: int = 6, **extra) -> list[dict]:
    # experts_per_token=4: every token asks every expert, so a fault on any expert hits every stream.
    return [{"model": "ensemble", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "ignore_eos": True,
             "experts_per_token": 4, "temperature": 0.8, **extra} for i in range(n)]


def the_replica(gw, expert: str):
    (only,) = wait_for(f"one live replica of {expert}", lambda: replicas(gw.app_name, f"expert-{expert}") or None)
    return only


def metric(gw, name: str) -> float:
    return base_metric(gw.base_url, name)


def assert_no_stream_failed(runs) -> None:
    for run in runs:
        assert run.error is None and run.status == 200, (run.request_id, run.status, run.error)
        assert run.finish_reason == "length" and run.usage["completion_tokens"] == MAX_TOKENS, (run.request_id, run.usage)


@pytest.fixture
def healthy_after(live_gateway):
    """Every expert is ok before the test and again after it (Serve replaced what the test killed)."""
    names = [e.name for e in live_gateway.config.experts]
    wait_all_experts_ok(live_gateway.base_url, names)
    yield live_gateway
    wait_all_experts_ok(live_gateway.base_url, names)


def test_killing_an_experts_only_replica_fails_no_stream_and_degrades_or_migrates_each_session(healthy_after) -> None:
    """Each session on the dead replica either continues on Serve's replacement replica (re-opened from its
    tokens, when the replacement answers within expert_timeout_s: an in-process engine starts in seconds) or,
    until then, loses math for some tokens, which are marked degraded. Either way no stream fails, and what is
    reported as degraded is exactly what the log and the metric say."""
    gw = healthy_after
    victim = the_replica(gw, "math")
    degraded_before = metric(gw, "ensemble_degraded_tokens_total")
    migrations_before = metric(gw, "ensemble_session_migrations_total")
    runs = run_streams(gw.base_url, bodies(), fault=lambda: kill(victim.pid))

    assert_no_stream_failed(runs)
    for run in runs:
        assert len(run.degraded_positions) == run.usage["degraded_tokens"], run.request_id
        # A token without math is degraded; every other token was answered by math (old replica or new one).
        assert run.usage["expert_tokens"]["math"] + run.usage["degraded_tokens"] == MAX_TOKENS, run.usage
    degraded = sum(len(r.degraded_positions) for r in runs)
    migrated = metric(gw, "ensemble_session_migrations_total") - migrations_before
    assert degraded or migrated >= len(runs), ("the kill had no effect?", degraded, migrated)
    if degraded:                      # math failed a step: /health says so (down, or degraded for 30 s after)
        report = health(gw.base_url)
        assert report["status"] == "degraded" and report["experts"]["math"]["state"] in ("down", "degraded"), report
    assert metric(gw, "ensemble_degraded_tokens_total") - degraded_before >= degraded
    records = gw.records()
    for run in runs:
        assert list(records[run.request_id].degraded_tokens) == run.degraded_positions, run.request_id

    # Serve replaces the replica; the gate's choice of math is honoured again (no degraded token).
    wait_for("a new math replica", lambda: [r for r in replicas(gw.app_name, "expert-math") if r.pid != victim.pid])
    wait_all_experts_ok(gw.base_url, [e.name for e in gw.config.experts])
    (after,) = run_streams(gw.base_url, bodies(1))
    assert after.error is None and after.usage["degraded_tokens"] == 0, after.usage


@pytest.fixture
def two_code_replicas(healthy_after):
    """The live app with 2 replicas of `code` (a deployment override: nothing else restarts), then 1 again."""
    from deploy.app import deploy

    gw = healthy_after
    app = gw.deploy_config.applications[0]
    scaled = Application.model_validate({**app.model_dump(), "deployments": [
        {"name": "expert-code", "num_replicas": 2}]})
    deploy(DeployConfig.model_validate({**gw.deploy_config.model_dump(), "applications": [scaled.model_dump()]}))
    wait_for("two code replicas", lambda: len(replicas(gw.app_name, "expert-code")) == 2)
    # The gateway's routers hear of the new replica: new sessions may now be placed on it.
    wait_for("the gateway to route to both", lambda: metric(gw, 'ensemble_expert_routable_replicas{expert="code"}') == 2,
             timeout_s=60)
    yield gw
    deploy(gw.deploy_config)
    wait_for("one code replica", lambda: len(replicas(gw.app_name, "expert-code")) == 1)


def test_killing_one_of_two_replicas_migrates_sessions_with_identical_output(two_code_replicas) -> None:
    gw = two_code_replicas
    greedy = bodies(temperature=0)
    reference = run_streams(gw.base_url, greedy)
    assert_no_stream_failed(reference)

    pids = {r.pid for r in replicas(gw.app_name, "expert-code")}
    migrations_before = metric(gw, "ensemble_session_migrations_total")

    def kill_the_busier_replica() -> None:     # streams are running: both replicas hold some of their sessions
        victim = max(replicas(gw.app_name, "expert-code"), key=lambda r: sessions_on(gw, "code", r.replica_id))
        assert sessions_on(gw, "code", victim.replica_id) > 0
        kill(victim.pid)

    killed = run_streams(gw.base_url, greedy, fault=kill_the_busier_replica)

    assert_no_stream_failed(killed)
    assert metric(gw, "ensemble_session_migrations_total") > migrations_before, "the kill moved no session"
    for ref, run in zip(reference, killed):
        assert run.usage["degraded_tokens"] == 0, run.usage        # the other replica answered every step
        assert run.text == ref.text, (run.request_id, ref.text, run.text)
    wait_for("Serve to replace the killed replica",
             lambda: len(replicas(gw.app_name, "expert-code")) == 2
             and {r.pid for r in replicas(gw.app_name, "expert-code")} != pids)


def test_a_replica_whose_model_goes_bad_while_it_serves_only_native_generations_is_replaced(
        two_code_replicas) -> None:
    """model=<expert> is decoded by vLLM alone (native generations), with no session step for the replica to
    judge. One replica of code generates natively (soundly) once, then gets NaN in a weight, then one more native
    generation is started on it directly; no session is opened there by the test. Its deltas' logprobs are non-finite,
    so it probes itself, finds the probe unsound too, fails its health check, and Serve replaces it
    (experts/self_check.py observe_generated). The gateway's own model=code streams meanwhile fail none."""
    from ray import serve

    from experts.protocol import GenerateRequest

    gw = two_code_replicas
    handle = serve.get_deployment_handle("expert-code", gw.app_name)
    victim = replicas(gw.app_name, "expert-code")[0]
    native = [{"model": "code", "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
              for p in PROMPTS]

    def generate_on_the_victim(rid: str) -> tuple:
        reply = handle.start.remote([GenerateRequest(rid, (5, 6, 7, 8), 8, ignore_eos=True)], "the-test",
                                    replica=victim.replica_id).result()
        assert reply.errors == (None,), reply
        deltas: list = []
        while not any(d.final for d in deltas):          # each poll waits up to 5 s for the next deltas
            deltas += handle.poll.remote("the-test", [], 5.0, replica=victim.replica_id).result().deltas
        return tuple(lp for d in deltas for lp in d.logprobs)

    try:
        assert all(math.isfinite(lp) for lp in generate_on_the_victim("sound")), "sound before the fault?"
        handle.corrupt_weights.remote(replica=victim.replica_id).result()
        assert not any(math.isfinite(lp) for lp in generate_on_the_victim("corrupt")), "the fault did nothing"
        runs = run_streams(gw.base_url, native)
        wait_for("Serve to replace the corrupt replica, which only generated natively",
                 lambda: victim.pid not in {r.pid for r in replicas(gw.app_name, "expert-code")}, timeout_s=120)
    finally:
        if victim.pid in {r.pid for r in replicas(gw.app_name, "expert-code")}:
            kill(victim.pid)                                       # a corrupt replica left running: clean up
    assert_no_stream_failed(runs)


def sessions_on(gw, expert: str, replica_id: str) -> int:
    """Open sessions of one replica, asked of that replica itself (the router pins calls with `replica=`)."""
    return replica_stats(gw.app_name, [expert])[expert][replica_id].open_sessions


def test_killing_a_replicas_engine_core_gets_it_replaced_and_fails_no_stream(healthy_after) -> None:
    gw = healthy_after
    victim = the_replica(gw, "prose")
    core = engine_core_pid(victim.pid)
    runs = run_streams(gw.base_url, bodies(), fault=lambda: kill(core))
    assert_no_stream_failed(runs)
    assert any(run.usage["degraded_tokens"] for run in runs), "the dead engine answered?"
    wait_for("Serve to replace the replica whose engine died",
             lambda: [r for r in replicas(gw.app_name, "expert-prose") if r.pid != victim.pid])


def test_a_hung_replica_times_out_and_fails_no_stream(healthy_after) -> None:
    gw = healthy_after
    victim = the_replica(gw, "json")
    try:
        runs = run_streams(gw.base_url, bodies(), fault=lambda: kill(victim.pid, signal.SIGSTOP))
        assert_no_stream_failed(runs)
        assert all(run.usage["degraded_tokens"] for run in runs), [r.usage for r in runs]
        assert health(gw.base_url)["experts"]["json"]["state"] in ("down", "degraded")
    finally:
        try:
            kill(victim.pid, signal.SIGCONT)      # Serve may have replaced (killed) it already
        except ProcessLookupError:
            pass


def test_cutting_a_replicas_data_plane_sockets_fails_no_stream_and_leaks_nothing(healthy_after) -> None:
    """The replica resets every direct connection (a real TCP RST on the sockets the gateway's per-token calls
    use) while mixed and native streams run on it: the steps in flight are re-opened (migration), the native
    generations restart, the gateway reconnects, and the sessions and generations left on the replica are
    closed afterwards."""
    from ray import serve

    gw = healthy_after
    victim = the_replica(gw, "code")
    handle = serve.get_deployment_handle("expert-code", gw.app_name)
    before = replica_stats(gw.app_name, ["code"])["code"][victim.replica_id]
    migrations_before = metric(gw, "ensemble_session_migrations_total")
    native = [{"model": "code", "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.8}
              for p in PROMPTS[:2]]
    cuts: list[int] = []

    def cut_until_a_step_is_caught() -> None:
        """A cut that lands between two rounds finds no step on the wire (the gateway just reconnects): cut
        again, each time the real fault, until one has caught a step (it is re-opened within a round)."""
        for _ in range(10):
            cuts.append(handle.cut_data_plane.remote(replica=victim.replica_id).result())
            try:
                wait_for("a step re-opened after the cut", timeout_s=0.5, poll_s=0.05,
                         predicate=lambda: metric(gw, "ensemble_session_migrations_total") > migrations_before)
                return
            except AssertionError:
                continue

    runs = run_streams(gw.base_url, bodies(4) + native, fault=cut_until_a_step_is_caught)

    assert cuts[0] >= 1, "the gateway had no direct connection to cut"
    assert_no_stream_failed(runs)
    assert metric(gw, "ensemble_session_migrations_total") > migrations_before, f"no step in flight in {len(cuts)} cuts"
    after = replica_stats(gw.app_name, ["code"])["code"][victim.replica_id]
    assert after.data_plane_calls > before.data_plane_calls, "per-token calls did not use the data plane"
    assert after.data_plane_connections > before.data_plane_connections, "the gateway never reconnected"
    wait_for("the cut sessions and generations to be closed on the replica", lambda: (
        (st := replica_stats(gw.app_name, ["code"])["code"][victim.replica_id]).open_sessions == 0
        and st.generations == 0), timeout_s=120)


def _cut_stream(base_url: str, body: dict, ids: list, errors: list) -> None:
    """A real client that reads the first event of a stream, then resets the TCP connection."""
    try:
        s = send_completion(base_url, body)
        ids.append(read_first_event(s))
        reset(s)
    except Exception as exc:  # noqa: BLE001
        errors.append(repr(exc))


def test_clients_cutting_200_streams_leave_no_session_or_generation_open(healthy_after) -> None:
    gw = healthy_after
    expert = gw.config.experts[0].name
    ids: list[str] = []
    errors: list[str] = []
    # At most 32 clients at once: below the gateway's admission limit (48), so every request is served and
    # then cut (above it, 429s are the expected answer; tests/unit/test_admission.py covers that).
    running = threading.Semaphore(32)

    def client(i: int) -> None:
        # three in four through the mixing loop (sessions), one in four on an expert's native path (generations)
        model = expert if i % 4 == 3 else "ensemble"
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with running:
            _cut_stream(gw.base_url, body, ids, errors)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:5]
    assert len(ids) == 200

    still_open: dict = {}

    def all_closed() -> bool:
        still_open.clear()
        still_open["in_flight"] = health(gw.base_url)["in_flight"]
        for name, reps in replica_stats(gw.app_name, [e.name for e in gw.config.experts]).items():
            for rid, stats in reps.items():
                if stats.open_sessions or stats.generations:
                    still_open[f"{name}/{rid}"] = (stats.open_sessions, stats.generations)
        return still_open == {"in_flight": 0}

    try:
        wait_for("every session and generation to be closed", all_closed, timeout_s=120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still open (sessions, generations): {still_open}") from None
    records = gw.records()
    for rid in ids:
        assert rid in records and records[rid].complete and records[rid].status == 499, (rid, records.get(rid))


def test_killing_the_gateway_replica_under_load_loses_no_committed_row_and_a_new_one_serves(healthy_after) -> None:
    import sqlite3

    gw = healthy_after
    before_ids = {rid for rid, rec in gw.records().items() if rec.complete}      # flushed: committed rows
    (victim,) = wait_for("the gateway replica", lambda: replicas(gw.app_name, "gateway") or None)
    runs = run_streams(gw.base_url, bodies(), fault=lambda: kill(victim.pid))

    # In-flight streams end at once with a broken connection, not a hang and not a made-up completion.
    for run in runs:
        assert run.error is not None or run.finish_reason is None, (run.request_id, run.finish_reason)
    with sqlite3.connect(gw.db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    wait_for("a new gateway replica", lambda: [r for r in replicas(gw.app_name, "gateway") if r.pid != victim.pid])
    wait_all_experts_ok(gw.base_url, [e.name for e in gw.config.experts])
    after = gw.records()
    assert before_ids <= set(after), f"{len(before_ids - set(after))} committed rows lost"
    r = httpx.post(f"{gw.base_url}/v1/completions", timeout=120,
                   json={"model": "ensemble", "prompt": "x = ", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["x-ensemble-request-id"] in gw.records()


def test_one_corrupt_replica_of_two_is_quarantined_and_its_sessions_move_with_identical_output(two_code_replicas) -> None:
    """One of two replicas of `code` starts answering nonsense mid-stream: NaN is written into a weight of the
    model its real engine is running (experts/fault_injection.py), as a corrupt checkpoint would load. Its
    sessions are re-opened on the sound replica, and no new session goes to the corrupt one (quarantine): not
    the re-opened ones, nor those of a second batch of streams started right after the fault, for which the
    corrupt replica, now holding the fewest sessions, would be the first choice. So no stream fails, no token is
    degraded, code stays ok, and the temperature-0 text is that of a run without the fault. Only a new replica is
    sound again, and the corrupt one says so itself: its own answers come back NaN, its self-probe too, so its
    health check fails and Serve replaces it without anyone killing it (experts/self_check.py)."""
    from ray import serve

    gw = two_code_replicas
    greedy = bodies(temperature=0)
    reference = run_streams(gw.base_url, greedy)
    assert_no_stream_failed(reference)
    handle = serve.get_deployment_handle("expert-code", gw.app_name)
    unsound_before = metric(gw, "ensemble_unsound_answers_total")
    quarantines_before = metric(gw, 'ensemble_expert_quarantines_total{expert="code"}')
    pids = {r.pid for r in replicas(gw.app_name, "expert-code")}
    native = [{"model": "code", "prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
              for p in PROMPTS[:2]]
    corrupted, later = [], []

    def corrupt_the_busier_replica_then_start_more_streams() -> None:
        victim = max(replicas(gw.app_name, "expert-code"), key=lambda r: sessions_on(gw, "code", r.replica_id))
        assert sessions_on(gw, "code", victim.replica_id) > 0
        corrupted.append(victim)                              # killed afterwards, whatever the call says
        handle.corrupt_weights.remote(replica=victim.replica_id).result()
        later.extend(run_streams(gw.base_url, greedy + native))   # while the first batch still runs

    try:
        first = run_streams(gw.base_url, greedy, fault=corrupt_the_busier_replica_then_start_more_streams)
        report = health(gw.base_url)["experts"]["code"]
        assert corrupted, "the fault was never injected"
        wait_for("Serve to replace the corrupt replica, which failed its own health check",
                 lambda: corrupted[0].pid not in {r.pid for r in replicas(gw.app_name, "expert-code")}, timeout_s=120)
    finally:
        running = {r.pid for r in replicas(gw.app_name, "expert-code")}
        for victim in corrupted:                                   # a corrupt replica left running: clean up
            if victim.pid in running:                              # (a pid Serve let go may be reused by now)
                kill(victim.pid)


    assert_no_stream_failed(first)
    assert_no_stream_failed(later)                              # native generations started on the sound one too
    assert metric(gw, "ensemble_unsound_answers_total") > unsound_before, "the corrupt replica answered nothing"
    assert report["state"] == "ok", report                      # the expert never failed: its other replica answered
    # Quarantined once, that replica alone. (The gauge ensemble_expert_quarantined_replicas drops it as soon as
    # Serve has replaced it, which its self-check may make happen before the later streams end: fresh-clone run.)
    assert metric(gw, 'ensemble_expert_quarantines_total{expert="code"}') == quarantines_before + 1
    for ref, a, b in zip(reference, first, later):
        for run in (a, b):
            assert run.usage["degraded_tokens"] == 0, run.usage     # each session found the sound replica
            assert run.text == ref.text, (run.request_id, ref.text, run.text)
    wait_for("Serve to replace the corrupt replica",
             lambda: len(replicas(gw.app_name, "expert-code")) == 2
             and {r.pid for r in replicas(gw.app_name, "expert-code")} != pids)
