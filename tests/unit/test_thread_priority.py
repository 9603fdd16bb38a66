"""The in-process engine thread lowers its own priority, and only its own (Linux keeps niceness per thread)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from experts.thread_priority import ENGINE_NICE_INCREMENT, MAX_NICE, lower_this_thread

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
