"""What the served top-k + floor representation costs against exact full-vocabulary mixing (offline study).

Scores a JSONL split with every expert's full next-token distribution (transformers on CPU, fp32: no engine),
routes with a gate checkpoint exactly as served (top-k of its logits, Mixtral weights), and reports the
perplexity of: the exact mix, the served mix (gating.mix over each expert's top-k with its floor) for several
k, and the same with exact values for the candidate union. It also measures the mass the mix puts
outside the candidate union (the tail, which the sampler draws as one slot: orchestrator/sample.py).

    python -m gating.floor_study --demo artifacts/demo --data artifacts/demo/data/eval/independent.jsonl
    python -m gating.floor_study --dense --ks 20 --interps 0.75     # + the dense references (README "Quality")

Shape legend: T = positions, E = experts, S = selected experts, V = vocabulary, K = top-k.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from gating.mix import expert_floor, gate_weights, logprob_of, mix
from gating.model import Gate


def full_logprobs(models: list, seq: list[int]) -> torch.Tensor:
    """-> [T-1, E, V] log-softmax of each model at every position of one sequence (row j predicts seq[j+1])."""
    x = torch.tensor([seq])
    return torch.stack([torch.log_softmax(m(x).logits[0, :-1].float(), -1) for m in models], 1)


def exact_mix(lp: torch.Tensor, weights: torch.Tensor, space: str) -> torch.Tensor:
    """lp [T, S, V], weights [T, S] -> [T, V] normalised log p_mix over the whole vocabulary."""
    if space == "logits":
        return torch.log_softmax((weights[:, :, None] * lp).sum(1), -1)
    return torch.logsumexp(lp + weights.clamp_min(1e-30).log()[:, :, None], 1)


def union_exact_mix(lp: torch.Tensor, weights: torch.Tensor, k: int, space: str, targets: torch.Tensor):
    """Each selected expert reports its exact logprob for every candidate of the union of top-k lists, and
    spreads the rest of its mass evenly over the V - |union| other tokens -> log p_mix(target) [T]."""
    t, s, v = lp.shape
    top = lp.topk(k, -1).indices.reshape(t, s * k)                             # [T, S*K] union (dups allowed)
    in_union = torch.zeros(t, v, dtype=torch.bool).scatter_(1, top, True)       # [T, V]
    n_out = (v - in_union.sum(-1)).clamp_min(1)                                 # [T]
    p_union = torch.where(in_union[:, None], lp.exp(), 0.0).sum(-1)              # [T, S]
    floor = ((1 - p_union).clamp_min(1e-9).log() - n_out.log()[:, None])        # [T, S]
    rep = torch.where(in_union[:, None], lp, floor[:, :, None])                 # [T, S, V]
    mixed = exact_mix(rep, weights, space)
    return mixed.gather(1, targets[:, None])[:, 0]


def prior_tail_mix(lp: torch.Tensor, weights: torch.Tensor, k: int, space: str, targets: torch.Tensor,
                   log_prior: torch.Tensor) -> torch.Tensor:
    """Top-k as served, but each expert's left-over mass spread over its unlisted tokens in proportion to a
    unigram prior (instead of evenly) -> log p_mix(target) [T]. log_prior [V] normalised."""
    vals, ids = lp.topk(k, -1)                                                  # [T, S, K]
    listed = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, ids, True)     # [T, S, V]
    leftover = (1 - vals.exp().sum(-1)).clamp_min(1e-6)                        # [T, S]
    prior_out = (1 - torch.where(listed, log_prior.exp(), 0.0).sum(-1)).clamp_min(1e-9)   # [T, S]
    tail = leftover.log()[:, :, None] + log_prior - prior_out.log()[:, :, None]
    rep = torch.where(listed, lp, tail)
    return exact_mix(rep, weights, space).gather(1, targets[:, None])[:, 0]


def unigram_log_prior(demo: Path, tok, vocab_size: int) -> torch.Tensor:
    """log of add-one-smoothed token frequencies over the demo's expert train splits -> [V]."""
    counts = torch.ones(vocab_size)
    for path in sorted((demo / "data").glob("*/train.jsonl")):
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        for enc in tok.backend_tokenizer.encode_batch(texts):
            counts += torch.bincount(torch.tensor(enc.ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return (counts / counts.sum()).log()


def fixed_share(lp_target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dense Bayesian mixture with switching (Herbster & Warmuth's fixed share): weights start uniform, follow
    the posterior of each expert given the realised tokens, and leak `alpha` back to uniform at every step.
    It needs every expert's probability of every token (all experts stepped): an upper reference for what any
    gate over these experts could reach without knowing the future. lp_target [T, E] -> log p_mix [T]."""
    t, e = lp_target.shape
    log_w = torch.full((e,), -math.log(e))
    out = torch.empty(t)
    for i in range(t):
        joint = log_w + lp_target[i]
        out[i] = torch.logsumexp(joint, 0)
        post = (joint - out[i]).exp()
        log_w = ((1 - alpha) * post + alpha / e).log()
    return out


def topk_floor_mix(lp: torch.Tensor, weights: torch.Tensor, k: int, space: str, targets: torch.Tensor,
                   interp: float = 0.0):
    """The served representation: gating.mix over each selected expert's top-k -> (log p(target) [T],
    mixed mass outside the candidate union [T])."""
    vals, ids = lp.topk(k, -1)                                                  # [T, S, K]
    mixed = mix(ids, vals, weights, lp.shape[-1], space, interp=interp)
    outside = 1 - torch.where(mixed.first, mixed.cand_logprobs.exp(), 0.0).sum(-1)
    return logprob_of(mixed, targets), outside


def route_logits(gate: Gate, seq: list[int], lp: torch.Tensor, targets: torch.Tensor, route_k: int,
                 top_logprobs: int) -> torch.Tensor:
    """Gate logits [1, T, E] as served: an observed-features gate reads the selected experts' top-k (as the
    engines report it) of each realised token, rolled out with the top-`route_k` rule."""
    tokens = torch.tensor([seq[:-1]])
    if not gate.uses_observations:
        return gate(tokens)[0]
    from gating.rollout import corpus_signals, padded_signals, rollout, top_k_rule

    vals, ids = lp.topk(top_logprobs, -1)                                       # [T, E, K]
    sig = corpus_signals(ids, vals, targets, lp.shape[-1])
    return rollout(gate, tokens, padded_signals(sig, [len(targets)]), top_k_rule(route_k))


def study(args) -> dict:
    from transformers import AutoTokenizer, MixtralForCausalLM

    from gating.checkpoint import load_checkpoint, resolve_gate_path

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(resolve_gate_path(args.gate or args.demo / "gate"))
    names = list(ckpt.expert_names)
    models = [MixtralForCausalLM.from_pretrained(args.demo / "experts" / n, dtype=torch.float32).eval() for n in names]
    generalist = MixtralForCausalLM.from_pretrained(args.demo / "generalist", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.demo / "tokenizer")
    docs = [json.loads(line)["text"] for line in args.data.read_text().splitlines() if line.strip()]
    seqs = [tok(d)["input_ids"][: args.doc_tokens] for d in docs[: args.max_docs or None]]
    gate: Gate = ckpt.build()
    log_prior = unigram_log_prior(args.demo, tok, models[0].config.vocab_size)
    ks = [int(k) for k in args.ks.split(",")]
    interps = [float(a) for a in args.interps.split(",")] if args.interps else []
    sums: dict[str, float] = {}
    outside: dict[str, list[float]] = {}
    n_tok = 0
    t0 = time.time()

    def add(key: str, lp: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(lp.sum())

    with torch.inference_mode():
        for seq in seqs:
            if len(seq) < 2:
                continue
            lp = full_logprobs(models, seq)                                     # [T, E, V]
            targets = torch.tensor(seq[1:])
            n_tok += len(targets)
            g = torch.log_softmax(generalist(torch.tensor([seq])).logits[0, :-1].float(), -1)
            add("generalist/exact", g.gather(1, targets[:, None])[:, 0])
            for k in ks:
                v, i = g.topk(k, -1)
                floor = expert_floor(v, g.shape[-1])
                hit = (i == targets[:, None])
                add(f"generalist/top{k}", torch.where(hit.any(-1), (hit * v).sum(-1), floor))
                add(f"generalist/top{k}+prior-tail", prior_tail_mix(g[:, None], torch.ones(len(g), 1), k, "probs",
                                                                    targets, log_prior))
            for route_k in (1, 2):
                logits = route_logits(gate, seq, lp, targets, route_k, args.top_logprobs)[0]   # [T, E]
                experts, weights = gate_weights(logits, route_k)                # [T, S]
                served = logits                 # after the loop: the served top-2 rollout (it depends on k)
                sel = lp.gather(1, experts[:, :, None].expand(-1, -1, lp.shape[-1]))   # [T, S, V]
                for space in ("probs", "logits"):
                    tag = f"gate_top{route_k}/{space}"
                    add(f"{tag}/exact", exact_mix(sel, weights, space).gather(1, targets[:, None])[:, 0])
                    for k in ks:
                        got, out = topk_floor_mix(sel, weights, k, space, targets)
                        add(f"{tag}/top{k}+floor", got)
                        outside.setdefault(f"{tag}/top{k}", []).extend(out.tolist())
                        if route_k == 2:
                            for a in interps:
                                add(f"{tag}/top{k}+cross{a}", topk_floor_mix(sel, weights, k, space, targets, a)[0])
                            add(f"{tag}/top{k}+union-exact", union_exact_mix(sel, weights, k, space, targets))
                            add(f"{tag}/top{k}+prior-tail", prior_tail_mix(sel, weights, k, space, targets, log_prior))
            exact_single = lp.gather(2, targets[:, None, None].expand(-1, lp.shape[1], 1))[:, :, 0]   # [T, E]
            add("oracle/exact", exact_single.max(1).values)
            if args.dense:      # what more experts per token, softer weights or a dense mixture could reach
                e = lp.shape[1]
                for k in range(2, e + 1):
                    top, ex = served.topk(k, -1)
                    sel = lp.gather(1, ex[:, :, None].expand(-1, -1, lp.shape[-1]))
                    for temp in (1.0, 2.0):
                        w = torch.softmax(top / temp, -1)
                        add(f"dense/gate_top{k}_T{temp:g}/probs/exact",
                            exact_mix(sel, w, "probs").gather(1, targets[:, None])[:, 0])
                add("dense/uniform/probs/exact", torch.logsumexp(exact_single, 1) - math.log(e))
                add("dense/fixed_share0.1/probs/exact", fixed_share(exact_single, 0.1))
    ppl = {k: round(math.exp(-v / n_tok), 2) for k, v in sorted(sums.items())}
    mass = {k: {"mean": round(sum(v) / len(v), 4), "p90": round(sorted(v)[int(0.9 * len(v))], 4)}
            for k, v in sorted(outside.items())}
    return {"data": str(args.data), "documents": len(seqs), "tokens": n_tok, "gate": ckpt.version,
            "perplexity": ppl, "mass_outside_candidates": mass, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--data", type=Path, default=Path("artifacts/demo/data/eval/independent.jsonl"))
    p.add_argument("--gate", type=Path)
    p.add_argument("--ks", default="20,32,64,128")
    p.add_argument("--interps", default="0.25,0.5,0.75,1.0", help="cross-listed guesses to try (gating.mix)")
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--top-logprobs", type=int, default=20, help="top-k the engines report (an observed gate reads it)")
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--dense", action="store_true",
                   help="also exact mixes of 2..E experts (gate weights at temperature 1 and 2), the uniform mix "
                        "of all experts and a dense fixed-share mixture: can any mixing of these experts win?")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = study(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
