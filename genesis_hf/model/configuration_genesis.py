"""Genesis model configuration: transformers' `LlamaConfig` under `model_type: genesis`, with presets and checks.

Every field, its meaning and its serialisation are Llama's (`LlamaConfig` is the base class), so a field transformers
adds to Llama reaches Genesis with no change here. What is Genesis's own:
- `model_type = "genesis"` and the Auto-class mapping it drives;
- defaults from the seed project (the 1B shape, tied embeddings, RoPE theta 500,000, RMSNorm eps 1e-5, token id 0
  as bos/eos);
- `from_preset` over `GENESIS_PRESETS`, and size checks whose errors say what to change.

This file is copied next to the weights of every saved Genesis model so that `trust_remote_code=True` works for
users who never install genesis_hf: it imports only transformers.
"""

from transformers.models.llama.configuration_llama import LlamaConfig

# Named architectures. `genesis-1b` is the seed project's Run 2 (1.00B parameters with tied embeddings);
# `genesis-tiny` trains in minutes on a laptop CPU; `debug` is for unit tests.
GENESIS_PRESETS: dict[str, dict] = {
    "genesis-1b": dict(
        vocab_size=49_152,
        hidden_size=1536,
        intermediate_size=4736,
        num_hidden_layers=32,
        num_attention_heads=12,
        num_key_value_heads=6,
        max_position_embeddings=2048,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
    "genesis-tiny": dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
        dtype="float32",
    ),
    "debug": dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
        dtype="float32",
    ),
}

# The sizes every config must give as positive integers (`GenesisConfig` checks them on creation).
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


class GenesisConfig(LlamaConfig):
    r"""
    Configuration of a Genesis decoder-only language model: Llama's architecture (RMSNorm, RoPE, grouped-query
    attention, SwiGLU MLP) and `LlamaConfig`'s fields, with Genesis defaults (tied embeddings, RoPE theta 500,000).

    Args:
        vocab_size (`int`): number of token ids, including any chat tokens appended after training the tokenizer.
        hidden_size (`int`): width of the residual stream.
        intermediate_size (`int`): width of the SwiGLU MLP.
        num_hidden_layers (`int`): number of decoder layers.
        num_attention_heads (`int`): query heads; `hidden_size` must be divisible by it.
        num_key_value_heads (`int`): key/value heads (GQA); must divide `num_attention_heads`.
        max_position_embeddings (`int`): context length the model is trained for.
        rope_parameters (`dict`): RoPE settings in transformers' format, `{"rope_type": "default", "rope_theta": ...}`.
        rms_norm_eps (`float`): epsilon of every RMSNorm.
        initializer_range (`float`): standard deviation of the normal init of linear and embedding weights.
        tie_word_embeddings (`bool`): share `lm_head.weight` with `embed_tokens.weight`.

    ```python
    >>> from genesis_hf import GenesisConfig, GenesisForCausalLM
    >>> config = GenesisConfig.from_preset("debug")
    >>> model = GenesisForCausalLM(config)
    ```
    """

    model_type = "genesis"
    default_theta = 500_000.0

    # Only the defaults that differ from Llama's are restated; every other field is inherited from `LlamaConfig`.
    vocab_size: int = 49_152
    hidden_size: int = 1536
    intermediate_size: int = 4736
    num_hidden_layers: int = 32
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 6
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Before Llama's own checks, so that a wrong size gets an error that says what to change.
        self._validate_sizes()
        super().__post_init__(**kwargs)

    def _validate_sizes(self) -> None:
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GenesisConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"GenesisConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose a head count that divides it "
                f"(for example {_closest_divisor(self.hidden_size, self.num_attention_heads)})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"GenesisConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs a KV head count "
                f"that divides the query heads (for example "
                f"{_closest_divisor(self.num_attention_heads, self.num_key_value_heads)})."
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"GenesisConfig head dimension {self.hidden_size // self.num_attention_heads} "
                f"(hidden_size={self.hidden_size} / num_attention_heads={self.num_attention_heads}) must be even "
                "for rotary embeddings; change hidden_size or num_attention_heads."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GenesisConfig":
        """Build a config from a named preset (`genesis-1b`, `genesis-tiny`, `debug`), with optional overrides.

        Args:
            name: one of `GENESIS_PRESETS`.
            overrides: any config field, e.g. `vocab_size=4100`.
        """
        if name not in GENESIS_PRESETS:
            raise ValueError(
                f"Unknown Genesis preset {name!r}. Available presets: {', '.join(sorted(GENESIS_PRESETS))}."
            )
        return cls(**{**GENESIS_PRESETS[name], **overrides})


def _closest_divisor(number: int, near: int) -> int:
    divisors = [candidate for candidate in range(1, number + 1) if number % candidate == 0]
    return min(divisors, key=lambda candidate: (abs(candidate - near), candidate))


__all__ = ["GENESIS_PRESETS", "GenesisConfig"]
