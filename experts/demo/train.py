"""Train one demo MixtralForCausalLM on packed token rows and save it in Hugging Face format.

Deterministic for a given seed and rows (seeded init and data order); reports tokens/s and loss on a tqdm bar.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experts.demo.data_parallel import SOLO, Group, average, group_balancing_loss, join, leave, local_rows


@dataclass(frozen=True)
class TrainArgs:
    steps: int
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    decay: bool = True  # False: hold the peak lr after warmup (a seed phase that branches will decay)
    init_from: Path | None = None  # start from these weights (a branch of the seed model) instead of scratch

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


def encode_docs(tokenizer, texts: list[str]) -> list[list[int]]:
    """`<s> text </s>` ids per document: BOS from the tokenizer's post-processor, EOS appended here."""
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: batch-encodes in parallel, no length warnings
    eos = tokenizer.eos_token_id
    return [enc.ids + [eos] for enc in backend.encode_batch(texts, add_special_tokens=True)]


def pack_rows(docs: list[list[int]], seq_len: int, seed: int) -> np.ndarray:
    """Shuffle documents (seeded), concatenate, cut into rows of seq_len tokens: [rows, seq_len] int32."""
    order = np.random.default_rng(seed).permutation(len(docs))
    stream = np.fromiter((t for i in order for t in docs[i]), dtype=np.int32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def take_rows(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The first n rows of a seeded permutation, cycling over epochs if the corpus is smaller than n."""
    rng = np.random.default_rng(seed)
    parts, need = [], n
    while need > 0:
        perm = rng.permutation(len(rows))[:need]
        parts.append(rows[perm])
        need -= len(perm)
    return np.concatenate(parts)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr (or a constant lr when args.decay is False).

    Seed (no decay) followed by a branch (short re-warmup for its fresh optimizer, then decay) is a
    warmup-stable-decay schedule split across two runs."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if not args.decay:
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model, args: TrainArgs):
    import torch

    # decay matrices (attention, router, 3-D expert weights, embeddings); never the 1-D norm scales
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": keep, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train_model(config, rows: np.ndarray, args: TrainArgs, out_dir: Path, desc: str, position: int = 0,
                group: Group = SOLO) -> dict:
    """Train on rows (one batch = batch_size consecutive rows), from scratch or args.init_from; save_pretrained.

    In a data-parallel group (experts.demo.data_parallel) every process runs this with the same arguments and
    takes its share of each batch; the leader shows progress and saves."""
    import torch
    from tqdm import tqdm
    from transformers import MixtralForCausalLM

    join(group)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.init_from is None:
        model = MixtralForCausalLM(config)
    else:
        model = MixtralForCausalLM.from_pretrained(str(args.init_from), dtype=torch.float32)
    model.train()
    opt = _optimizer(model, args)
    data = torch.from_numpy(rows.astype(np.int64))
    assert len(data) >= args.steps * args.batch_size, "not enough rows for the requested steps"
    ema, start, losses = None, time.perf_counter(), []
    bar = tqdm(range(args.steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0, position=position,
               disable=not group.leader)
    for step in bar:
        for param_group in opt.param_groups:
            param_group["lr"] = lr_at(step, args)
        batch = local_rows(data[step * args.batch_size:(step + 1) * args.batch_size], group)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        lm = out.loss - config.router_aux_loss_coef * out.aux_loss
        if group.world == 1:
            out.loss.backward()
        else:                          # the balancing term over the group's whole batch, not this process's rows
            (lm + config.router_aux_loss_coef * group_balancing_loss(
                out.router_logits, config.num_local_experts, config.num_experts_per_tok, group)).backward()
        lm_loss = average(model.parameters(), lm.item(), group)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm_loss)
        ema = lm_loss if ema is None else 0.95 * ema + 0.05 * lm_loss
        tok_s = (step + 1) * args.tokens_per_step / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    if group.leader:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
    leave(group)
    return {"steps": args.steps, "tokens": args.steps * args.tokens_per_step, "seconds": round(seconds, 1),
            "tokens_per_s": round(args.steps * args.tokens_per_step / seconds), "threads": args.threads,
            "processes": group.world,
            "final_loss": round(float(np.mean(losses[-max(1, args.steps // 20):])), 4)}


def _exit_with_parent(poll_s: float = 5.0) -> None:
    """A killed build must not leave minutes of orphaned training behind: exit when the parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


Job = tuple[str, np.ndarray, TrainArgs, Path]  # (model name, rows, args, output directory)


def train_jobs(config_dict: dict, jobs: list[Job], position: int = 0, group: Group = SOLO) -> dict[str, dict]:
    """Worker-process entry point: train the jobs one after another; returns {name: stats}."""
    from transformers import MixtralConfig

    _exit_with_parent()
    config = MixtralConfig.from_dict(config_dict)
    stats = {}
    for name, rows, args, out_dir in jobs:
        stats[name] = train_model(config, rows, args, out_dir, desc=name, position=position, group=group)
        if group.leader:
            print(f"[build-demo] {name}: {stats[name]}", flush=True)
    return stats
