"""CPU the gateway spends per generated token on the real per-token path: decode loop, expert client, data plane.

scripts/measure_orchestration.py calls in-process stand-ins; here each expert is a real ServeExpertClient that
talks over the real data plane (experts/data_plane.py, loopback TCP) to replicas in a second process, which
answer every open/advance at once with a precomputed top-k (so the replica side costs next to nothing and the
gateway's own work shows). The control plane (info, endpoint) is a stand-in for the Serve handle. Prints, per
concurrency, the gateway process's CPU per token and the phases (orchestrator/profile.py), wall time included:

    .venv/bin/python scripts/measure_step_path.py --streams 32 [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))          # measure_orchestration: the shared measurement


def replicas_process(names: list[str], vocab: int, top_k: int, endpoints: mp.Queue) -> None:
    """Runs in its own process: one DataPlaneServer per expert, answering at once."""
    from measure_orchestration import topk_pool

    from experts.data_plane import DataPlaneServer
    from experts.protocol import StepOutput, StepReply

    async def serve() -> None:
        endpoints_out = {}
        servers = []
        for seed, name in enumerate(names):
            pool = topk_pool(vocab, top_k, seed)
            lengths: dict[str, int] = {}
            replica = f"replica-{name}"

            def answer(steps, opening, pool=pool, lengths=lengths, replica=replica):
                t0 = time.perf_counter()
                out = []
                for n, s in enumerate(steps):
                    held = lengths[s.session_id] = (0 if opening else lengths[s.session_id]) + len(s.token_ids)
                    out.append(StepOutput(s.session_id, topk=pool[(held + n) % len(pool)], length=held))
                return StepReply(replica, tuple(out), time.perf_counter() - t0)

            async def open_(steps, top_k, answer=answer):
                return answer(steps, True)

            async def advance(steps, top_k, answer=answer):
                return answer(steps, False)

            async def close(ids, lengths=lengths):
                for sid in ids:
                    lengths.pop(sid, None)

            server = DataPlaneServer({"open": open_, "advance": advance, "close": close}, "127.0.0.1")
            servers.append(server)
            endpoints_out[name] = await server.start()
        endpoints.put({n: (e.host, e.port, e.token) for n, e in endpoints_out.items()})
        await asyncio.Event().wait()

    asyncio.run(serve())


class Handle:
    """The Serve handle's control plane: info and endpoint; an open Serve would place goes over the data plane
    too (to the one replica)."""

    def __init__(self, name: str, vocab: int, endpoint) -> None:
        from experts.data_plane import Endpoint
        from tests.serve_fakes import RemoteMethod

        self.name, self.vocab, self.endpoint_ = name, vocab, Endpoint(*endpoint)
        self._conn = None
        self._remote = RemoteMethod

    def __getattr__(self, method: str):
        if method.startswith(("_", "h_")) or not hasattr(type(self), f"h_{method}"):
            raise AttributeError(method)
        return self._remote(getattr(self, f"h_{method}"))

    async def h_info(self, replica=None):
        from experts.protocol import ExpertInfo

        return ExpertInfo(self.name, f"/instant/{self.name}", self.vocab, 4096, "fp-shared", 0)

    async def h_endpoint(self, replica=None):
        return self.endpoint_

    async def _direct(self):
        from experts.data_plane import DataPlaneConnection

        if self._conn is None:
            self._conn = await DataPlaneConnection.open(self.endpoint_, f"handle {self.name}")
        return self._conn

    async def h_open(self, steps, top_k, replica=None):
        return await (await self._direct()).call("open", steps, top_k)

    async def h_advance(self, steps, top_k, replica=None):
        return await (await self._direct()).call("advance", steps, top_k)

    async def h_close(self, ids, replica=None):
        return await (await self._direct()).call("close", ids)


async def run(streams: int, tokens: int, demo: Path, endpoints: dict) -> dict:
    from measure_orchestration import measure

    from experts.client import ServeExpertClient

    return await measure(lambda names, vocab: {n: ServeExpertClient(Handle(n, vocab, endpoints[n]), n,
                                                                    call_timeout_s=30.0) for n in names},
                         streams, tokens, demo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT / "artifacts/demo")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="runs per concurrency (each line is one)")
    p.add_argument("--profile", type=Path, help="write a cProfile of the gateway side here")
    args = p.parse_args(argv)
    import torch

    from gating.checkpoint import load_checkpoint, resolve_gate_path

    torch.set_num_threads(1)
    ckpt = load_checkpoint(resolve_gate_path(args.demo / "gate"))
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=replicas_process, daemon=True,
                                           args=(list(ckpt.expert_names), ckpt.args.vocab_size, 20, queue))
    proc.start()
    endpoints = queue.get(timeout=60)
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        for s in args.streams:
            for _ in range(args.repeat):
                print(json.dumps(asyncio.run(run(s, args.tokens, args.demo, endpoints))), flush=True)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(args.profile))
        proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
