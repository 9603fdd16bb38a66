"""The event loops that relay tokens run at real-time priority in the real application: the gateway replica's
and every expert replica's (experts/thread_priority.py), where the OS grants it (this machine and CI run as
root). Each answers for the loop that serves it: /metrics and the replicas' stats read the policy of the thread
they run on."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

pytestmark = pytest.mark.integration


async def test_the_gateway_and_every_expert_replica_relay_on_a_real_time_event_loop(live_gateway,
                                                                                    expert_clients) -> None:
    if os.geteuid() != 0:
        pytest.skip("real-time priority needs CAP_SYS_NICE; this test runs where it is granted (root)")
    async with httpx.AsyncClient(timeout=60) as client:
        text = (await client.get(f"{live_gateway.base_url}/metrics")).text
    assert "ensemble_relay_realtime 1.0" in text, [line for line in text.splitlines() if "relay" in line]
    stats = await asyncio.gather(*(c.stats() for c in expert_clients.values()))
    assert [s.relay for s in stats] == ["realtime"] * len(stats), {s.replica: s.relay for s in stats}
