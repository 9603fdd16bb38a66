"""A deterministic in-process expert for unit tests of routing, mixing and sampling (never for vLLM paths).

Its next-token distribution is a pure function of (expert seed, whole context), so a session that was
fed the wrong tokens (bad catch-up) gives visibly different logprobs.
"""

from __future__ import annotations

import hashlib

import torch

from experts.protocol import (
    ExpertInfo,
    GenerateDelta,
    GenerateRequest,
    ScoreOutput,
    SessionStep,
    StepOutput,
    TopK,
)


def context_logprobs(seed: int, context: list[int], vocab: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{context}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.log_softmax(torch.randn(vocab, generator=g) * 3.0, dim=0)


def topk_of(lp: torch.Tensor, k: int) -> TopK:
    v, i = lp.topk(k)
    return TopK.of(tuple(i.tolist()), tuple(v.tolist()))


class DeterministicExpert:
    def __init__(self, name: str, seed: int, vocab: int = 64, max_model_len: int = 256, eos: int | None = 1) -> None:
        self.name, self.seed, self.vocab, self.max_model_len, self.eos = name, seed, vocab, max_model_len, eos
        self.sessions: dict[str, list[int]] = {}
        self.calls = 0

    async def info(self) -> ExpertInfo:
        return ExpertInfo(self.name, f"/fake/{self.name}", self.vocab, self.max_model_len, "fp-shared", self.eos)

    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        self.calls += 1
        out = []
        for s in steps:
            self.sessions[s.session_id] = list(s.token_ids)
            out.append(self._next(s.session_id, top_k))
        return out

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]:
        self.calls += 1
        out = []
        for s in steps:
            if s.session_id not in self.sessions:
                out.append(StepOutput(s.session_id, error=f"unknown session {s.session_id}", error_kind="input"))
                continue
            self.sessions[s.session_id].extend(s.token_ids)
            out.append(self._next(s.session_id, top_k))
        return out

    async def close(self, session_ids: list[str]) -> None:
        for sid in session_ids:
            self.sessions.pop(sid, None)

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]:
        outs = []
        for seq in sequences:
            ids, lps, tgt = [], [], []
            for j in range(len(seq) - 1):
                lp = context_logprobs(self.seed, seq[: j + 1], self.vocab)
                t = topk_of(lp, top_k)
                ids.append(t.token_ids), lps.append(t.logprobs), tgt.append(float(lp[seq[j + 1]]))
            outs.append(ScoreOutput(tuple(seq), tuple(ids), tuple(lps), tuple(tgt)))
        return outs

    async def generate(self, request: GenerateRequest):
        """Native decoding: greedy at temperature 0, else sampled from the full distribution with the seed."""
        self.calls += 1
        ctx = list(request.prompt_ids)
        g = torch.Generator().manual_seed(request.seed if request.seed is not None else 0)
        for n in range(request.max_tokens):
            lp = context_logprobs(self.seed, ctx, self.vocab)
            if request.temperature == 0:
                token = int(lp.argmax())
            else:
                kept = lp if not request.top_k else lp.masked_fill(lp < lp.topk(request.top_k).values[-1], float("-inf"))
                token = int(torch.multinomial(torch.softmax(kept / request.temperature, 0), 1, generator=g))
            ctx.append(token)
            stop = token in request.stop_token_ids or (token == self.eos and not request.ignore_eos)
            finish = "stop" if stop else ("length" if n + 1 == request.max_tokens else None)
            top = topk_of(lp, request.top_logprobs) if request.top_logprobs else None
            alts = (tuple(zip(top.token_ids, top.logprobs)),) if top is not None else ()
            yield GenerateDelta(request.request_id, (token,), (float(lp[token]),), alts, finish)
            if finish:
                return

    def _next(self, sid: str, k: int) -> StepOutput:
        ctx = self.sessions[sid]
        return StepOutput(sid, topk_of(context_logprobs(self.seed, ctx, self.vocab), k), length=len(ctx))
