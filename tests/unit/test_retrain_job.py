"""`gating.retrain.retrain` end to end over in-process deterministic experts: a better gate is promoted as a new
version; an interrupted or refused job leaves the registry (CURRENT, versions, history) exactly as it was.
The registry is a directory or a database (SQLite file, real PostgreSQL): the job cannot tell them apart."""

from __future__ import annotations

import random

import pytest
import torch

from gating.checkpoint import GateCheckpoint, GateMismatchError, GateRegistry, open_registry
from gating.model import Gate, GateArgs
from gating.retrain import RetrainOptions, Sequence, retrain
from tests.fakes import DeterministicExpert

NAMES = ["code", "prose", "math", "json"]
V = 64


@pytest.fixture(params=["directory", "sqlite", "postgresql"])
def registry_at(request, tmp_path) -> str:
    if request.param == "directory":
        return str(tmp_path / "gate")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_server").new_database()


def setup(tmp_path, fingerprint="fp-shared", registry_at=None):
    experts = {n: DeterministicExpert(n, seed=i, vocab=V) for i, n in enumerate(NAMES)}
    torch.manual_seed(0)
    args = GateArgs(V, len(NAMES), 8, 16)
    registry = open_registry(registry_at or tmp_path / "gate")
    registry.add(GateCheckpoint("gate-v1", args, Gate(args).state_dict(), NAMES, fingerprint, 2, "probs"),
                 promote=True, reason="test")
    rng = random.Random(0)
    seqs = [Sequence(f"r{i}", tuple(rng.randrange(2, V) for _ in range(24)), "prompt") for i in range(40)]
    return experts, registry, seqs


def snapshot(registry: GateRegistry) -> tuple:
    return registry.current(), registry.versions(), len(registry.history())


async def test_a_better_gate_is_promoted_as_a_new_version(tmp_path, registry_at) -> None:
    experts, registry, seqs = setup(tmp_path, registry_at=registry_at)
    info = await experts["code"].info()
    result, ckpt, _ = await retrain(experts, info, registry, seqs, RetrainOptions(epochs=4))
    assert result["heldout_nll_new"] < result["heldout_nll_old"] and result["promoted"]
    assert ckpt.version == result["new_version"] == registry.current() == "gate-v2"
    assert ckpt.parent == "gate-v1" and ckpt.mix_space == "probs"
    assert set(result["routing_new"]["expert_share"]) == set(NAMES)
    assert open_registry(registry_at).load_current().version == "gate-v2"     # what the next reader sees


async def test_an_interrupted_job_writes_nothing(tmp_path, registry_at) -> None:
    experts, registry, seqs = setup(tmp_path, registry_at=registry_at)
    before = snapshot(registry)

    async def interrupted(_sequences):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await retrain(experts, await experts["code"].info(), registry, seqs, RetrainOptions(epochs=2), interrupted)
    assert snapshot(registry) == before
    assert not list((tmp_path / "gate" / "versions").glob(".*tmp"))


async def test_experts_or_tokenizer_that_do_not_match_the_live_gate_are_refused(tmp_path) -> None:
    experts, registry, seqs = setup(tmp_path, fingerprint="fp-other")
    before = snapshot(registry)
    with pytest.raises(GateMismatchError, match="tokenizer"):
        await retrain(experts, await experts["code"].info(), registry, seqs, RetrainOptions(epochs=1))
    renamed = {("legal" if n == "json" else n): e for n, e in experts.items()}
    with pytest.raises(GateMismatchError):
        await retrain(renamed, await experts["code"].info(), registry, seqs, RetrainOptions(epochs=1))
    assert snapshot(registry) == before
