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
    """ExpertInfo from the checkpoint files alone (config.json, generation_config.json, tokenizer).

    A hub id is downloaded into this node's Hugging Face cache first (vLLM then finds it there); its
    `model_path` stays the hub id, so a gateway on another node loads the tokenizer the same way."""
    path = hub_checkpoint(config.model_path) if config.is_hub_id else require_checkpoint(config.model_path)
    hf = json.loads((path / "config.json").read_text())
    hf_text = hf.get("text_config", hf)  # multimodal wrappers nest the language model's config
    return ExpertInfo(
        name=config.name,
        model_path=config.model_path if config.is_hub_id else str(path),
        vocab_size=int(hf_text["vocab_size"]),
        max_model_len=config.max_model_len,
        tokenizer_fingerprint=tokenizer_fingerprint(path),
        eos_token_id=_eos_id(path, hf_text),
        extra={"dtype": config.dtype, "max_top_k": config.max_top_k,
               "session_capacity": config.session_capacity(), "stepping": "vllm-streaming-input"},
    )


def checkpoint_identity(model_path: str) -> list:
    """What tells one version of a checkpoint directory from another without reading its weights: each file's
    name, size and modification time (a checkpoint rewritten in place, e.g. an expert fine-tuned again under
    the same name, changes them). A hub id, or a path that exists only on other nodes, is its own identity."""
    path = Path(model_path)
    if not path.is_dir():
        return [model_path]
    return [[f.name, st.st_size, st.st_mtime_ns] for f in sorted(path.iterdir())
            if not f.name.startswith(".") and f.is_file() for st in (f.stat(),)]


def require_checkpoint(model_path: str) -> Path:
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expert checkpoint {model_path!r}: no config.json (expected a Hugging Face "
                                "checkpoint directory with config.json, weights and tokenizer files)")
    return path.resolve()


def hub_checkpoint(repo_id: str) -> Path:
    """The local snapshot of Hugging Face hub model `repo_id`, downloaded on first use (config, tokenizer and
    weights: vLLM loads the same snapshot from the cache). Offline, or without the model in the cache, the
    error says what to do instead of a bare connection error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
            f"expert checkpoint {repo_id!r} is a Hugging Face hub id, and this node could not download it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}). Nodes without "
            "network need the checkpoint locally: pre-fetch it into the node's cache (`hf download "
            f"{repo_id}`, same HF_HOME), or copy it to each node and give its directory as model_path. "
            "Private or gated models need HF_TOKEN in the replicas' environment."
        ) from err


def _eos_id(path: Path, hf: dict[str, Any]) -> int | None:
    eos = hf.get("eos_token_id")
    gen = path / "generation_config.json"
    if eos is None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if isinstance(eos, list):  # several stop ids: the first is the canonical end-of-sequence
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None
