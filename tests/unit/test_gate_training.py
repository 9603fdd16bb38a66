"""Gate fitting and evaluation on a synthetic scored corpus where the right expert depends on the context."""

import math
import random

import torch

from gating.checkpoint import GateCheckpoint, GateMismatchError, GateRegistry
from gating.doc_router import DocRouter
from gating.evaluate import evaluate
from gating.model import GateArgs
from gating.scores import ScoredCorpus, load_scored, save_scored
from gating.train import FitArgs, evaluate_nll, fit_gate

V, E, K = 64, 3, 4
NAMES = ["a", "b", "c"]


def synthetic_corpus(n_docs=60, length=40, seed=0) -> ScoredCorpus:
    """Tokens come in runs; a run's token range names the expert that predicts the next token well."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(n_docs):
        seq = [0]
        while len(seq) < length:
            domain = rng.randrange(E)
            seq += [domain * 20 + 1 + rng.randrange(19) for _ in range(rng.randrange(4, 10))]
        seqs.append(seq[:length])
    ids, lps, tgt, ctx, doc, offsets = [], [], [], [], [], [0]
    for d, s in enumerate(seqs):
        for j in range(len(s) - 1):
            domain = (s[j] - 1) // 20 if s[j] else 0
            row_ids, row_lps = [], []
            for e in range(E):
                others = [t for t in range(1, V) if t != s[j + 1]][e * 3:e * 3 + K - 1]
                good = e == domain
                row_ids.append([s[j + 1]] + others)
                p_t = 0.6 if good else 0.02
                row_lps.append([math.log(p_t)] + [math.log(0.05)] * (K - 1))
            ids.append(row_ids), lps.append(row_lps), tgt.append(s[j + 1]), ctx.append(s[j]), doc.append(d)
        offsets.append(len(tgt))
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)
    return ScoredCorpus(NAMES, t(ids), t(lps, torch.float32), t(tgt), t(ctx), t(doc), offsets, seqs)


def test_gate_learns_to_route_by_context_and_beats_uniform():
    corpus = synthetic_corpus()
    fit = FitArgs(epochs=15, lr=1e-2, patience=20, seed=0)
    args = GateArgs(V, E, 16, 32, 0.0)
    train, val = list(range(45)), list(range(45, 60))
    gate, history = fit_gate(corpus, train, val, args, fit, V, progress=False)
    assert history["best_val_nll"] < history["val_nll"][0] - 0.3
    summary = evaluate(corpus, V, "logits", gate=gate)
    pp = summary["perplexity"]
    assert pp["gate_top2"] < pp["uniform"] and pp["gate_top2"] < min(pp[f"expert:{n}"] for n in NAMES)
    assert summary["gap_recovered"] > 0.5


def test_routing_stats_follow_the_oracle_after_training():
    from gating.model import Gate
    from gating.routing_stats import oracle_share, routing_stats

    corpus = synthetic_corpus()
    args = GateArgs(V, E, 16, 32, 0.0)
    untrained = Gate(args)
    gate, _ = fit_gate(corpus, list(range(45)), list(range(45, 60)), args,
                       FitArgs(epochs=15, lr=1e-2, patience=20, seed=0), V, progress=False)
    held = list(range(45, 60))
    before, after = routing_stats(untrained, corpus, 2, V, held), routing_stats(gate, corpus, 2, V, held)
    for stats in (before, after):
        assert math.isclose(sum(stats["expert_share"].values()), 1.0, abs_tol=1e-3)
    assert after["oracle_weight"] > before["oracle_weight"] + 0.2
    share = oracle_share(corpus, V, held)
    assert math.isclose(sum(share.values()), 1.0, abs_tol=1e-3) and min(share.values()) > 0.1


def test_training_is_reproducible_with_a_seed():
    corpus = synthetic_corpus(n_docs=20)
    fit = FitArgs(epochs=2, seed=3)
    args = GateArgs(V, E, 8, 8, 0.0)
    a, _ = fit_gate(corpus, list(range(15)), list(range(15, 20)), args, fit, V, progress=False)
    b, _ = fit_gate(corpus, list(range(15)), list(range(15, 20)), args, fit, V, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert evaluate_nll(a, corpus, fit, V) == evaluate_nll(b, corpus, fit, V)


def test_doc_router_picks_the_documents_best_expert():
    corpus = synthetic_corpus(n_docs=40)
    router = DocRouter.fit(corpus, V)
    summary = evaluate(corpus, V, "logits", router=router)
    assert summary["perplexity"]["doc_router"] <= min(summary["perplexity"][f"expert:{n}"] for n in NAMES) * 1.05


def test_scored_corpus_roundtrips_through_disk(tmp_path):
    corpus = synthetic_corpus(n_docs=5)
    save_scored(corpus, tmp_path / "c.npz")
    back = load_scored(tmp_path / "c.npz")
    assert back.expert_names == NAMES and back.sequences == corpus.sequences
    assert torch.equal(back.ids, corpus.ids) and torch.equal(back.targets, corpus.targets)


def test_documents_of_a_scored_corpus_keep_their_rows_and_are_renumbered():
    corpus = synthetic_corpus(n_docs=6)
    part = corpus.documents([4, 1])
    assert part.n_docs == 2 and part.sequences == [corpus.sequences[4], corpus.sequences[1]]
    for new, old in enumerate([4, 1]):
        assert torch.equal(part.ids[part.doc_rows(new)], corpus.ids[corpus.doc_rows(old)])
        assert torch.equal(part.context[part.doc_rows(new)], corpus.context[corpus.doc_rows(old)])
        assert (part.doc[part.doc_rows(new)] == new).all()
    assert len(part.targets) == part.doc_offsets[-1] == len(part.doc)
    assert corpus.documents([]).n_docs == 0


def test_pair_shares_count_unordered_top2_pairs():
    from gating.evaluate import pair_shares

    logits = torch.tensor([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 2.0, 3.0], [9.0, 0.0, 1.0]])
    assert pair_shares(logits, NAMES) == {"a+b": 0.5, "a+c": 0.25, "b+c": 0.25}


def test_registry_versions_promotion_and_restore(tmp_path):
    reg = GateRegistry(tmp_path)
    args = GateArgs(V, E, 8, 8)
    from gating.model import Gate
    for promote in (True, False, True):
        ckpt = GateCheckpoint(reg.next_version(), args, Gate(args).state_dict(), NAMES, "fp")
        reg.add(ckpt, promote=promote)
    assert reg.versions() == ["gate-v1", "gate-v2", "gate-v3"] and reg.current() == "gate-v3"
    reg.set_current("gate-v1")
    assert reg.load_current().version == "gate-v1"
    loaded = reg.load_current()
    loaded.check_matches(NAMES, "fp")
    for names, fp in ((["a", "c", "b"], "fp"), (NAMES, "other")):
        try:
            loaded.check_matches(names, fp)
            raise AssertionError("mismatch not detected")
        except GateMismatchError as err:
            assert "gate-v1" in str(err)
    assert [h["event"] for h in reg.history()].count("live") == 3


def test_gate_history_restore_moves_current_and_reports_bad_versions(tmp_path, capsys):
    from gating.model import Gate
    from orchestrator.cli import parse_command

    reg = GateRegistry(tmp_path / "gate")
    args = GateArgs(V, E, 8, 8)
    for _ in range(2):
        reg.add(GateCheckpoint(reg.next_version(), args, Gate(args).state_dict(), NAMES, "fp"), promote=True)
    def run(*argv: str) -> int:
        module, args = parse_command("gate-history", list(argv))
        return module.run(args)

    base = ["--registry", str(tmp_path / "gate"), "--no-swap"]
    assert run(*base, "--restore", "gate-v1") == 0 and reg.current() == "gate-v1"
    assert run(*base, "--restore", "gate-v9") == 2 and reg.current() == "gate-v1"
    assert "unknown gate version 'gate-v9'" in capsys.readouterr().err
    assert run("--registry", str(tmp_path / "gate"), "--json") == 0
