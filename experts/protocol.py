"""The expert interface the orchestrator and the gate trainer talk to, and its typed messages.

Every call is batched: one call carries the steps of many concurrent sequences for the same expert, so the
per-call round trip (the dominant cost, see shared/FACTS.md) is paid once per engine step, not once per
sequence. Per-item failures come back as `error` on that item; they never fail the batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import msgspec
import numpy as np

# Why a step failed. "input": the request itself is wrong (a 4xx for the client; retrying cannot help).
# "capacity": the engine has no free session slot now (retry later: a 429/503 for the client).
# "engine": the engine failed this session (it was closed). "unavailable": the replica could not be reached,
# died or timed out; the session is gone with it, and re-opening it elsewhere (migration) may succeed.
ErrorKind = Literal["input", "capacity", "engine", "unavailable"]


ID_DTYPE = np.dtype("<i8")      # a TopK's token ids on the wire and in memory
LP_DTYPE = np.dtype("<f8")      # its logprobs: float64, so any value (vLLM's float32 ones too) round-trips exactly


class TopK(msgspec.Struct, frozen=True, array_like=True):
    """Top-k next-token log-probabilities, sorted by descending logprob. K = len(token_ids).

    Packed: `ids` holds K little-endian int64, `lps` K little-endian float64. On the wire each is one msgpack bin,
    so a round's 64 rows of 20 + 20 values cost a few bytes copies instead of 2,560 Python objects made by the
    replica and read back by the caller, and the mix joins a group's rows into one array (gating/mix_row.py).
    Build one with TopK.of; read it as tuples (token_ids, logprobs) or as arrays."""

    ids: bytes
    lps: bytes

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.lps) or len(self.ids) % ID_DTYPE.itemsize:
            raise ValueError(f"TopK: {len(self.ids)} id bytes and {len(self.lps)} logprob bytes do not make K pairs")

    @classmethod
    def of(cls, token_ids: Sequence[int] | np.ndarray, logprobs: Sequence[float] | np.ndarray) -> TopK:
        return cls(np.asarray(token_ids, dtype=ID_DTYPE).tobytes(), np.asarray(logprobs, dtype=LP_DTYPE).tobytes())

    @property
    def k(self) -> int:
        return len(self.ids) // ID_DTYPE.itemsize

    @property
    def id_array(self) -> np.ndarray:
        return np.frombuffer(self.ids, ID_DTYPE)

    @property
    def lp_array(self) -> np.ndarray:
        return np.frombuffer(self.lps, LP_DTYPE)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self.id_array.tolist())

    @property
    def logprobs(self) -> tuple[float, ...]:
        return tuple(self.lp_array.tolist())


def joined(tops: Sequence[TopK]) -> tuple[np.ndarray, np.ndarray]:
    """Every top-k's ids and logprobs end to end, as two flat read-only arrays (one bytes join each): [sum of K]."""
    return (np.frombuffer(b"".join([t.ids for t in tops]), ID_DTYPE),
            np.frombuffer(b"".join([t.lps for t in tops]), LP_DTYPE))


def stacked(tops: Sequence[TopK]) -> tuple[np.ndarray, np.ndarray] | None:
    """Every top-k's ids and logprobs as two read-only [N, K] arrays (one bytes join each) when all N have the
    same K > 0; None when there is none, or an empty one, or their K differ."""
    if not tops:
        return None
    size = len(tops[0].ids)
    if size == 0 or any(len(t.ids) != size for t in tops):
        return None
    ids, lps = joined(tops)
    return ids.reshape(len(tops), -1), lps.reshape(len(tops), -1)


# The per-token messages (SessionStep, StepOutput, StepReply, TopK) are msgspec Structs, not dataclasses: a round
# at concurrency 32, top-2, builds and reads about 64 of each on both ends, and a Struct is made and decoded
# several times faster (a StepOutput: 0.10 µs as a Struct, 0.93 µs as a frozen dataclass, on this machine).
# array_like: encoded as msgpack arrays, without field names.

