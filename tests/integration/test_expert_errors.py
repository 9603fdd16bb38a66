"""Bad input to a real expert gets a clear per-item error, leaves good items in the same batch intact,
and leaves the engine serving."""

from __future__ import annotations

import uuid

import pytest

from experts.protocol import SessionStep
from tests.integration.conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.integration
K = 5


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(expert_clients):
    return next(iter(expert_clients.values()))


@pytest.fixture
async def vocab_size(client):
    return (await client.info()).vocab_size


async def open_with_good_neighbour(client, bad: SessionStep):
    """Open `bad` next to a valid session in one batch; return the bad item's output after checking the good."""
    good = new_id("good")
    out_bad, out_good = await client.open([bad, SessionStep(good, (1, 2, 3))], K)
    assert out_good.error is None and out_good.topk is not None, out_good
    await client.close([good])
    return out_bad


async def test_empty_prompt(client, assert_serves):
    out = await open_with_good_neighbour(client, SessionStep(new_id("empty"), ()))
    assert out.topk is None and "empty" in out.error
    await assert_serves(client)


@pytest.mark.parametrize("bad_id", ["too_big", -1])
async def test_token_id_outside_vocabulary(client, vocab_size, assert_serves, bad_id):
    tid = vocab_size if bad_id == "too_big" else bad_id
    sid = new_id("oov")
    out = await open_with_good_neighbour(client, SessionStep(sid, (1, tid, 2)))
    assert out.topk is None and f"outside [0, {vocab_size})" in out.error and str(tid) in out.error
    # Same check on advance, and the session survives a rejected advance.
    (opened,) = await client.open([SessionStep(sid, (1, 2))], K)
    assert opened.error is None
    (rejected,) = await client.advance([SessionStep(sid, (tid,))], K)
    assert "outside" in rejected.error
    (after,) = await client.advance([SessionStep(sid, (3,))], K)
    assert after.error is None and after.length == 3
    await client.close([sid])
    await assert_serves(client)


async def test_prompt_longer_than_max_model_len(client, assert_serves):
    out = await open_with_good_neighbour(client, SessionStep(new_id("long"), (1,) * (MAX_MODEL_LEN + 5)))
    assert out.topk is None and "max_model_len" in out.error and str(MAX_MODEL_LEN + 5) in out.error
    # A prompt of exactly max_model_len leaves no room for the predicted token either.
    out = await open_with_good_neighbour(client, SessionStep(new_id("exact"), (1,) * MAX_MODEL_LEN))
    assert "max_model_len" in out.error
    await assert_serves(client)


async def test_advance_past_max_model_len(client, assert_serves):
    sid = new_id("grow")
    (ok,) = await client.open([SessionStep(sid, (1,) * (MAX_MODEL_LEN - 3))], K)
    assert ok.error is None
    (too_far,) = await client.advance([SessionStep(sid, (2, 3, 4))], K)
    assert too_far.topk is None and "max_model_len" in too_far.error
    (last,) = await client.advance([SessionStep(sid, (2, 3))], K)  # fills the context up to the limit
    assert last.error is None and last.length == MAX_MODEL_LEN - 1
    await client.close([sid])
    await assert_serves(client)


async def test_advance_closed_or_unknown_session(client, assert_serves):
    sid = new_id("closed")
    await client.open([SessionStep(sid, (1, 2))], K)
    await client.close([sid])
    closed, unknown = await client.advance([SessionStep(sid, (3,)), SessionStep(new_id("never"), (3,))], K)
    assert "unknown or closed" in closed.error and sid in closed.error
    assert "unknown or closed" in unknown.error
    await client.close([sid, "never-opened"])  # closing twice / unknown ids is a no-op
    await assert_serves(client)


async def test_duplicate_open(client, assert_serves):
    sid = new_id("dup")
    first, same_batch = await client.open([SessionStep(sid, (1, 2)), SessionStep(sid, (1, 2))], K)
    assert first.error is None and "already open" in same_batch.error
    (again,) = await client.open([SessionStep(sid, (4,))], K)
    assert "already open" in again.error
    (still,) = await client.advance([SessionStep(sid, (3,))], K)  # the original session is untouched
    assert still.error is None and still.length == 3
    await client.close([sid])
    await assert_serves(client)


async def test_same_session_twice_in_one_advance(client):
    sid = new_id("twice")
    await client.open([SessionStep(sid, (1, 2))], K)
    first, second = await client.advance([SessionStep(sid, (3,)), SessionStep(sid, (4,))], K)
    assert first.error is None and first.length == 3 and "busy" in second.error
    await client.close([sid])


@pytest.mark.parametrize("top_k", [0, 10_000])
async def test_top_k_out_of_range(client, assert_serves, top_k):
    (out,) = await client.open([SessionStep(new_id("k"), (1, 2))], top_k)
    assert "top_k" in out.error and "max_top_k" in out.error
    (scored,) = await client.score([[1, 2, 3]], top_k)
    assert "top_k" in scored.error
    await assert_serves(client)


async def test_bad_sequences_to_score(client, vocab_size, assert_serves):
    empty, oov, good, single = await client.score([[], [1, vocab_size + 3], [1, 2, 3], [7]], K)
    assert "empty" in empty.error
    assert "outside" in oov.error
    assert good.error is None and len(good.target_logprobs) == 2
    assert single.error is None and single.target_logprobs == ()  # one token: nothing to predict
    await assert_serves(client)
