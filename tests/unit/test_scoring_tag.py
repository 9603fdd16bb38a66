"""Cached expert scores (gating.scores.cache_key) are reused only for the same checkpoints and engine numbers."""

from __future__ import annotations

import os

from experts.checkpoint import checkpoint_identity
from experts.config import ExpertConfig
from gating.scores import cache_key, scoring_tag


def _checkpoint(root, name: str):
    path = root / name
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "mixtral"}')
    (path / "model.safetensors").write_bytes(b"weights-v1")
    return path


def _tag(paths, **settings) -> str:
    configs = [ExpertConfig(name=p.name, model_path=str(p), **settings) for p in paths]
    return scoring_tag(configs, "tokenizer-fp")


def test_the_same_checkpoints_and_settings_give_the_same_key(tmp_path) -> None:
    a, b = _checkpoint(tmp_path, "code"), _checkpoint(tmp_path, "prose")
    assert _tag([a, b]) == _tag([a, b])
    key = cache_key(["code", "prose"], [[1, 2, 3]], 20, _tag([a, b]))
    assert key == cache_key(["code", "prose"], [[1, 2, 3]], 20, _tag([a, b]))
    assert key != cache_key(["code", "prose"], [[1, 2, 4]], 20, _tag([a, b]))


def test_a_checkpoint_rewritten_in_place_under_the_same_name_changes_the_key(tmp_path) -> None:
    a, b = _checkpoint(tmp_path, "code"), _checkpoint(tmp_path, "prose")
    before = _tag([a, b])
    weights = b / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"weights-v2")                            # same size: only the time tells
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    rewritten = _tag([a, b])
    assert rewritten != before
    (b / "model-00002.safetensors").write_bytes(b"more")          # a shard added
    assert _tag([a, b]) not in (before, rewritten)
    assert [name for name, _, _ in checkpoint_identity(str(b))] == [
        "config.json", "model-00002.safetensors", "model.safetensors"]


def test_engine_settings_that_change_the_numbers_change_the_key(tmp_path) -> None:
    a = _checkpoint(tmp_path, "code")
    base = _tag([a])
    assert _tag([a], dtype="float32") != base
    assert _tag([a], enforce_eager=False) != base
    assert _tag([a], engine_kwargs={"ir_op_priority": {"rms_norm": ["native"]}}) != base
    assert scoring_tag([ExpertConfig(name="code", model_path=str(a))], "another-tokenizer") != base


def test_a_path_that_is_not_on_this_node_and_a_hub_id_are_their_own_identity() -> None:
    assert checkpoint_identity("/nowhere/on/this/node") == ["/nowhere/on/this/node"]
    assert checkpoint_identity("org/model") == ["org/model"]
