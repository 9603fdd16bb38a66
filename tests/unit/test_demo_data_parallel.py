"""The seed's data-parallel training (experts/demo/data_parallel.py) over real spawned processes and gloo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from experts.demo.build import run_data_parallel
from experts.demo.data_parallel import Group, local_rows
from experts.demo.train import TrainArgs


def test_processes_share_each_batch_without_overlap():
    batch = np.arange(6)
    shares = [local_rows(batch, Group(r, 3)) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == batch.tolist()
    assert np.array_equal(local_rows(batch, Group()), batch)
    with pytest.raises(AssertionError, match="does not split"):
        local_rows(np.arange(5), Group(0, 2))


def _tiny_config():
    from transformers import MixtralConfig

    # a strong router load-balancing term: it is the one part of the loss that is not a mean over rows, so two
    # processes on half batches give the one-process update only if it is computed over the whole group's batch
    return MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, router_aux_loss_coef=0.5)


def _weights(path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


def test_two_processes_train_the_same_model_as_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # a relative output directory, as `--out artifacts/demo`
    rows = np.random.default_rng(0).integers(0, 64, size=(12, 16)).astype(np.int32)
    args = TrainArgs(steps=3, seq_len=16, batch_size=4, warmup_steps=1, threads=1, decay=False)
    config = _tiny_config()
    solo = run_data_parallel(config, [("m", rows, args, Path("solo"))], 1, Path("."))
    pair = run_data_parallel(config, [("m", rows, args, Path("pair"))], 2, Path("."))
    assert solo["m"]["processes"] == 1 and pair["m"]["processes"] == 2
    assert pair["m"]["final_loss"] == pytest.approx(solo["m"]["final_loss"], rel=1e-5)   # the group's mean loss
    a, b, init = _weights(tmp_path / "solo"), _weights(tmp_path / "pair"), _init_weights(config, args)
    moved = 0
    for name, w in a.items():
        assert torch.allclose(w, b[name], atol=1e-5), name
        moved += int(not torch.equal(w, init[name]))
    assert moved > len(a) // 2                          # the comparison is between trained models
    assert not list(tmp_path.glob(".rendezvous-*"))      # the rendezvous file is cleaned up


def _init_weights(config, args):
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)                        # as train_model seeds its fresh model
    return MixtralForCausalLM(config).state_dict()


def test_balancing_loss_alone_is_transformers_own():
    from transformers import MixtralForCausalLM

    from experts.demo.data_parallel import group_balancing_loss

    config = _tiny_config()
    torch.manual_seed(0)
    out = MixtralForCausalLM(config)(input_ids=torch.randint(0, 64, (2, 16)), output_router_logits=True)
    mine = group_balancing_loss(out.router_logits, config.num_local_experts, config.num_experts_per_tok, Group())
    assert mine.item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
