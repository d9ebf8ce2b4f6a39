"""Sizes of a Genesis (or any Llama-style) config, computed without building the model: parameter counts and the
attention widths. Used by the model card (`card`), FLOPs/MFU (`genesis_hf.pretrain.flops`) and memory planning
(`genesis_hf.pretrain.plan`).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a Genesis config, computed from its sizes without building the model.

    Args:
        embedding: input embedding table (vocab x hidden).
        lm_head: separate output projection; 0 when tied to the embedding.
        per_layer: one decoder layer, including its two RMSNorm weights.
        per_layer_matmul: one decoder layer's matmul weights (and biases), i.e. without the norms.
        final_norm: the final RMSNorm.
        total: every parameter of `GenesisForCausalLM` (tied weights counted once).
        matmul: weights that take part in a matmul per token: all layers' projections plus vocab x hidden for the
            output projection (counted even when tied).
    """

    embedding: int
    lm_head: int
    per_layer: int
    per_layer_matmul: int
    final_norm: int
    total: int
    matmul: int


def attention_widths(config) -> tuple[int, int]:
    """`(query_width, key_value_width)`: the output widths of `q_proj` (heads x head_dim) and of `k_proj`/`v_proj`
    (key/value heads x head_dim, narrower under GQA).

    Args:
        config: a `GenesisConfig` (or any Llama-style config with the same fields).
    """
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim


def parameter_counts(config) -> ParameterCounts:
    """Count the parameters of a `GenesisConfig` (or any Llama-style config with the same fields) analytically.

    Args:
        config: a `GenesisConfig`.
    """
    hidden = config.hidden_size
    query_width, key_value_width = attention_widths(config)
    attention = hidden * query_width + 2 * hidden * key_value_width + query_width * hidden
    if getattr(config, "attention_bias", False):
        attention += query_width + 2 * key_value_width + hidden
    mlp = 3 * hidden * config.intermediate_size
    if getattr(config, "mlp_bias", False):
        mlp += 2 * config.intermediate_size + hidden
    per_layer_matmul = attention + mlp
    per_layer = per_layer_matmul + 2 * hidden
    embedding = config.vocab_size * hidden
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    layers = config.num_hidden_layers * per_layer
    return ParameterCounts(
        embedding=embedding,
        lm_head=lm_head,
        per_layer=per_layer,
        per_layer_matmul=per_layer_matmul,
        final_norm=hidden,
        total=embedding + lm_head + layers + hidden,
        matmul=config.num_hidden_layers * per_layer_matmul + config.vocab_size * hidden,
    )


__all__ = ["ParameterCounts", "attention_widths", "parameter_counts"]
