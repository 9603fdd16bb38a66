"""Demo tokenizer: BOS from the post-processor, exact byte-level round trip, shared files; pure training helpers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from experts.demo import specialisation
from experts.demo import tokenizer as tk
from experts.demo.model_config import DemoModelArgs
from experts.demo.train import TrainArgs, lr_at, pack_rows, take_rows

SAMPLES = [
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # tabs and  double  spaces\n",
    "Ünïcödé — “quotes”, emoji 🙂, CJK 漢字, trailing space ",
    '{"key": "value", "n": null, "list": [true, false]}',
    "  leading spaces\r\nwindows newline\n\n\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "def add(a, b):\n    return a + b\n" * 20,
             '{"name": "demo", "values": [1, 2, 3]}\n' * 20, "Solve 3x + 4 = 10. x = 2.\n" * 20]
    path = tmp_path_factory.mktemp("tok")
    tk.save_tokenizer(tk.train_tokenizer(texts, vocab_size=4096), path)
    return tk.load_tokenizer(path), path


def test_special_token_ids_follow_the_mixtral_convention(tokenizer):
    tok, _ = tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)


def test_encoding_starts_with_exactly_one_bos(tokenizer):
    tok, _ = tokenizer
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok("hello world", add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.eos_token_id not in ids  # EOS ends training documents only, added by encode_docs


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trips_exact_bytes(tokenizer, text):
    tok, _ = tokenizer
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_files_are_copied_identically(tokenizer, tmp_path):
    _, path = tokenizer
    tk.copy_tokenizer(path, tmp_path / "expert")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "expert" / name).read_bytes() == (path / name).read_bytes()
    assert json.loads((path / "tokenizer_config.json").read_text())["bos_token"] == "<s>"


def test_scoring_windows_start_with_bos_and_respect_caps(tokenizer):
    tok, _ = tokenizer
    seqs = specialisation.windows(tok, ["word " * 2000, "more text here"], max_tokens=700)
    assert all(s[0] == tok.bos_token_id and len(s) <= specialisation.CHUNK for s in seqs)
    assert sum(len(s) - 1 for s in seqs) == 700


def test_model_args_enforce_vllm_cpu_shapes():
    assert DemoModelArgs().head_dim == 32
    with pytest.raises(AssertionError):
        DemoModelArgs(hidden_size=64, num_attention_heads=4)  # head_dim 16 fails in vLLM's CPU attention
    with pytest.raises(AssertionError):
        DemoModelArgs(intermediate_size=200)


def test_packing_and_row_sampling_are_seeded():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2]] * 10
    rows = pack_rows(docs, seq_len=8, seed=0)
    assert rows.shape[1] == 8 and np.array_equal(rows, pack_rows(docs, 8, 0))
    assert not np.array_equal(rows, pack_rows(docs, 8, 1))
    picked = take_rows(rows, 2 * len(rows) + 1, seed=0)  # more than one epoch cycles
    assert len(picked) == 2 * len(rows) + 1 and np.array_equal(picked, take_rows(rows, len(picked), 0))


def test_lr_schedule_warms_up_then_decays_to_floor():
    args = TrainArgs(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, args) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_seed_schedule_holds_peak_lr_and_branches_keep_the_token_budget(tmp_path):
    import argparse

    from experts.demo import build

    seed_args = TrainArgs(steps=50, lr=2e-3, warmup_steps=5, decay=False)
    assert lr_at(4, seed_args) == pytest.approx(2e-3) and lr_at(49, seed_args) == pytest.approx(2e-3)
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    for share in (0.0, 0.25):
        args = parser.parse_args(["--minutes", "2", "--seed-share", str(share)])
        seed, branch = build.phase_args(args, tmp_path)
        used = seed.steps * seed.tokens_per_step + 8 * branch.steps * branch.tokens_per_step
        assert used <= 2 * 60 * build.REFERENCE_TOKENS_PER_S
        assert (branch.init_from is None) == (share == 0.0) and seed.steps % 4 == 0


def test_branch_rows_with_replay_are_disjoint_and_mix_the_domains():
    import argparse

    import numpy as np

    from experts.demo import build

    names = ("code", "prose", "math", "json")
    n_own, per_other = build.replay_split(100, 0.3, len(names))
    assert (n_own, per_other) == (70, 10)
    # each row holds its domain index and a serial number, so we can see where every row went
    parts = {n: np.array([[d, i] for i in range(n_own + 3 * per_other)]) for d, n in enumerate(names)}
    rows = build.branch_rows(parts, n_own, per_other, seed=0)
    seen = [tuple(r) for n in names for r in rows[n]]
    assert len(seen) == len(set(seen)) == 4 * 100                      # no row given twice, none dropped
    for d, n in enumerate(names):
        domains = np.bincount(rows[n][:, 0], minlength=4)
        assert domains[d] == 70 and all(domains[o] == 10 for o in range(4) if o != d)
    # replay 0 keeps the old behaviour exactly: own rows, in order
    plain = build.branch_rows({n: parts[n][:n_own] for n in names}, n_own, 0, seed=0)
    assert all((plain[n] == parts[n][:n_own]).all() for n in names)
    assert build.replay_split(2, 0.9, 4) == (2, 0) and build.replay_split(100, 0.3, 1) == (100, 0)
    with pytest.raises(ValueError):
        build.replay_split(100, 1.0, 4)
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    assert parser.parse_args(["--replay", "0.2"]).replay == 0.2
    with pytest.raises(SystemExit):                  # a usage error before any corpus work
        parser.parse_args(["--replay", "1.5"])
