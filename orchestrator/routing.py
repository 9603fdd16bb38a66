"""Which experts produce each row's next token, and with what weights: pure functions, no I/O.

Mixtral's rule over the experts that can answer: top-k of the gate logits among the available experts, a
softmax over the selected ones. An expert that is down is never selected; the gate's weight moves to the
experts that can answer (degraded routing) and the route says so.

Shape legend: B = rows, E = experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Route:
    experts: tuple[int, ...]        # expert indices, by descending weight
    weights: tuple[float, ...]      # sum to 1
    entropy: float = 0.0            # of the full gate softmax over all experts (nats)
    degraded: bool = False          # an expert the gate wanted could not answer


def route_gated(logits: np.ndarray | torch.Tensor, ks: list[int], available: torch.Tensor) -> list[Route | None]:
    """logits [B, E] (the served gate's are numpy), ks (experts per row), available [E] bool -> a Route per row
    (None: no expert left). Same rule as gating.mix.gate_weights (top-k of the logits, softmax over them; ties:
    the lower expert index).

    A few rows go row by row in Python floats (a row is E numbers, 4 in the demo: the ~12 torch ops this took
    cost 0.3 ms per token at concurrency 1 inside the gateway); from VECTOR_ROWS rows on, one numpy pass over
    the round (32 rows: ≈ 50 against ≈ 150 µs on an idle core)."""
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
    """route_gated for x [B, E] float64 in one pass (at least one expert up): the same routes, to float
    rounding (the softmax and the entropy are the same formulas, evaluated as arrays)."""
    x = np.where(np.isneginf(x).all(axis=1, keepdims=True), 0.0, x)   # all -inf: uniform (equal logits' limit)
    shifted = x - x.max(axis=1, keepdims=True)
    ex = np.exp(shifted)
    z = ex.sum(axis=1)
    entropies = (np.log(z) - np.where(ex > 0, ex * shifted, 0.0).sum(axis=1) / z).tolist()   # 0·(-inf) is 0
    order = np.argsort(-x, axis=1, kind="stable")                    # by descending logit, ties: lower index
    everyone = bool(up.all())
    allowed = order if everyone else order[up[order]].reshape(x.shape[0], -1)   # each row's order, experts up
    kmax = min(max(ks), int(up.sum()))
    chosen = allowed[:, :kmax]
    picked = np.take_along_axis(shifted, chosen, axis=1)
    picked = np.where(np.isneginf(picked[:, :1]), 0.0, picked)     # every expert kept at -inf: equal weights
    w = np.exp(picked - picked[:, :1])
    if min(ks) >= kmax:                                  # every row takes kmax experts (the usual round)
        w /= w.sum(axis=1, keepdims=True)
        if everyone:
            return [Route(tuple(c), tuple(v), h, False) for c, v, h in zip(chosen.tolist(), w.tolist(), entropies)]
    wanted = order[:, :max(ks)].tolist()
    routes = []
    for b, (c, v, k) in enumerate(zip(chosen.tolist(), w.tolist(), ks)):
        experts, weights = tuple(c[:k]), v[:k]
        z_k = sum(weights)
        routes.append(Route(experts, tuple(x / z_k for x in weights), entropies[b], set(wanted[b][:k]) != set(experts)))
    return routes


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
