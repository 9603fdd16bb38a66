"""`ensemble demo-table`: expert x domain perplexity of the demo models on held-out pure-domain text.

Reads artifacts/demo/{experts/*,generalist,data/*/heldout.jsonl}; prints a markdown table or, with --json, a dict.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EXPERTS = ("code", "prose", "math", "json")  # expert name == the domain it is trained on
CHUNK = 512  # tokens per scored window, BOS included


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", type=Path, default=Path("artifacts/demo"), help="demo build directory")
    parser.add_argument("--json", action="store_true", help="print a JSON dict instead of a markdown table")
    parser.add_argument("--max-tokens", type=int, default=16384, help="scored tokens per domain (cap)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every expert has the lowest perplexity of all experts on its own domain")


def windows(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """`<s>` + up to CHUNK-1 text tokens per window, documents in file order, until max_tokens are covered."""
    out, total = [], 0
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids
        for i in range(0, len(ids), CHUNK - 1):
            piece = ids[i:i + CHUNK - 1][: max_tokens - total]
            if not piece:
                break
            out.append([tokenizer.bos_token_id] + piece)  # the first prediction after BOS is scored too
            total += len(piece)
        if total >= max_tokens:
            break
    return out


def mean_nll(model, seqs: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token negative log-likelihood (nats) over all non-BOS tokens of seqs, and the token count."""
    import torch

    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: little padding
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            group = [seqs[i] for i in order[start:start + batch_size]]
            width = max(len(s) for s in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, s in enumerate(group):
                ids[row, :len(s)] = torch.tensor(s)
                mask[row, :len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # B, T-1, V
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # B, T-1
            valid = mask[:, 1:].bool()
            total -= logp[valid].sum().item()
            count += int(valid.sum())
    return total / max(1, count), count


def model_dirs(demo: Path) -> dict[str, Path]:
    dirs = {name: demo / "experts" / name for name in EXPERTS}
    dirs["generalist"] = demo / "generalist"
    return {name: d for name, d in dirs.items() if (d / "config.json").exists()}


def perplexity_table(demo: Path, max_tokens: int, log=lambda s: print(s, file=sys.stderr)) -> dict:
    """{"perplexity": {model: {domain: ppl}}, "tokens": {domain: n}, "best_expert": {domain: model}, ...}."""
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    from experts.demo.corpora import read_jsonl

    torch.set_num_threads(2)
    dirs = model_dirs(demo)
    if not dirs:
        raise FileNotFoundError(f"no demo models under {demo}: run `ensemble build-demo --out {demo}` first")
    tokenizer = AutoTokenizer.from_pretrained(str(next(iter(dirs.values()))))
    data = {d: windows(tokenizer, [r["text"] for r in read_jsonl(demo / "data" / d / "heldout.jsonl")], max_tokens)
            for d in EXPERTS}
    ppl: dict[str, dict[str, float]] = {}
    tokens: dict[str, int] = {}
    for name, path in dirs.items():
        model = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        ppl[name] = {}
        for domain, seqs in data.items():
            nll, tokens[domain] = mean_nll(model, seqs)
            ppl[name][domain] = round(math.exp(nll), 2)
        log(f"{name}: " + ", ".join(f"{d} {p:.1f}" for d, p in ppl[name].items()))
    experts = [e for e in EXPERTS if e in ppl]
    best = {d: min(experts, key=lambda e: ppl[e][d]) for d in EXPERTS} if experts else {}
    return {"perplexity": ppl, "tokens": tokens, "best_expert": best,
            "specialised": bool(best) and all(best[d] == d for d in EXPERTS), "max_tokens_per_domain": max_tokens}


def markdown(table: dict) -> str:
    """Rows are models, columns are held-out domains; each column's lowest expert perplexity in bold."""
    ppl, best = table["perplexity"], table["best_expert"]
    lines = ["| model \\ held-out domain | " + " | ".join(EXPERTS) + " |", "|---" * (len(EXPERTS) + 1) + "|"]
    for name, row in ppl.items():
        cells = [f"**{row[d]:.1f}**" if best.get(d) == name else f"{row[d]:.1f}" for d in EXPERTS]
        label = f"{name} expert" if name in EXPERTS else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{d} {n}" for d, n in table["tokens"].items())
    lines.append(f"\nPerplexity on held-out documents (tokens scored per domain: {counts}); "
                 "bold = lowest among the four experts.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    table = perplexity_table(args.demo, args.max_tokens)
    print(json.dumps(table, indent=2) if args.json else markdown(table))
    if args.check and not table["specialised"]:
        print(f"not specialised: best expert per domain is {table['best_expert']}", file=sys.stderr)
        return 1
    return 0
