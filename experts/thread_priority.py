"""Thread priorities on shared cores: the threads that relay tokens first, the engine's compute after them,
idle helpers last.

vLLM's CPU worker sets up torch.distributed with gloo even for one process, and every gloo process group
starts a `gloo_tcp_loop` thread that wakes about 100 times a second (measured: 15 such threads per expert
replica, ≈ 6,000 wake-ups a second for four experts). Each wake-up preempts whatever runs on that core: the
engine thread or the gateway's event loop. With a world size of one nothing is ever sent over those loops, so
they get Linux's SCHED_IDLE policy: they still run, but only on a core that has nothing else to do, and their
wake-ups no longer preempt anyone (README "Speed": top-2 ITL at c=1 and throughput at c=32, A/B).

The in-process engine thread itself, and the compute threads it starts, run ENGINE_NICE_INCREMENT niceness
levels below their process (Ray's workers run at 15, so 19). It is the one thread that computes for long
stretches; the threads that relay its results (the replica's event loop, the gateway's) run for short bursts,
and on shared cores each burst is on the critical path of a token. With the engine below them, a relay thread
that wakes takes a core at once instead of waiting for an engine's time slice (README "Speed": six A/B pairs).

Niceness only weighs a relay thread's share of the cores; it still waits for the engine thread on its core to
end its slice. So each relay thread (the event loop of the gateway and of every expert replica: short bursts of
reading a reply, mixing, sampling and writing the next call, on the critical path of every token) also asks
Linux for the real-time round-robin policy at the lowest real-time priority (`raise_relay_thread`): it then
takes a core as it wakes, ahead of every normal thread. What it costs the others is what it runs, a fraction of
a core at concurrency 32 (README "Speed": the RPC part of a top-2 round at c=32 fell from 74-82 to 46-47 µs per
token). It needs CAP_SYS_NICE (root, or a container granted it); without it the thread stays a normal one, and
says so in a warning. Set ENSEMBLE_RELAY_PRIORITY=normal in the replicas' environment to keep it normal.
The policy carries SCHED_RESET_ON_FORK: a thread the relay thread starts later (an executor's worker) starts
as a normal thread at niceness 0, not as a real-time one. Linux caps what all real-time threads together
may use at 95 % of each core (kernel.sched_rt_runtime_us), so even a relay thread stuck in a loop cannot
freeze the machine.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

IDLE_THREAD_NAMES = ("gloo_tcp_loop",)
ENGINE_NICE_INCREMENT = 4
MAX_NICE = 19
RELAY_PRIORITY_ENV = "ENSEMBLE_RELAY_PRIORITY"     # "realtime" (the default) or "normal"
RELAY_RT_PRIORITY = 1                              # the lowest real-time priority: above every normal thread


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


def lower_this_thread(increment: int = ENGINE_NICE_INCREMENT) -> int | None:
    """Run the calling thread `increment` niceness levels below where it is now (at most MAX_NICE; Linux keeps
    niceness per thread). -> its niceness afterwards, or None where the platform has no per-thread niceness."""
    if not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as exc:                 # refused (a sandbox): harmless, the engine runs as before
        log.debug("the engine thread keeps its niceness: %s", exc)
        return None


def raise_relay_thread() -> str:
    """Give the calling thread, an event loop that relays tokens, the real-time round-robin policy (see the
    module docstring) unless ENSEMBLE_RELAY_PRIORITY=normal. -> what it runs with now: "realtime", or "normal"
    followed by why (asked for, refused by the OS, or no such policy on this platform). Never raises."""
    wanted = os.environ.get(RELAY_PRIORITY_ENV, "realtime").strip().lower()
    if wanted == "normal":
        return f"normal ({RELAY_PRIORITY_ENV}=normal)"
    if wanted != "realtime":
        log.warning("%s=%r is neither 'realtime' nor 'normal': using 'realtime'", RELAY_PRIORITY_ENV, wanted)
    if not hasattr(os, "SCHED_RR") or not hasattr(os, "SCHED_RESET_ON_FORK"):
        return "normal (no real-time policy on this platform)"
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                              os.sched_param(RELAY_RT_PRIORITY))
    except OSError as exc:                 # EPERM without CAP_SYS_NICE: the thread stays as it was
        why = f"normal (real-time refused: {exc.strerror or exc}; it needs CAP_SYS_NICE)"
        log.warning("this replica's event loop relays tokens as a %s thread; on cores shared with engines it "
                    "waits for them at every wake-up. Grant the capability, or set %s=normal to say it is meant",
                    why, RELAY_PRIORITY_ENV)
        return why
    return "realtime"


def relay_policy_of(tid: int) -> str:
    """"realtime" when thread `tid` runs SCHED_RR or SCHED_FIFO, else "normal" (also where the platform cannot
    say, or the thread is gone; for /metrics and tests)."""
    try:
        policy = os.sched_getscheduler(tid) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    except (AttributeError, OSError):
        return "normal"
    return "realtime" if policy in (getattr(os, "SCHED_RR", -1), getattr(os, "SCHED_FIFO", -1)) else "normal"
