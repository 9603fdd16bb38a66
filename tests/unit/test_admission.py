"""Admission control: slots, a bounded FIFO queue, a queue timeout, and clients that leave while waiting."""

import asyncio

import pytest

from orchestrator.admission import Admission
from orchestrator.types import AtCapacity


async def test_requests_beyond_the_slots_wait_and_are_served_in_arrival_order():
    adm = Admission(max_active=2, max_queued=4, queue_timeout_s=60)
    await adm.acquire()
    await adm.acquire()
    order = []

    async def waiter(i):
        await adm.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    while adm.queued < 3:
        await asyncio.sleep(0)
    assert adm.active == 2 and not order
    for expected in ([0], [0, 1], [0, 1, 2]):
        adm.release()
        await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks[:len(expected)])), 5)
        assert order == expected
    assert adm.active == 2 and adm.queued == 0


async def test_a_full_queue_is_refused_at_once():
    adm = Admission(max_active=1, max_queued=1, queue_timeout_s=60)
    await adm.acquire()
    queued = asyncio.create_task(adm.acquire())
    while adm.queued < 1:
        await asyncio.sleep(0)
    with pytest.raises(AtCapacity):
        await adm.acquire()
    assert adm.rejected == 1
    adm.release()
    await queued


async def test_a_wait_longer_than_the_timeout_is_refused_and_leaves_no_trace():
    adm = Admission(max_active=1, max_queued=4, queue_timeout_s=0.05)
    await adm.acquire()
    with pytest.raises(AtCapacity, match="waited"):
        await adm.acquire()
    assert adm.queued == 0 and adm.active == 1 and adm.rejected == 1
    adm.release()
    assert adm.active == 0


async def test_a_client_that_leaves_while_queued_does_not_leak_a_slot():
    adm = Admission(max_active=1, max_queued=4, queue_timeout_s=60)
    await adm.acquire()
    gone = asyncio.create_task(adm.acquire())
    while adm.queued < 1:
        await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    adm.release()
    assert adm.active == 0 and adm.queued == 0
    await adm.acquire()
    assert adm.active == 1
