"""ServeExpertClient's native generation over a fake Serve handle: deltas that arrive through a poll already in
flight, before `start` has returned, still reach their stream (they were once dropped, and the stream hung)."""

from __future__ import annotations

import asyncio

from experts.client import ServeExpertClient
from experts.protocol import GenerateDelta, GenerateRequest, PollReply, StartReply
from tests.serve_fakes import FakeHandle


class RacyReplica(FakeHandle):
    """`start` of the second request answers only after a poll has already delivered that request's deltas."""

    def __init__(self) -> None:
        self.outbox: list[GenerateDelta] = []
        self.delivered = asyncio.Event()

    async def _start(self, requests, caller, replica=None):
        rid = requests[0].request_id
        if rid == "second":
            self.outbox += [GenerateDelta(rid, token_ids=(7,)), GenerateDelta(rid, token_ids=(8,), finish_reason="length")]
            await self.delivered.wait()            # the poll in flight returns them first
        else:
            self.outbox.append(GenerateDelta(rid, token_ids=(1,)))
        return StartReply("r1", (None,))

    async def _poll(self, caller, aborts, wait_s, replica=None):
        while not self.outbox:
            await asyncio.sleep(0.001)
        out, self.outbox = self.outbox, []
        if any(d.request_id == "second" for d in out):
            asyncio.get_running_loop().call_soon(self.delivered.set)
        return PollReply("r1", tuple(out))


def _request(rid: str) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_ids=(1, 2), max_tokens=2)


async def test_deltas_that_overtake_their_start_reply_are_not_lost() -> None:
    client = ServeExpertClient(RacyReplica(), "code", call_timeout_s=5)
    first = client.generate(_request("first"))
    assert (await anext(first)).token_ids == (1,)          # a poller is now running on replica r1
    second = await asyncio.wait_for(_collect(client.generate(_request("second"))), 5)
    assert [d.token_ids for d in second] == [(7,), (8,)] and second[-1].final
    await first.aclose()
    await client.aclose()


async def _collect(stream) -> list[GenerateDelta]:
    return [d async for d in stream]
