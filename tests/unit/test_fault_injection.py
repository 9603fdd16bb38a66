"""The fault hooks' own rules: off unless the replica's environment says so, and the damage is real."""

import torch

from experts.fault_injection import ENABLE, enabled, nan_weight


def test_fault_injection_is_off_unless_the_environment_turns_it_on(monkeypatch):
    monkeypatch.delenv(ENABLE, raising=False)
    assert not enabled()
    monkeypatch.setenv(ENABLE, "0")
    assert not enabled()
    monkeypatch.setenv(ENABLE, "1")
    assert enabled()


def test_nan_weight_fills_the_embedding_table_the_forward_reads():
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(8, 4)
    model.model.norm = torch.nn.LayerNorm(4)
    assert nan_weight(model) == "model.embed_tokens.weight"
    assert model.model.embed_tokens(torch.tensor([3])).isnan().all()
    assert not model.model.norm.weight.isnan().any()
