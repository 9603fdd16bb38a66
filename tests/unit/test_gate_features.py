"""Observed-features gate: the features are one pure function, and serving computes exactly what training used."""

import math

import numpy as np
import pytest
import torch

from experts.protocol import TopK
from gating.checkpoint import GateCheckpoint
from gating.evaluate import gate_logits_for
from gating.features import FEATURES_PER_EXPERT, Memory, signals, step_features, unobserved_features
from gating.model import Gate, GateArgs
from gating.rollout import corpus_signals, padded_signals, rollout, top_k_rule
from gating.runtime import GateRuntime, Observed
from tests.unit.test_gate_training import NAMES, V, synthetic_corpus

E = len(NAMES)


def observed_gate(seed: int = 0) -> Gate:
    torch.manual_seed(seed)
    return Gate(GateArgs(V, E, 8, 16, 0.0, features="observed")).eval()


def test_features_read_only_the_selected_experts():
    ids = torch.tensor([[[5, 6], [7, 8], [5, 9]]])                    # [1, E, K]
    lps = torch.log(torch.tensor([[[0.5, 0.2], [0.4, 0.1], [0.3, 0.3]]]))
    sig = signals(ids, lps, torch.tensor([5]), V)
    observed = torch.tensor([[True, False, True]])
    feats, memory = step_features(Memory.initial(1, E), observed, sig)
    f = feats.view(1, E, FEATURES_PER_EXPERT)
    assert f[0, 1].tolist()[:5] == [0.0, 0.0, 0.0, 0.0, 0.0]         # expert 1 was not selected: nothing read
    assert f[0, 0, 0] == 1 and math.isclose(float(f[0, 0, 1]), math.log(0.5) / 10, rel_tol=1e-5)
    assert f[0, 0, 2] == 1 and math.isclose(float(f[0, 0, 3]), 0.7, rel_tol=1e-5)
    assert memory.skipped.tolist() == [[0.0, 1.0, 0.0]] and memory.seen.tolist() == [[1.0, 0.0, 1.0]]
    # unselected experts' values may be anything: changing them changes nothing
    lps2 = lps.clone()
    lps2[0, 1] = torch.log(torch.tensor([0.9, 0.05]))
    feats2, _ = step_features(Memory.initial(1, E), observed, signals(ids, lps2, torch.tensor([5]), V))
    assert torch.equal(feats, feats2)


def test_unobserved_features_equal_stepping_token_by_token():
    memory = Memory(torch.rand(2, E), torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 5.0]]), torch.ones(2, E))
    block, after = unobserved_features(memory, 5)
    m = memory
    for i in range(5):
        f, m = step_features(m, torch.zeros(2, E, dtype=torch.bool), None)
        assert torch.allclose(block[:, i], f)
    assert all(torch.equal(a, b) for a, b in zip(after, m))


def test_serving_steps_reproduce_the_training_rollout():
    """Prefill a prompt, then step token by token with only the selected experts' top-k, as the decode loop does:
    the routing logits equal the teacher-forced rollout used by training and `ensemble eval`."""
    corpus = synthetic_corpus(n_docs=3, length=30)
    gate = observed_gate()
    ckpt = GateCheckpoint("gate-v1", gate.args, gate.state_dict(), NAMES, "fp", top_k=2, mix_space="probs")
    rt = GateRuntime.from_checkpoint(ckpt)
    for d in range(corpus.n_docs):
        rows = corpus.doc_rows(d)
        seq = corpus.sequences[d]
        prompt = 7
        sig = corpus_signals(corpus.ids[rows], corpus.lps[rows], corpus.targets[rows], V)
        want = rollout(gate, torch.tensor([seq]), padded_signals(sig, [len(seq) - 1]), top_k_rule(2),
                       torch.tensor([prompt]))[0]
        state = rt.prefill(seq[:prompt])
        got = [torch.from_numpy(state.logits)]
        for j in range(prompt, len(seq) - 1):                        # row j-1 produced token seq[j]
            chosen = torch.from_numpy(state.logits).topk(2).indices.tolist()
            observed = {e: TopK.of(tuple(corpus.ids[rows][j - 1, e].tolist()), tuple(corpus.lps[rows][j - 1, e].tolist()))
                        for e in chosen}                          # the experts that produced seq[j]
            state = rt.step([state], [seq[j]], Observed.of([observed]))[0]
            got.append(torch.from_numpy(state.logits))
        assert torch.allclose(torch.stack(got), want[prompt - 1:len(seq) - 1], atol=1e-5)


def test_sequences_stepped_together_route_as_each_stepped_alone():
    """The decode loop steps every running sequence in one batched gate step and splits the result into
    per-sequence states: each sequence's routing must not depend on which others shared its steps."""
    corpus = synthetic_corpus(n_docs=3, length=30)
    gate = observed_gate(2)
    ckpt = GateCheckpoint("gate-v1", gate.args, gate.state_dict(), NAMES, "fp", top_k=2, mix_space="probs")
    rt = GateRuntime.from_checkpoint(ckpt)
    docs = range(corpus.n_docs)
    prompts = [5, 7, 9]                                              # different lengths: different memories
    alone = [[rt.prefill(corpus.sequences[d][:prompts[d]])] for d in docs]
    together = [rt.prefill(corpus.sequences[d][:prompts[d]]) for d in docs]
    for step in range(12):
        observed, tokens = [], []
        for d in docs:
            rows, j = corpus.doc_rows(d), prompts[d] + step
            chosen = torch.from_numpy(together[d].logits).topk(2).indices.tolist()
            observed.append({e: TopK.of(tuple(corpus.ids[rows][j - 1, e].tolist()),
                                     tuple(corpus.lps[rows][j - 1, e].tolist())) for e in chosen})
            tokens.append(corpus.sequences[d][j])
        together = rt.step(together, tokens, Observed.of(observed))
        for d in docs:
            alone[d].append(rt.step([alone[d][-1]], [tokens[d]], Observed.of([observed[d]]))[0])
            assert np.allclose(together[d].logits, alone[d][-1].logits, atol=1e-6), (step, d)
            h = gate.args.hidden_dim                 # packed: the GRU state, then the feature memory
            assert np.allclose(together[d].packed[:h], alone[d][-1].packed[:h], atol=1e-6), (step, d)
            assert np.array_equal(together[d].packed[h:], alone[d][-1].packed[h:]), (step, d)


