"""Shared plumbing of the offline jobs (train-gate, eval, retrain): documents in, scored tensors out.

Documents are JSON Lines with a "text" field; they are tokenized with the experts' shared tokenizer,
truncated, scored by every expert through their Serve deployments, and cached on disk by content hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from experts.config import ExpertConfig
from experts.protocol import Expert
from gating.scores import ScoredCorpus, cache_key, load_scored, save_scored, score_sequences, scoring_tag

DEMO_EXPERTS = ("code", "prose", "math", "json")
DEFAULT_TOP_K = 20          # logprobs per expert per position; the serving default too
DEFAULT_DOC_TOKENS = 512    # documents are truncated to this many tokens (BOS included)


def read_jsonl(paths: list[Path]) -> list[dict]:
    docs = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise ValueError(f'{path}:{n}: each line must be an object with a string "text" field')  # noqa: TRY004
                if doc["text"].strip():
                    docs.append(doc)
    return docs


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Encode with the tokenizer's own special tokens (the demo one adds BOS), keep docs of >= 2 tokens."""
    seqs = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    return [s for s in seqs if len(s) >= 2]


def vocab_size_of(model_path: str) -> int:
    """The logit vector's size, from the checkpoint's config.json."""
    with open(Path(model_path) / "config.json") as f:
        return int(json.load(f)["vocab_size"])


def demo_experts(demo: Path) -> tuple[str, ...]:
    """The expert names of a demo build, in routing order: its manifest's list (8-expert builds), else the four."""
    manifest = Path(demo) / "manifest.json"
    if manifest.exists():
        names = json.loads(manifest.read_text()).get("experts")
        if names:
            return tuple(names)
    return DEMO_EXPERTS


def demo_expert_configs(demo: Path, names=None, max_model_len: int = 1024, top_k: int = DEFAULT_TOP_K) -> list[ExpertConfig]:
    names = demo_experts(demo) if names is None else names
    return [ExpertConfig(name=n, model_path=str(demo / "experts" / n), max_model_len=max_model_len,
                         max_top_k=max(20, top_k)) for n in names]


def generalist_config(demo: Path, max_model_len: int = 1024, top_k: int = DEFAULT_TOP_K) -> ExpertConfig:
    return ExpertConfig(name="generalist", model_path=str(demo / "generalist"), max_model_len=max_model_len,
                        max_top_k=max(20, top_k))


async def scored(
    experts: dict[str, Expert], sequences: list[list[int]], top_k: int, cache_dir: Path | None,
    tag: str, desc: str,
) -> ScoredCorpus:
    """Score with every expert, reusing an identical earlier scoring from `cache_dir`. `tag`: the experts'
    gating.scores.scoring_tag (part of the cache key)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(list(experts), sequences, top_k, tag)}.npz"
        if path.exists():
            return load_scored(path)
    corpus = await score_sequences(experts, sequences, top_k, desc=desc)
    if path is not None:
        save_scored(corpus, path)
    return corpus


def merge_experts(parts: list[ScoredCorpus]) -> ScoredCorpus:
    """Scores of the same sequences by disjoint groups of experts -> one corpus, experts in the given order."""
    import torch

    first = parts[0]
    k = min(p.ids.shape[-1] for p in parts)
    return ScoredCorpus(
        [n for p in parts for n in p.expert_names], torch.cat([p.ids[..., :k] for p in parts], 1),
        torch.cat([p.lps[..., :k] for p in parts], 1), first.targets, first.context, first.doc, first.doc_offsets,
        first.sequences,
    )


async def scored_in_groups(
    configs: list[ExpertConfig], sequences: list[list[int]], top_k: int, cache_dir: Path | None, fingerprint: str,
    desc: str, engines_at_once: int = 4,
) -> ScoredCorpus:
    """`scored` for many experts with at most `engines_at_once` engines running (memory: each vLLM engine
    holds ~1.5 GB here). Each group is cached on its own, and the merged corpus under the key of all experts."""
    from deploy.local_experts import running_experts

    names = [c.name for c in configs]
    path = Path(cache_dir) / f"{cache_key(names, sequences, top_k, scoring_tag(configs, fingerprint))}.npz" \
        if cache_dir else None
    if path is not None and path.exists():
        return load_scored(path)
    parts = []
    for i in range(0, len(configs), engines_at_once):
        group = configs[i:i + engines_at_once]
        async with running_experts(group) as clients:
            parts.append(await scored({c.name: clients[c.name] for c in group}, sequences, top_k, cache_dir,
                                      scoring_tag(group, fingerprint), f"{desc} ({'+'.join(c.name for c in group)})"))
    corpus = merge_experts(parts)
    if path is not None:
        save_scored(corpus, path)
    return corpus
