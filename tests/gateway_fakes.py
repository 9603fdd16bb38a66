"""Unit-test helpers for the HTTP/text layer: tiny real tokenizers and a real engine over in-process experts.

The tokenizers are trained in memory (a byte-level BPE like GPT-2's, and a SentencePiece-style Metaspace
BPE like Llama's/Mixtral's), so stream and gateway tests need no built artifacts. Never for vLLM paths.
"""

from __future__ import annotations

import functools

from tests.fakes import DeterministicExpert

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Solve 12 + 30 = 42 and 7 * 6 = 42; the answer is forty-two.",
    '{"name": "ensemble", "experts": ["code", "prose", "math", "json"], "ok": true}',
    "Héllo wörld — naïve café, 東京 and emoji 🙂 are multi-byte characters.",
    "User: hello\n\nAssistant: hi there, how can I help?\n\nUser: thanks",
] * 4
EXPERT_NAMES = ["code", "prose", "math", "json"]


@functools.cache
def byte_level_tokenizer(vocab_size: int = 400):
    """GPT-2 style byte-level BPE with <s> (id 0, prepended on encode) and </s> (id 1, EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@functools.cache
def metaspace_tokenizer(vocab_size: int = 300):
    """SentencePiece-style BPE (spaces become '▁', dropped at the start of a decode) with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<s>", "</s>", "<unk>", *byte_tokens])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_engine(vocab: int, *, gate=None, max_model_len: int = 256, top_k: int = 2):
    """The real EnsembleEngine over deterministic experts that share the tokenizer's vocabulary."""
    from orchestrator.engine import EnsembleEngine

    experts = {n: DeterministicExpert(n, seed=i, vocab=vocab, max_model_len=max_model_len, eos=1)
               for i, n in enumerate(EXPERT_NAMES)}
    return EnsembleEngine(experts, gate, top_k=top_k, logprobs_k=8)


def random_gate(vocab: int, version: str = "gate-test", seed: int = 0, top_k: int = 2):
    import torch

    from gating.model import Gate, GateArgs
    from gating.runtime import GateRuntime

    torch.manual_seed(seed)
    return GateRuntime(Gate(GateArgs(vocab, len(EXPERT_NAMES), 8, 16)), version, EXPERT_NAMES, top_k, "logits")
