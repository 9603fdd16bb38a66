"""Data-parallel training of one demo model over a few local processes (the seed phase: one model, two cores).

Each of `world` processes holds the whole model and takes rows rank, rank + world, ... of every batch; after
backward the gradients (and the batch loss, for the progress bar) are averaged over the processes in one
gloo all-reduce of a flat buffer, so every process applies the same update and the weights stay identical.
With equal-length rows and a mean loss this is the full batch's gradient. Mixtral's router load-balancing
term is not a mean over rows (a product of two batch means), so `group_balancing_loss` computes it over the
whole group's batch: the same value and, averaged over the processes, the same gradient as one process
training on the full batch. Rendezvous goes through a file (no port to pick, nothing to race for).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Group:
    """Where one training process sits in its data-parallel group."""
    rank: int = 0
    world: int = 1
    rendezvous: Path | None = None    # an absolute file path shared by the group, absent before it starts

    @property
    def leader(self) -> bool:
        return self.rank == 0


SOLO = Group()


def local_rows(batch, group: Group):
    """This process's share of a batch: rows rank, rank + world, ... (all rows when alone)."""
    assert len(batch) % group.world == 0, f"a batch of {len(batch)} rows does not split over {group.world} processes"
    return batch[group.rank::group.world]


def join(group: Group, timeout_s: float = 120.0) -> None:
    """Meet the other processes of the group (a process that never comes is an error after timeout_s, not a hang)."""
    from datetime import timedelta

    import torch.distributed as dist

    if group.world > 1:
        assert group.rendezvous is not None and group.rendezvous.is_absolute(), "the rendezvous needs an absolute path"
        dist.init_process_group("gloo", init_method=f"file://{group.rendezvous}", rank=group.rank,
                                world_size=group.world, timeout=timedelta(seconds=timeout_s))


def leave(group: Group) -> None:
    import torch.distributed as dist

    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def average(params, loss: float, group: Group) -> float:
    """Replace each parameter's gradient by its mean over the group; return the group's mean loss."""
    import torch
    import torch.distributed as dist

    if group.world == 1:
        return loss
    params = list(params)
    for p in params:                    # same buffer layout on every process, even if a parameter got no gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss], dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= group.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1])


def balancing_terms(router_logits, num_experts: int, top_k: int):
    """Mixtral's load-balancing statistics over this process's rows, as transformers'
    load_balancing_loss_func computes them: (share of top-k assignments per expert [E] (no gradient),
    mean router probability per expert [E]), both over all layers and tokens."""
    import torch

    counts = torch.zeros(num_experts)
    probs = torch.zeros(num_experts)
    rows = 0
    for layer in router_logits:                                    # [tokens, E] per layer
        weights = torch.softmax(layer.float(), dim=-1)
        chosen = torch.topk(weights, top_k, dim=-1).indices
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        probs = probs + weights.sum(0)
        rows += weights.shape[0]
    return counts / rows, probs / rows


def group_balancing_loss(router_logits, num_experts: int, top_k: int, group: Group):
    """The load-balancing loss of the group's whole batch; its gradient here is this process's share, so that
    after `average` the update is the one-process update. (Alone: transformers' own value.)"""
    import torch
    import torch.distributed as dist

    share, prob = balancing_terms(router_logits, num_experts, top_k)
    if group.world == 1:
        return num_experts * (share * prob).sum()
    both = torch.cat([share, prob.detach()])
    dist.all_reduce(both)
    both /= group.world
    share_all, prob_all = both[:num_experts], both[num_experts:]
    # value: the group's loss; gradient: E * sum(share_all * d prob_local), which averages to the full batch's
    return num_experts * (share_all * (prob - prob.detach() + prob_all)).sum()
