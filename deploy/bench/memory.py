"""Resident memory of a whole service: the sum of RSS over a process and all its descendants, sampled.

A service here is many processes (Ray's GCS and raylet, Serve's controller and proxy, one worker per replica,
one vLLM EngineCore per engine); the root is the process we started. Shared pages count once per process,
so the sum over-states physical use a little; it is what `ps` users add up, and it is the same rule for
every server compared.
"""

from __future__ import annotations

import threading
from typing import Self

import psutil


def tree_rss_bytes(pid: int) -> int:
    """Sum of RSS of `pid` and every descendant alive now (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRSS:
    """Samples tree_rss_bytes(pid) every `period_s` in a thread; `.peak` is the largest seen."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> int:
        now = tree_rss_bytes(self.pid)
        self.peak = max(self.peak, now)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()