class SessionStep(msgspec.Struct, frozen=True, array_like=True):
    """One sequence's part of a batched open/advance call.

    open:    token_ids is the whole prompt (non-empty).
    advance: token_ids are the tokens appended since the last call (one, or several to catch up).
    """

    session_id: str
    token_ids: tuple[int, ...]


class StepOutput(msgspec.Struct, frozen=True, array_like=True):
    """Result for one SessionStep: the next-token top-k after all tokens fed so far, or an error."""

    session_id: str
    topk: TopK | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    # Number of tokens the session now holds (prompt + advanced), by the replica's count. The decode loop
    # rejects an answer whose length is not the number of tokens it sent (experts/answer_checks.length_problem).
    length: int = 0
    replica: str = ""          # the replica that holds the session: later steps are pinned to it
    server_s: float = 0.0      # time the replica spent on the call that carried this step (RPC accounting)


class StepReply(msgspec.Struct, frozen=True, array_like=True):
    """A replica's answer to one batched open/advance call."""

    replica: str
    outputs: tuple[StepOutput, ...]
    server_s: float


@dataclass(frozen=True)
class ScoreOutput:
    """Teacher-forced scores of one sequence x[0..T-1].

    Position j (0 <= j < T-1) describes the prediction of x[j+1] from x[0..j]:
      topk_ids[j] / topk_logprobs[j] are the top-k tokens (K each, descending),
      target_logprobs[j] is the logprob of the actual token x[j+1].
    """

    token_ids: tuple[int, ...]
    topk_ids: tuple[tuple[int, ...], ...] = ()
    topk_logprobs: tuple[tuple[float, ...], ...] = ()
    target_logprobs: tuple[float, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A sequence the expert's engine decodes on its own (one expert makes every token: nothing to mix)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0
    top_k: int = 0                   # 0: all tokens


@dataclass(frozen=True)
class GenerateDelta:
    """New tokens of one generation since its previous delta; the last one carries finish_reason or error."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()                                  # raw log-softmax of each token
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()      # per token, when asked for
    finish_reason: str | None = None                                  # "stop" | "length"
    error: str | None = None
    error_kind: ErrorKind | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class StartReply:
    """A replica's answer to starting generations: per request None (running) or (error, kind)."""

    replica: str
    errors: tuple[tuple[str, ErrorKind] | None, ...]


@dataclass(frozen=True)
class PollReply:
    """Everything a replica's engine produced for one caller's generations since its previous poll."""

    replica: str
    deltas: tuple[GenerateDelta, ...]


@dataclass(frozen=True)
class ReplicaStats:
    replica: str
    open_sessions: int
    generations: int
    data_plane_connections: int = 0     # accepted since the replica started (experts/data_plane.py)
    data_plane_calls: int = 0           # calls answered over them
    engine_steps: int = 0               # vLLM engine steps so far (in-process engines only)
    engine_step_s: float = 0.0          # wall time inside them
    # experts/self_check.py: "" (nothing found), "replace: <why>" (its live model went bad; its health check
    # fails) or "suspect checkpoint: <why>" (never answered soundly; kept, a new replica would load the same files)
    self_check: str = ""
    relay: str = ""                     # "realtime" or "normal": the priority of the loop serving this call


@dataclass(frozen=True)
class ExpertInfo:
    """What the orchestrator must know about an expert; validated once at startup."""

    name: str
    model_path: str
    vocab_size: int              # size of the logit vector (config.vocab_size)
    max_model_len: int
    tokenizer_fingerprint: str   # sha256 over the tokenizer's vocab + merges + special tokens
    eos_token_id: int | None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Expert(Protocol):
    """Session stepping, native generation and teacher-forced scoring. Implementations: experts.vllm_expert
    (inside a replica) and experts.client.ServeExpertClient (every replica of a deployment, from outside)."""

    async def info(self) -> ExpertInfo: ...

    # An answer's StepOutput.length must count every token its session holds: the caller checks it.
    async def open(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]: ...

    async def advance(self, steps: list[SessionStep], top_k: int) -> list[StepOutput]: ...

    async def close(self, session_ids: list[str]) -> None: ...

    async def score(self, sequences: list[list[int]], top_k: int) -> list[ScoreOutput]: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]: ...
