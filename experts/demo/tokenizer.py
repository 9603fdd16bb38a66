"""The one byte-level BPE tokenizer all demo experts share: trained with `tokenizers`, saved for transformers.

Encoding with add_special_tokens=True prepends `<s>` (as real Mixtral tokenizers do); decode(encode(t)) == t.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIALS = [UNK, BOS, EOS, PAD]  # ids 0..3, the Mixtral/Llama convention for unk, bos, eos
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Byte-level BPE over `texts`; no normalisation, so every byte sequence round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # trim_offsets=False keeps offsets byte-exact; the template adds <s> exactly once per sequence
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def save_tokenizer(tok, out_dir: Path, model_max_length: int = 1024) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json via PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Every model directory carries the identical tokenizer files (the service checks they match)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
