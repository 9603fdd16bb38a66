"""Which experts produce each row's next token, and with what weights: pure functions, no I/O.

Mixtral's rule over the experts that can answer: top-k of the gate logits among the available experts, a
softmax over the selected ones. An expert that is down is never selected; the gate's weight moves to the
experts that can answer (degraded routing) and the route says so.

Shape legend: B = rows, E = experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Route:
    experts: tuple[int, ...]        # expert indices, by descending weight
    weights: tuple[float, ...]      # sum to 1
    entropy: float = 0.0            # of the full gate softmax over all experts (nats)
    degraded: bool = False          # an expert the gate wanted could not answer


def route_gated(logits: torch.Tensor, ks: list[int], available: torch.Tensor) -> list[Route | None]:
    """logits [B, E], ks (experts per row), available [E] bool -> a Route per row (None: no expert left)."""
    b, e = logits.shape
    n_available = int(available.sum())
    if n_available == 0:
        return [None] * b
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)                 # [B]
    masked = logits.masked_fill(~available, float("-inf"))                   # [B, E]
    routes: list[Route | None] = [None] * b
    for k in sorted(set(ks)):
        rows = [i for i, ki in enumerate(ks) if ki == k]
        wanted = logits[rows].topk(min(k, e), dim=-1).indices.tolist()        # [R, k] ignoring availability
        top, chosen = masked[rows].topk(min(k, n_available), dim=-1)         # [R, k']
        weights, chosen, h = torch.softmax(top, dim=-1).tolist(), chosen.tolist(), entropy[rows].tolist()
        for r, i in enumerate(rows):
            degraded = set(wanted[r]) != set(chosen[r])
            routes[i] = Route(tuple(chosen[r]), tuple(weights[r]), h[r], degraded)
    return routes


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
