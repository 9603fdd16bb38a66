"""Keep an in-process engine's idle helper threads from preempting the threads that do the work.

vLLM's CPU worker sets up torch.distributed with gloo even for one process, and every gloo process group
starts a `gloo_tcp_loop` thread that wakes about 100 times a second (measured: 15 such threads per expert
replica, ≈ 6,000 wake-ups a second for four experts). Each wake-up preempts whatever runs on that core: the
engine thread or the gateway's event loop. With a world size of one nothing is ever sent over those loops, so
they get Linux's SCHED_IDLE policy: they still run, but only on a core that has nothing else to do, and their
wake-ups no longer preempt anyone (README "Speed": top-2 ITL at c=1 and throughput at c=32, A/B).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

IDLE_THREAD_NAMES = ("gloo_tcp_loop",)


def threads_named(names: tuple[str, ...]) -> list[int]:
    """Thread ids of this process whose name (comm) is one of `names` ([] where /proc is missing)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    out = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() in names:
                    out.append(int(tid))
        except OSError:                    # the thread ended meanwhile
            continue
    return out


def idle_helper_threads(names: tuple[str, ...] = IDLE_THREAD_NAMES) -> int:
    """Give this process's threads with one of these names SCHED_IDLE; -> how many (0 where unsupported)."""
    if not hasattr(os, "SCHED_IDLE"):
        return 0
    done = 0
    for tid in threads_named(names):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            done += 1
        except OSError as exc:             # the thread ended meanwhile, or the policy is refused: harmless
            log.debug("thread %s keeps its scheduling policy: %s", tid, exc)
    return done


def scheduling_policies(names: tuple[str, ...] = IDLE_THREAD_NAMES) -> list[int]:
    """The scheduling policy of each of this process's threads with one of these names (for tests)."""
    out = []
    for tid in threads_named(names):
        try:
            out.append(os.sched_getscheduler(tid))
        except OSError:
            continue
    return out
