"""gating.gate_step (a decode round's compiled gate step) against the torch functions training uses: the same
signals, the same features and memory, the same GRU cell and routing logits, for both kinds of gate."""

import numpy as np
import pytest
import torch

from experts.protocol import TopK
from gating import features, gate_step
from gating.features import Memory
from gating.model import Gate, GateArgs
from gating.runtime import GateRuntime, GateState, Observed

V, E, K, B = 300, 4, 6, 9


def random_observations(seed: int, b: int = B, k: int = K):
    """Rows of two or three selected experts with random top-k (padding where an expert lists fewer), the
    realised token listed by some experts and not by others; a row with nothing observed; memories mid-way."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(b * E)]).view(b, E, k)
    lps = (torch.rand(b, E, k, generator=g) * -8).sort(-1, descending=True).values
    lps[1, 2, 3:] = -1e4                                              # an expert that listed only 3
    ids[1, 2, 3:] = -1
    mask = torch.rand(b, E, generator=g) < 0.6
    mask[0] = False                                                   # nothing observed (no expert answered)
    token = torch.where(torch.rand(b, generator=g) < 0.5, ids[:, 1, 0], torch.randint(0, V, (b,), generator=g))
    memory = Memory(torch.randn(b, E, generator=g) * 0.3, torch.randint(0, 7, (b, E), generator=g).float(),
                    (torch.rand(b, E, generator=g) < 0.5).float())
    return ids, lps, mask, token, memory


@pytest.mark.parametrize("seed", range(4))
def test_signals_and_features_equal_the_torch_functions_training_uses(seed):
    ids, lps, mask, token, memory = random_observations(seed)
    want_feats, want_memory = features.step_features(memory, mask, features.signals(ids, lps, token, V))
    got_feats, *got_memory = gate_step.observed_features(ids.numpy(), lps.numpy(), token.numpy(), V,
                                                         *(m.numpy() for m in memory), mask.numpy())
    assert got_feats.dtype == np.float32 and got_feats.shape == tuple(want_feats.shape)
    assert np.allclose(want_feats.numpy(), got_feats, atol=1e-6, rtol=1e-6)
    for w, g in zip(want_memory, got_memory):
        assert np.allclose(w.numpy(), g, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["tokens", "observed"])
def test_a_round_step_equals_the_torch_gate_step(kind):
    torch.manual_seed(3)
    gate = Gate(GateArgs(V, E, 8, 16, 0.0, features=kind)).eval()
    w = gate_step.StepWeights.of(gate)
    ids, lps, mask, token, before = random_observations(7)
    hidden = torch.randn(B, 16) * 0.5
    feats = None
    if kind == "observed":
        feats, memory = features.step_features(before, mask, features.signals(ids, lps, token, V))
    with torch.inference_mode():
        want_logits, want_hidden = gate.step(token, hidden, feats)
    packed = torch.cat([hidden, *(before if kind == "observed" else ())], 1).numpy()
    cells = np.flatnonzero(mask.numpy())
    args = (cells, ids.numpy().reshape(B * E, K)[cells], lps.numpy().reshape(B * E, K)[cells]) if kind == "observed" else ()
    logits, out = gate_step.step(w, token.numpy(), packed, *args)
    assert out.shape == (B, w.width)
    assert np.allclose(want_logits.numpy(), logits, atol=1e-5)
    assert np.allclose(want_hidden.numpy(), out[:, :16], atol=1e-5)
    if kind == "observed":
        assert np.allclose(torch.cat(list(memory), 1).numpy(), out[:, 16:], atol=1e-6)


def test_observed_top_k_of_unequal_lengths_are_padded_as_the_torch_features_expect():
    """The flat read (all top-k of one length) and the row-by-row read (some shorter) give the same arrays."""
    full = TopK.of((5, 6, 7), (-0.5, -1.0, -2.0))
    short = TopK.of((8,), (-0.1,))
    rows = [{0: full, 2: TopK.of((1, 2, 3), (-0.2, -0.3, -4.0))}, {}, {1: full, 3: short}]
    cells, ids, lps = GateRuntime._observation_arrays(Observed.of(rows), E)
    assert cells.tolist() == [0, 2, 2 * E + 1, 2 * E + 3]
    assert ids[3].tolist() == [8, -1, -1] and lps[3].tolist()[1:] == [-1e4, -1e4]
    assert ids[1].tolist() == [1, 2, 3] and lps.dtype == np.float32 and ids.dtype == np.int64
    same_k = [rows[0], {}, {1: full, 3: TopK.of((8, 9, 10), (-0.1, -3.0, -5.0))}]
    cells2, ids2, lps2 = GateRuntime._observation_arrays(Observed.of(same_k), E)
    assert np.array_equal(cells, cells2) and np.array_equal(ids[:3], ids2[:3])
    assert np.allclose(lps[:3], lps2[:3]) and ids2[3].tolist() == [8, 9, 10]
    nothing = GateRuntime._observation_arrays(Observed.of([{}, {}]), E)
    assert [a.shape[0] for a in nothing] == [0, 0, 0]


@pytest.mark.parametrize("seed", range(3))
def test_observed_rows_step_as_the_padded_torch_features_say(seed):
    """GateRuntime.step's flat read of the observed top-k, padding included, steps as the torch features of the
    same [B, E, K] block do."""
    torch.manual_seed(seed)
    gate = Gate(GateArgs(V, E, 8, 16, 0.0, features="observed")).eval()
    rt = GateRuntime(gate, "v", [f"e{j}" for j in range(E)], 2, "probs")
    ids, lps, mask, token, before = random_observations(seed)
    states = [GateState(np.concatenate([np.zeros(16, np.float32), *(m[r].numpy() for m in before)]), None, 1)
              for r in range(B)]
    per_row = [{j: TopK.of([t for t in ids[r, j].tolist() if t >= 0], lps[r, j, :int((ids[r, j] >= 0).sum())].tolist())
                for j in range(E) if mask[r, j]} for r in range(B)]
    got = rt.step(states, token.tolist(), Observed.of(per_row))
    feats, _ = features.step_features(before, mask, features.signals(ids, lps, token, V))
    with torch.inference_mode():
        want, _ = gate.step(token, torch.zeros(B, 16), feats)
    assert np.allclose(np.stack([g.logits for g in got]), want.numpy(), atol=1e-5)
