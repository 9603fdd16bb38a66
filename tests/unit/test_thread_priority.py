"""Thread priorities: the in-process engine thread lowers its own niceness, and only its own (Linux keeps niceness
per thread); a relay thread (an event loop that relays tokens) raises itself to real-time priority, and only
itself: the threads it starts later start as normal ones."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from experts.thread_priority import (
    ENGINE_NICE_INCREMENT,
    MAX_NICE,
    RELAY_PRIORITY_ENV,
    lower_this_thread,
    raise_relay_thread,
    relay_policy_of,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_lowering_a_thread_leaves_the_others_of_its_process_where_they_were() -> None:
    me = threading.get_native_id()
    before = _nice(me)
    seen: dict[str, int | None] = {}
    started, done = threading.Event(), threading.Event()

    def engine() -> None:
        seen["returned"] = lower_this_thread()
        seen["tid"] = threading.get_native_id()
        started.set()
        done.wait(10)

    t = threading.Thread(target=engine)
    t.start()
    try:
        assert started.wait(10)
        expected = min(MAX_NICE, before + ENGINE_NICE_INCREMENT)
        assert seen["returned"] == expected
        assert _nice(seen["tid"]) == expected
        assert _nice(me) == before                        # the caller's thread (the event loop's) is untouched
    finally:
        done.set()
        t.join()


def test_lowering_stops_at_the_lowest_priority() -> None:
    result: list[int | None] = []
    t = threading.Thread(target=lambda: result.extend([lower_this_thread(MAX_NICE), lower_this_thread(5)]))
    t.start()
    t.join()
    assert result == [MAX_NICE, MAX_NICE]


def _in_a_thread(fn):
    """Run fn in a fresh thread (a relay thread's priority must not leak into the test runner's) -> its result."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _raise_and_look() -> dict:
    me = threading.get_native_id()
    seen = {"returned": raise_relay_thread(), "policy": relay_policy_of(me)}
    seen["child"] = _in_a_thread(lambda: (relay_policy_of(threading.get_native_id()),
                                          os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    return seen


def test_a_relay_thread_runs_at_real_time_priority_and_the_threads_it_starts_do_not(monkeypatch) -> None:
    """Where the OS allows it (this machine and CI run as root): the relay thread is SCHED_RR, the caller's thread
    is untouched, and a thread the relay thread starts afterwards (an executor's worker) is a normal thread."""
    monkeypatch.delenv(RELAY_PRIORITY_ENV, raising=False)
    if os.geteuid() != 0:
        pytest.skip("real-time priority needs CAP_SYS_NICE; this test runs where it is granted (root)")
    seen = _in_a_thread(_raise_and_look)
    assert seen["returned"] == "realtime" and seen["policy"] == "realtime", seen
    assert seen["child"] == ("normal", 0), seen                     # SCHED_RESET_ON_FORK: normal, niceness 0
    assert relay_policy_of(threading.get_native_id()) == "normal"


def test_a_relay_thread_stays_normal_when_asked(monkeypatch) -> None:
    monkeypatch.setenv(RELAY_PRIORITY_ENV, "normal")
    seen = _in_a_thread(_raise_and_look)
    assert seen["returned"] == f"normal ({RELAY_PRIORITY_ENV}=normal)" and seen["policy"] == "normal", seen


def test_a_relay_thread_refused_real_time_priority_stays_normal_and_says_why(monkeypatch, caplog) -> None:
    """Without CAP_SYS_NICE (a container that does not grant it) the call is refused: the thread serves on as a
    normal one, and both the answer and a warning in the replica's log name the capability."""
    monkeypatch.delenv(RELAY_PRIORITY_ENV, raising=False)

    def refuse(*_args) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    seen = _in_a_thread(_raise_and_look)
    assert seen["policy"] == "normal", seen
    assert seen["returned"].startswith("normal (real-time refused: Operation not permitted") and \
        "CAP_SYS_NICE" in seen["returned"], seen
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("CAP_SYS_NICE" in m and RELAY_PRIORITY_ENV in m for m in warned), warned
