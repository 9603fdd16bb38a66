"""Tokenizer identity of a checkpoint, and the startup check that all experts share one tokenizer.

fingerprint = sha256 over (model type, vocab in id order, merges, special tokens); mixing logprobs across
experts is only meaningful when every expert maps the same ids to the same strings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from experts.protocol import ExpertInfo


class TokenizerMismatchError(ValueError):
    """Two experts do not share one tokenizer; names both."""


def tokenizer_fingerprint(checkpoint_dir: str | Path) -> str:
    """sha256 hex digest of the tokenizer saved in a Hugging Face checkpoint directory."""
    return hashlib.sha256(_canonical_bytes(tokenizer_identity(checkpoint_dir))).hexdigest()


def tokenizer_identity(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The parts of a tokenizer that decide which id means which string."""
    backend = json.loads(_load_backend(Path(checkpoint_dir)).to_str())
    model = backend.get("model", {})
    vocab = model.get("vocab", {})
    # Unigram stores [[piece, score], ...] in id order; BPE/WordPiece store {piece: id}.
    pieces = [p[0] for p in vocab] if isinstance(vocab, list) else [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in backend.get("added_tokens", []))
    return {
        "type": model.get("type"),
        "vocab": pieces,
        # tokenizers >= 0.20 writes merges as [a, b] pairs, older versions as "a b" strings.
        "merges": [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])],
        "added_tokens": added,
        "special_tokens": _special_tokens(Path(checkpoint_dir)),
    }


def check_shared_tokenizer(infos: list[ExpertInfo]) -> str:
    """Raise TokenizerMismatchError naming the first two experts whose tokenizers (or vocab sizes) differ.

    Returns the shared fingerprint.
    """
    if not infos:
        raise ValueError("check_shared_tokenizer needs at least one expert")
    ref = infos[0]
    for other in infos[1:]:
        if other.tokenizer_fingerprint != ref.tokenizer_fingerprint:
            raise TokenizerMismatchError(
                f"experts {ref.name!r} and {other.name!r} do not share one tokenizer "
                f"(fingerprints {ref.tokenizer_fingerprint[:12]}… vs {other.tokenizer_fingerprint[:12]}…; "
                f"checkpoints {ref.model_path} and {other.model_path}); their logprobs cannot be mixed"
            )
        if other.vocab_size != ref.vocab_size:
            raise TokenizerMismatchError(
                f"experts {ref.name!r} and {other.name!r} share a tokenizer but have different logit sizes "
                f"(vocab_size {ref.vocab_size} vs {other.vocab_size})"
            )
    return ref.tokenizer_fingerprint


def _load_backend(path: Path) -> Any:
    """The `tokenizers.Tokenizer` behind a checkpoint: tokenizer.json if present, else via transformers."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer fingerprint: checkpoint directory {path} does not exist")
    # Slow-only checkpoints (vocab.json + merges.txt, or tokenizer.model): convert once via transformers.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not hasattr(tok, "backend_tokenizer"):
        raise ValueError(f"tokenizer fingerprint: no fast tokenizer can be built from {path}")
    return tok.backend_tokenizer


def _special_tokens(path: Path) -> dict[str, str]:
    """Named special tokens (bos/eos/unk/pad...) from tokenizer_config.json / special_tokens_map.json."""
    named: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / fname
        if not f.is_file():
            continue
        for key, value in json.loads(f.read_text()).items():
            if key.endswith("_token") and value is not None:
                named[key] = value["content"] if isinstance(value, dict) else str(value)
    return dict(sorted(named.items()))


def _canonical_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
