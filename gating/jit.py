"""The compiled kernels of a decode round's math, and their warm-up.

Why: a top-2 round at concurrency 32 mixes, samples and steps the gate for 32 rows of a few dozen numbers each.
As numpy array programs (gating/mix_pair.py, orchestrator/sample.py, gating/gate_step.py, orchestrator/routing.py)
each of those is 20-40 ops whose dispatch costs more than their arithmetic (a microsecond or more each at these
sizes); compiled with numba, one kernel per phase loops over plain floats (a round's mix 145 -> 22 µs, its draw
41 -> 9 µs on an idle core). The arithmetic is the numpy form's, in the same float64 (float32 for the gate), so
results agree to float rounding; the unit tests check every kernel against the Python and torch forms.

`kernel` is numba's njit with what every kernel here needs: numpy's float semantics for a division by zero (inf
or nan, not an exception), and an on-disk cache (numba keeps it next to the source, or in the user's cache
directory when that is read-only), so a process compiles a kernel once per source version. It compiles at the
kernel's first call, and numba is imported only then: only a process that runs decode rounds (the gateway)
loads it. Each module that defines kernels registers a warm-up (`on_warm_up`), a call on tiny inputs; the gateway
runs `warm_up()` before it serves, so no request waits for a compiler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

_WARM_UPS: list[Callable[[], None]] = []


class kernel:
    """A function compiled with numba's njit at its first call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.py_func = fn
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _njit()(self.py_func)
        return compiled(*args)


def on_warm_up(fn: Callable[[], None]) -> Callable[[], None]:
    _WARM_UPS.append(fn)
    return fn


def warm_up() -> float:
    """Compile (or load) every registered kernel -> seconds it took."""
    t0 = time.perf_counter()
    for fn in _WARM_UPS:
        fn()
    return time.perf_counter() - t0


def _njit():
    import numba
    from llvmlite.binding import ffi

    # vLLM 0.32's CPU worker, as it starts, looks at vars() of every attribute of every loaded module
    # (vllm/triton_utils/dispatcher.py _rebind_kernels). llvmlite's `lib` answers any attribute name with a C
    # function wrapper, "__dict__" included, and that scan then fails (AttributeError: '_lib_fn_wrapper' object
    # has no attribute 'get'), so a process that compiled a kernel could not start an in-process vLLM engine
    # afterwards (the test session does both). An empty dict is a truthful answer for that name.
    ffi.lib._fntab.setdefault("__dict__", {})
    return numba.njit(cache=True, error_model="numpy")
