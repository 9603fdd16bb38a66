"""The single-expert fast path: one expert makes every token, so there is nothing to mix; its engine decodes
on its own and we relay the tokens as TokenEvents.

If the replica dies mid-request, the generation restarts on another replica from the prompt plus the tokens
already produced (migration; at temperature 0 the text is the same as without the fault). Two attempts in a
row that produce nothing mean no replica is answering: the request then fails (a 503) instead of waiting
out every attempt on a hung replica. A delta that no model could have sent (experts/answer_checks.py: a
corrupt checkpoint's NaN logprobs) counts as a lost generation: its tokens are not relayed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from experts.answer_checks import token_problem
from experts.protocol import Expert, GenerateRequest
from orchestrator.request_checks import RequestRejected
from orchestrator.types import AtCapacity, ExpertsUnavailable, GateDecision, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)
MAX_MIGRATIONS = 3
MAX_BARREN_ATTEMPTS = 2     # attempts in a row without a token before the expert counts as not answering


async def native_events(expert: Expert, name: str, req: GenerationRequest,
                        vocab_size: int) -> AsyncIterator[TokenEvent]:
    p = req.params
    routing = GateDecision((name,), (1.0,))
    produced: list[int] = []
    barren = 0
    for attempt in range(MAX_MIGRATIONS + 1):
        before = len(produced)
        remaining = p.max_tokens - len(produced)
        greq = GenerateRequest(f"{req.request_id}.{attempt}", tuple(req.prompt_ids) + tuple(produced), remaining,
                               p.temperature, p.top_p, p.seed, p.stop_token_ids, p.ignore_eos, p.top_logprobs,
                               p.top_k)
        lost = None
        async for d in expert.generate(greq):
            if d.error is not None:
                if d.error_kind == "input":
                    raise RequestRejected(f"expert {name}: {d.error}", param="prompt")
                if d.error_kind == "capacity":
                    raise AtCapacity(f"expert {name}: {d.error}")
                lost = d.error
                break
            problem = token_problem(d.token_ids, d.logprobs, vocab_size, d.top_logprobs)
            if problem is not None:                   # e.g. a corrupt checkpoint: NaN logprobs, token 0 forever
                lost = f"unsound answer from the replica: {problem}"
                log.warning("request %s: expert %s: %s", req.request_id, name, lost)
                quarantine = getattr(expert, "quarantine_generation", None)     # the restart goes elsewhere
                if quarantine is not None:
                    quarantine(greq.request_id)
                break
            for j, token in enumerate(d.token_ids):
                last = j == len(d.token_ids) - 1
                alts = d.top_logprobs[j] if j < len(d.top_logprobs) else ()
                yield TokenEvent(req.request_id, len(produced), token, d.logprobs[j], routing, alts,
                                 d.finish_reason if last else None)
                produced.append(token)
            if d.final:
                return
        if lost is None:
            return
        barren = barren + 1 if len(produced) == before else 0
        if barren >= MAX_BARREN_ATTEMPTS:
            break
        log.warning("request %s: expert %s lost mid-generation after %d tokens (%s); restarting elsewhere",
                    req.request_id, name, len(produced), lost)
    raise ExpertsUnavailable(f"expert {name} is not answering: {lost}")
