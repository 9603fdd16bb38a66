"""A replica that finds it answers nonsense asks Serve to replace it.

The gateway rejects unsound answers and quarantines the replica that sent them for a while
(experts/answer_checks.py, orchestrator/decode_loop.py). That protects the streams, but a corrupt model stays
corrupt: only a new replica is sound again (experts/fault_injection.py), and Serve's health check, which asks only
whether the engine runs, never said so. So each replica watches its own answers:

1. A step none of whose answers has a finite top logprob (a corrupt weight makes every logprob NaN; measured,
   experts/answer_checks.py), or a native generation's delta none of whose sampled tokens has a finite logprob
   (`observe_generated`: the single-expert fast path, where vLLM decodes alone), starts one probe: a one-token
   session on a fixed token, checked as the gateway checks answers (`topk_problems`, `length_problem`).
2. A probe that is unsound too, on a replica that has answered soundly before, means its model went bad while it
   ran (a new replica loads the files again): the replica is unsound for good, its health check raises from
   then on, and Serve replaces it (after REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD failed checks,
   health_check_period_s apart).
3. On a replica that has never answered soundly, the checkpoint itself is the suspect: a new replica would load
   the same files and fail the same way, over and over, each start costing an engine's load. It stays up (the
   gateway keeps the expert `down` and probes it) and says so in its log once; no more probes. So that a replica
   that has not answered yet, or whose model goes bad before its first answer, still knows it started sound,
   its first health check after the engine is up starts one probe (`start_baseline`).
4. A probe that answers soundly means one context overflowed, not the model; one that gets no answer at all (the
   engine is busy or stopping: the probe raises) proves nothing. Nothing happens, and a later such step probes
   again.

The watch costs a healthy step a list of its answers and one float read: it stops at the first answer whose top
logprob is finite. The top one is enough for a model gone bad (every logprob is NaN); a top-k with a NaN further
down is the gateway's to reject.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Awaitable, Callable, Sequence

from experts.protocol import StepOutput, TopK

log = logging.getLogger(__name__)
_FIRST_LP = struct.Struct("<d")          # TopK.lps: K little-endian float64, the top one first


class SoundnessWatch:
    """`probe()` -> what is wrong with the engine's answer to a fixed context, or None when it is sound; it
    raises when the engine gave no answer."""

    def __init__(self, probe: Callable[[], Awaitable[str | None]], name: str) -> None:
        self._probe, self.name = probe, name
        self.verdict: str | None = None          # set once, when a probe confirms: the replica must be replaced
        self.suspect_checkpoint: str | None = None    # a probe confirmed, but the replica was never sound
        self.ever_sound = False
        self.probes = 0
        self._task: asyncio.Task | None = None

    @property
    def state(self) -> str:
        """For ReplicaStats.self_check: "", "replace: <why>" or "suspect checkpoint: <why>"."""
        if self.verdict is not None:
            return f"replace: {self.verdict}"
        return "" if self.suspect_checkpoint is None else f"suspect checkpoint: {self.suspect_checkpoint}"

    def observe(self, outputs: Sequence[StepOutput]) -> None:
        """One step's answers (any mix of errors and top-k): probe when every top-k is non-finite."""
        tops = [o.topk for o in outputs if o.error is None and o.topk is not None]
        if tops:
            self._judge(any(finite_top(t) for t in tops))

    def observe_generated(self, logprobs: Sequence[float]) -> None:
        """A native generation's delta: its sampled tokens' logprobs. Probe when none is finite (a sampled
        token's logprob is finite in any sound model)."""
        if logprobs:
            self._judge(any(math.isfinite(lp) for lp in logprobs))

    def _judge(self, any_finite: bool) -> None:
        """One step's or delta's answers: sound, or the start of a probe (one at a time, none once decided)."""
        if any_finite:
            self.ever_sound = True
        elif not self._decided and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(odd_step=True),
                                                                name=f"self-probe:{self.name}")

    def start_baseline(self) -> None:
        """From the replica's health check (which must not wait on the engine): probe once, in the background,
        an engine that has not answered soundly yet. An unanswered probe is tried again at the next check."""
        if self.ever_sound or self._decided or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(odd_step=False), name=f"baseline:{self.name}")

    async def settled(self) -> None:
        """Wait for a probe in flight (tests)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    @property
    def _decided(self) -> bool:
        return self.verdict is not None or self.suspect_checkpoint is not None

    async def _run(self, odd_step: bool) -> None:
        self.probes += 1
        try:
            why = await self._probe()
        except Exception as exc:  # noqa: BLE001 - no answer is no evidence, whatever went wrong
            log.warning("%s: the self-probe got no answer (%r)", self.name, exc)
            return
        finally:
            self._task = None
        if why is None and odd_step:
            log.warning("%s: a step answered only non-finite logprobs, but the engine's self-probe is sound", self.name)
        self._conclude(why)

    def _conclude(self, why: str | None) -> None:
        if why is None:
            self.ever_sound = True
        elif self.ever_sound:
            self.verdict = f"the engine answers no next-token distribution ({why}): this replica must be replaced"
            log.error("%s: %s", self.name, self.verdict)
        else:
            self.suspect_checkpoint = why
            log.error("%s: the engine has answered no next-token distribution since it started (%s): its checkpoint "
                      "is likely corrupt. Not asking for a new replica, which would load the same files; the "
                      "gateway keeps this expert down until it answers soundly", self.name, why)


def finite_top(topk: TopK) -> bool:
    """Whether a top-k's first (largest) logprob is a finite number."""
    return topk.k > 0 and math.isfinite(_FIRST_LP.unpack_from(topk.lps)[0])
