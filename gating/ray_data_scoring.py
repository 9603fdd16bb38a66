"""Scoring at scale: the same teacher-forced top-k scoring as gating.scores.score_sequences, run as a Ray Data
job. Actors in the Ray Data pool call the expert deployments of a running application (Serve handles work
from any node), so scoring spreads over the cluster and keeps every expert replica busy. On a laptop the same
code runs on local Ray.

    sequences ──► ray.data (blocks of `batch` sequences) ──► ScoreBatch actors ──► expert deployments
                                                                    │  (every expert, one batched call each)
    ScoredCorpus ◄── assemble (in sequence order) ◄─────────────────┘
"""

from __future__ import annotations

import asyncio
import pickle
import threading

import numpy as np

from gating.scores import ScoredCorpus, assemble, per_document


class ScoreBatch:
    """One Ray Data actor: clients for every expert deployment, reused across batches."""

    def __init__(self, app_name: str, expert_names: list[str], top_k: int) -> None:
        from experts.server import connect_experts

        self.names, self.top_k = expert_names, top_k
        # One event loop for the actor's life, in its own thread: Serve handles bind to the loop they are
        # first used on (the router runs there), and Ray Data may call us from a thread pool.
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="score-batch-loop", daemon=True).start()
        self.experts = connect_experts(expert_names, app_name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seqs = [[int(t) for t in s] for s in batch["tokens"]]

        async def all_experts():
            return await asyncio.gather(*(self.experts[n].score(seqs, self.top_k) for n in self.names))

        scored = asyncio.run_coroutine_threadsafe(all_experts(), self._loop).result()
        per_doc = per_document(self.names, seqs, scored)
        return {"index": batch["index"], "scores": np.array([pickle.dumps(o) for o in per_doc], dtype=object)}


def score_with_ray_data(app_name: str, expert_names: list[str], sequences: list[list[int]], top_k: int, *,
                        batch: int = 16, actors: int = 2) -> ScoredCorpus:
    """Score every sequence with every expert of the running app `app_name` -> ScoredCorpus (input order).
    Needs a connected Ray (ray.init) with the application running."""
    import ray

    items = [{"index": i, "tokens": np.asarray(s, dtype=np.int64)} for i, s in enumerate(sequences)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch, 64)))
    scored = ds.map_batches(ScoreBatch, fn_constructor_args=(app_name, expert_names, top_k), batch_size=batch,
                            concurrency=actors, num_cpus=0.1)
    per_doc: list = [None] * len(sequences)
    for row in scored.iter_rows():
        per_doc[int(row["index"])] = pickle.loads(row["scores"])
    missing = [i for i, d in enumerate(per_doc) if d is None]
    if missing:
        raise RuntimeError(f"Ray Data returned no scores for {len(missing)} sequences (first: {missing[:5]})")
    return assemble(expert_names, sequences, per_doc)
