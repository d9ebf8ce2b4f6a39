"""Exact conversion between `GenesisForCausalLM` and transformers' `LlamaForCausalLM`.

Genesis uses Llama's module names and its half-split RoPE convention, so the conversion is a config translation plus
a 1:1 state-dict copy: no permutation, no renaming. Parity of logits is tested both ways; that is the guard against
the export mismatch that put the seed project's published evals at chance level.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_genesis import GenesisConfig
from .modeling_genesis import GenesisForCausalLM

# Fields that mean the same thing in both configs and are copied verbatim.
SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)


def genesis_config_to_llama(config: GenesisConfig) -> LlamaConfig:
    """Translate a `GenesisConfig` into the equivalent `LlamaConfig`."""
    values = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    return LlamaConfig(**values, rope_parameters=dict(config.rope_parameters), dtype=config.dtype)


def llama_config_to_genesis(config: LlamaConfig) -> GenesisConfig:
    """Translate a `LlamaConfig` into the equivalent `GenesisConfig`."""
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(
            f"LlamaConfig.pretraining_tp={config.pretraining_tp} is not supported; Genesis computes every "
            "projection as one matmul. Set pretraining_tp=1 (it does not change the weights)."
        )
    values = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    return GenesisConfig(**values, rope_parameters=dict(config.rope_parameters), dtype=config.dtype)


def _copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    state_dict = source.state_dict()
    missing, unexpected = target.load_state_dict(state_dict, strict=False)
    # The tied lm_head may be absent from one side's state dict; anything else is a real mismatch.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"Weight names do not line up: missing {missing}, unexpected {unexpected}.")
    if target.config.tie_word_embeddings:
        target.tie_weights()


@torch.no_grad()
def to_llama(model: GenesisForCausalLM) -> LlamaForCausalLM:
    """Return a `LlamaForCausalLM` with the same config values and a copy of the weights (same dtype and device).

    Args:
        model: a `GenesisForCausalLM`; it is not modified.
    """
    llama = LlamaForCausalLM(genesis_config_to_llama(model.config))
    llama.to(device=model.device, dtype=model.dtype)
    llama.config._attn_implementation = model.config._attn_implementation
    _copy_weights(model, llama)
    return llama.train(model.training)


@torch.no_grad()
def from_llama(model: LlamaForCausalLM) -> GenesisForCausalLM:
    """Return a `GenesisForCausalLM` with the same config values and a copy of the weights (same dtype and device).

    Args:
        model: a `LlamaForCausalLM`; it is not modified.
    """
    genesis = GenesisForCausalLM(llama_config_to_genesis(model.config))
    genesis.to(device=model.device, dtype=model.dtype)
    genesis.config._attn_implementation = model.config._attn_implementation
    _copy_weights(model, genesis)
    return genesis.train(model.training)


__all__ = ["from_llama", "genesis_config_to_llama", "llama_config_to_genesis", "to_llama"]
