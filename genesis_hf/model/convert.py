"""Exact conversion between `GenesisForCausalLM` and transformers' `LlamaForCausalLM`.

Genesis is Llama's architecture under its own `model_type` (`GenesisConfig` subclasses `LlamaConfig`, the model classes
subclass Llama's), so the conversion is a config copy plus a 1:1 state-dict copy: no permutation, no renaming. Parity of logits is tested both ways; that is the guard against
the export mismatch that put the seed project's published evals at chance level.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_genesis import GenesisConfig
from .modeling_genesis import GenesisForCausalLM

# What says which class a config is for; every other value is a `LlamaConfig` field and is copied as it is, so a
# field transformers adds to Llama is carried over with no change here.
_CLASS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


def _llama_values(config) -> dict:
    values = config.to_dict()
    for key in _CLASS_KEYS:
        values.pop(key, None)
    return values


def genesis_config_to_llama(config: GenesisConfig) -> LlamaConfig:
    """Translate a `GenesisConfig` into the equivalent `LlamaConfig` (same field values, no remote-code map)."""
    return LlamaConfig(**_llama_values(config))


def llama_config_to_genesis(config: LlamaConfig) -> GenesisConfig:
    """Translate a `LlamaConfig` into the equivalent `GenesisConfig`."""
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(
            f"LlamaConfig.pretraining_tp={config.pretraining_tp} is not supported; Genesis computes every "
            "projection as one matmul. Set pretraining_tp=1 (it does not change the weights)."
        )
    return GenesisConfig(**_llama_values(config))


def _copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    state_dict = source.state_dict()
    missing, unexpected = target.load_state_dict(state_dict, strict=False)
    # The tied lm_head may be absent from one side's state dict; anything else is a real mismatch.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"Weight names do not line up: missing {missing}, unexpected {unexpected}.")
    if target.config.tie_word_embeddings:
        target.tie_weights()


def _converted(model: torch.nn.Module, target_class: type, config) -> torch.nn.Module:
    """A `target_class` model of `config` holding a copy of `model`'s weights, on its device, dtype, attention
    implementation and train/eval mode."""
    target = target_class(config)
    target.to(device=model.device, dtype=model.dtype)
    target.config._attn_implementation = model.config._attn_implementation
    _copy_weights(model, target)
    return target.train(model.training)


@torch.no_grad()
def to_llama(model: GenesisForCausalLM) -> LlamaForCausalLM:
    """Return a `LlamaForCausalLM` with the same config values and a copy of the weights (same dtype and device).

    Args:
        model: a `GenesisForCausalLM`; it is not modified.
    """
    return _converted(model, LlamaForCausalLM, genesis_config_to_llama(model.config))


@torch.no_grad()
def from_llama(model: LlamaForCausalLM) -> GenesisForCausalLM:
    """Return a `GenesisForCausalLM` with the same config values and a copy of the weights (same dtype and device).

    Args:
        model: a `LlamaForCausalLM`; it is not modified.
    """
    return _converted(model, GenesisForCausalLM, llama_config_to_genesis(model.config))


__all__ = ["from_llama", "genesis_config_to_llama", "llama_config_to_genesis", "to_llama"]
