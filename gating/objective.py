"""Log-likelihood of the actual next tokens under a routed mixture: training, evaluation and echo scoring.

Everything goes through gating.mix.mix, the function the decode engine samples from, so the number a
gate is trained and judged on is exactly what serving produces.

Shape legend: N = positions, E = all experts, S = selected experts, K = top-k per expert.
"""

from __future__ import annotations

import torch

from gating.mix import MixSpace, expert_floor, gate_weights, logprob_of, mix


def select_experts(all_ids: torch.Tensor, all_lps: torch.Tensor, experts: torch.Tensor):
    """all_ids/all_lps [N, E, K], experts [N, S] -> ids/lps [N, S, K] of the selected experts."""
    index = experts[:, :, None].expand(-1, -1, all_ids.shape[-1])
    return all_ids.gather(1, index), all_lps.gather(1, index)


def mixture_logprob(
    all_ids: torch.Tensor, all_lps: torch.Tensor, targets: torch.Tensor,
    experts: torch.Tensor, weights: torch.Tensor, vocab_size: int, space: MixSpace,
) -> torch.Tensor:
    """log p_mix(target) per position. targets [N] long, experts [N, S] long, weights [N, S] -> [N]."""
    ids, lps = select_experts(all_ids, all_lps, experts)
    return logprob_of(mix(ids, lps, weights, vocab_size, space), targets)


def gated_logprob(
    all_ids: torch.Tensor, all_lps: torch.Tensor, targets: torch.Tensor,
    gate_logits: torch.Tensor, k: int, vocab_size: int, space: MixSpace,
) -> torch.Tensor:
    """The served objective: top-k of the gate logits [N, E], Mixtral weights, mixed -> [N]."""
    experts, weights = gate_weights(gate_logits, k)
    return mixture_logprob(all_ids, all_lps, targets, experts, weights, vocab_size, space)


def single_expert_logprob(all_ids: torch.Tensor, all_lps: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    """log p_e(target) under each expert's own top-k + floor representation -> [N, E]."""
    match = all_ids == targets[:, None, None]                        # [N, E, K]
    value = (match * all_lps).sum(-1)
    return torch.where(match.any(-1), value, expert_floor(all_lps, vocab_size))


def uniform_logprob(all_ids, all_lps, targets, vocab_size: int, space: MixSpace) -> torch.Tensor:
    n, e, _ = all_ids.shape
    experts = torch.arange(e).expand(n, e)
    return mixture_logprob(all_ids, all_lps, targets, experts, torch.full((n, e), 1.0 / e), vocab_size, space)
