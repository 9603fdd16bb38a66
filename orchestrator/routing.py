"""Which experts produce each row's next token, and with what weights: pure functions, no I/O.

Mixtral's rule over the experts that can answer: top-k of the gate logits among the available experts, a
softmax over the selected ones. An expert that is down is never selected; the gate's weight moves to the
experts that can answer (degraded routing) and the route says so.

Shape legend: B = rows, E = experts.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import torch

from gating.jit import kernel, on_warm_up


class Route(msgspec.Struct, frozen=True):           # a Struct: one per row and round (orchestrator/types.py)
    experts: tuple[int, ...]        # expert indices, by descending weight
    weights: tuple[float, ...]      # sum to 1
    entropy: float = 0.0            # of the full gate softmax over all experts (nats)
    degraded: bool = False          # an expert the gate wanted could not answer


def route_gated(logits: np.ndarray | torch.Tensor, ks: list[int], available: torch.Tensor) -> list[Route | None]:
    """logits [B, E] (the served gate's are numpy), ks (experts per row), available [E] bool -> a Route per row
    (None: no expert left). Same rule as gating.mix.gate_weights (top-k of the logits, softmax over them; ties:
    the lower expert index).

    A few rows go row by row in Python floats (a row is E numbers, 4 in the demo: the ~12 torch ops this took
    cost 0.3 ms per token at concurrency 1 inside the gateway); from VECTOR_ROWS rows on, one compiled pass over
    the round (32 rows: ≈ 34 µs on an idle core, half of it building the Routes; ≈ 63 as a numpy program, ≈ 150
    row by row)."""
    up = available.tolist()
    n_available = sum(up)
    if n_available == 0:
        return [None] * logits.shape[0]
    if len(ks) >= VECTOR_ROWS:
        return _route_rows(np.asarray(logits, dtype=np.float64), ks, np.asarray(up, dtype=bool))
    routes: list[Route | None] = []
    for row, k in zip(logits.tolist(), ks):
        order = sorted(range(len(row)), key=row.__getitem__, reverse=True)      # by descending logit
        wanted = order[:k]                                                       # ignoring availability
        chosen = [e for e in order if up[e]][:k]
        routes.append(Route(tuple(chosen), softmax([row[e] for e in chosen]), entropy(row, row[order[0]]),
                            degraded=set(wanted) != set(chosen)))
    return routes


VECTOR_ROWS = 8


def _route_rows(x: np.ndarray, ks: list[int], up: np.ndarray) -> list[Route]:
    """route_gated for x [B, E] in one compiled pass (at least one expert up): the same routes, to float rounding
    (the softmax and the entropy are the same formulas). 32 rows: ≈ 3 µs in the kernel on an idle core, against ≈ 40
    as a numpy program; building the Route objects is most of what is left."""
    b = x.shape[0]
    kmax = min(max(ks), int(up.sum()))
    chosen = np.empty((b, kmax), dtype=np.int64)
    weights = np.empty((b, kmax))
    entropy = np.empty(b)
    degraded = np.empty(b, dtype=bool)
    _route_kernel(np.ascontiguousarray(x, dtype=np.float64), np.asarray(ks, dtype=np.int64), kmax,
                  np.ascontiguousarray(up, dtype=bool), chosen, weights, entropy, degraded)
    rows = zip(chosen.tolist(), weights.tolist(), entropy.tolist(), degraded.tolist())
    if min(ks) >= kmax:                                  # every row takes kmax experts (the usual round)
        return [Route(tuple(c), tuple(w), h, d) for c, w, h, d in rows]
    return [Route(tuple(c[:k]), tuple(w[:k]), h, d) for (c, w, h, d), k in zip(rows, ks)]


@kernel
def _route_kernel(x, ks, kmax, up, chosen, weights, entropy, degraded):  # pragma: no cover
    """Per row: the entropy of the gate softmax, the experts by descending logit (ties: the lower index), the first
    min(k, kmax) that are up, their softmax weights, and whether the gate's own top k were not all up."""
    b, e = x.shape
    row = np.empty(e)
    taken = np.empty(e, np.bool_)
    order = np.empty(e, np.int64)
    for r in range(b):
        top = -np.inf
        for j in range(e):
            row[j] = x[r, j]
            top = max(top, row[j])
        if top == -np.inf:                      # all -inf: uniform (equal logits' limit)
            for j in range(e):
                row[j] = 0.0
            top = 0.0
        z, s = 0.0, 0.0
        for j in range(e):
            q = math.exp(row[j] - top)
            z += q
            if q > 0:
                s += q * (row[j] - top)
        entropy[r] = math.log(z) - s / z
        # experts by descending logit (ties: the lower index)
        for j in range(e):
            taken[j] = False
        for n in range(e):
            best = -1
            for j in range(e):
                if not taken[j] and (best < 0 or row[j] > row[best] or (np.isnan(row[best]) and not np.isnan(row[j]))):
                    best = j
            taken[best] = True
            order[n] = best
        wanted, k, got = min(ks[r], e), min(ks[r], kmax), 0
        for n in range(e):
            if got == k:
                break
            if up[order[n]]:
                chosen[r, got] = order[n]
                got += 1
        first = row[chosen[r, 0]] - top
        total = 0.0
        for n in range(k):
            p = row[chosen[r, n]] - top
            weights[r, n] = 1.0 if first == -np.inf else math.exp(p - first)   # every one kept at -inf: equal
            total += weights[r, n]
        for n in range(k):
            weights[r, n] /= total
        degraded[r] = k < wanted                # the gate's own top k are not all the chosen ones
        for n in range(wanted):
            if not up[order[n]]:
                degraded[r] = True


@on_warm_up
def _warm_up() -> None:
    _route_rows(np.zeros((1, 2)), [1], np.ones(2, dtype=bool))


def softmax(xs: list[float]) -> tuple[float, ...]:
    top = max(xs)
    if top == -math.inf:                          # all -inf: equal weights (the limit for equal logits)
        return (1.0 / len(xs),) * len(xs)
    ex = [math.exp(x - top) for x in xs]
    z = sum(ex)
    return tuple(x / z for x in ex)


def entropy(logits: list[float], top: float) -> float:
    """Of softmax(logits), in nats (top: the largest logit): log z - Σ pᵢ·(xᵢ - top), z = Σ exp(xᵢ - top).
    A -inf logit has probability 0 and adds nothing; all -inf is taken as equal logits (log E)."""
    if top == -math.inf:
        return math.log(len(logits))
    shifted = [x - top for x in logits]
    ex = [math.exp(x) for x in shifted]
    z = sum(ex)
    return math.log(z) - sum([q * x for q, x in zip(ex, shifted) if q > 0]) / z


def route_uniform(available: torch.Tensor) -> Route | None:
    """No gate: every available expert, equal weights."""
    experts = tuple(int(i) for i in torch.nonzero(available).flatten())
    if not experts:
        return None
    return Route(experts, (1.0 / len(experts),) * len(experts), math.log(len(experts)),
                 degraded=len(experts) < available.numel())


def route_fixed(expert: int, available: torch.Tensor) -> Route | None:
    """model=<expert>: that expert alone, or nothing when it is down."""
    return Route((expert,), (1.0,)) if bool(available[expert]) else None


def renormalise(route: Route, answered: set[int]) -> Route | None:
    """Keep only the experts that answered this step; their weights rescaled to sum to 1."""
    kept = [(e, w) for e, w in zip(route.experts, route.weights) if e in answered]
    if not kept:
        return None
    if len(kept) == len(route.experts):
        return route
    total = sum(w for _, w in kept)
    return Route(tuple(e for e, _ in kept), tuple(w / total for _, w in kept), route.entropy, degraded=True)