@pytest.mark.parametrize("features", ["tokens", "observed"])
def test_prompts_prefilled_together_give_each_prompts_own_state(features):
    """An admission prefills its new prompts in one pass (GateRuntime.prefill_many): each state, and the routing
    it then steps to, must be what that prompt alone gives, whatever the other prompts' lengths."""
    corpus = synthetic_corpus(n_docs=4, length=40)
    torch.manual_seed(3)
    gate = observed_gate(3) if features == "observed" else Gate(GateArgs(V, len(NAMES), 8, 16))
    ckpt = GateCheckpoint("gate-v1", gate.args, gate.state_dict(), NAMES, "fp", top_k=2, mix_space="probs")
    rt = GateRuntime.from_checkpoint(ckpt)
    prompts = [corpus.sequences[d][:n] for d, n in zip(range(4), (3, 17, 1, 29))]
    together, alone = rt.prefill_many(prompts), [rt.prefill(p) for p in prompts]
    h = gate.args.hidden_dim
    for p, t, a in zip(prompts, together, alone):
        assert t.fed == a.fed == len(p)
        assert np.allclose(t.logits, a.logits, atol=1e-6) and np.allclose(t.packed[:h], a.packed[:h], atol=1e-6)
        assert np.array_equal(t.packed[h:], a.packed[h:])               # the feature memory (observed gates)
        nxt = [t.fed % 7 + 4]
        assert np.allclose(rt.step([t], nxt)[0].logits, rt.step([a], nxt)[0].logits, atol=1e-6)
    assert not np.allclose(together[0].logits, together[1].logits)     # the rows are not all one prompt's


def test_echo_scoring_and_offline_evaluation_route_alike():
    corpus = synthetic_corpus(n_docs=4, length=25)
    gate = observed_gate(1)
    ckpt = GateCheckpoint("gate-v1", gate.args, gate.state_dict(), NAMES, "fp", top_k=2, mix_space="probs")
    rt = GateRuntime.from_checkpoint(ckpt)
    offline = gate_logits_for(gate, corpus, k=2)
    for d in range(corpus.n_docs):
        rows = corpus.doc_rows(d)
        echo = rt.sequence_logits(corpus.sequences[d], corpus.ids[rows], corpus.lps[rows])
        assert torch.allclose(echo[:-1], offline[rows], atol=1e-5)


def test_observed_gate_learns_to_route():
    from gating.train import FitArgs, fit_gate

    corpus = synthetic_corpus(n_docs=60, length=40, seed=3)
    fit = FitArgs(epochs=10, lr=1e-2, patience=20, seed=0, space="probs")
    train, val = list(range(45)), list(range(45, 60))
    _, hist = fit_gate(corpus, train, val, GateArgs(V, E, 16, 32, 0.0, features="observed"), fit, V, progress=False)
    assert hist["best_val_nll"] < hist["val_nll"][0] - 0.3


def test_adaptive_echo_routes_like_the_adaptive_evaluation():
    from gating.adaptive import adaptive_k, selection_mask

    corpus = synthetic_corpus(n_docs=2, length=20)
    gate = observed_gate(2)
    rt = GateRuntime.from_checkpoint(GateCheckpoint("gate-v1", gate.args, gate.state_dict(), NAMES, "fp"))
    offline = gate_logits_for(gate, corpus, select=lambda lg: selection_mask(lg, adaptive_k(lg, 0.7)))
    for d in range(corpus.n_docs):
        rows = corpus.doc_rows(d)
        echo = rt.sequence_logits(corpus.sequences[d], corpus.ids[rows], corpus.lps[rows], threshold=0.7)
        assert torch.allclose(echo[:-1], offline[rows], atol=1e-5)


@pytest.mark.parametrize("features", ["tokens", "observed"])
def test_a_gate_step_is_bit_identical_to_the_sequence_forward(features):
    """Gate.step (serving, and the rollout of training) must give exactly what forward gives for the same position."""
    torch.manual_seed(0)
    gate = Gate(GateArgs(V, E, 8, 16, features=features)).eval()
    b, t = 5, 7
    tokens = torch.randint(0, V, (b, t))
    feats = torch.randn(b, t, gate.args.feature_dim) if features == "observed" else None
    with torch.no_grad():
        logits, _ = gate(tokens, None, feats)                                    # [B, T, E]
        state = None
        for j in range(t):
            step_logits, state = gate.step(tokens[:, j], state, None if feats is None else feats[:, j])
            assert torch.equal(step_logits, logits[:, j]), j
        _, last = gate(tokens, None, feats)
        assert torch.equal(state, last[0])
