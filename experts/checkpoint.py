"""What a Hugging Face checkpoint directory says about an expert, read from its files alone (no engine).

`read_expert_info(config)` is the ExpertInfo the orchestrator validates at startup: vocabulary size, context,
end-of-sequence id and the tokenizer's fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experts.config import ExpertConfig
from experts.protocol import ExpertInfo
from experts.tokenizer_check import tokenizer_fingerprint


def read_expert_info(config: ExpertConfig) -> ExpertInfo:
    """ExpertInfo from the checkpoint files alone (config.json, generation_config.json, tokenizer)."""
    path = require_checkpoint(config.model_path)
    hf = json.loads((path / "config.json").read_text())
    hf_text = hf.get("text_config", hf)  # multimodal wrappers nest the language model's config
    return ExpertInfo(
        name=config.name,
        model_path=str(path),
        vocab_size=int(hf_text["vocab_size"]),
        max_model_len=config.max_model_len,
        tokenizer_fingerprint=tokenizer_fingerprint(path),
        eos_token_id=_eos_id(path, hf_text),
        extra={"dtype": config.dtype, "max_top_k": config.max_top_k,
               "session_capacity": config.session_capacity(), "stepping": "vllm-streaming-input"},
    )


def require_checkpoint(model_path: str) -> Path:
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expert checkpoint {model_path!r}: no config.json (expected a Hugging Face "
                                "checkpoint directory with config.json, weights and tokenizer files)")
    return path.resolve()


def _eos_id(path: Path, hf: dict[str, Any]) -> int | None:
    eos = hf.get("eos_token_id")
    gen = path / "generation_config.json"
    if eos is None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if isinstance(eos, list):  # several stop ids: the first is the canonical end-of-sequence
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None
