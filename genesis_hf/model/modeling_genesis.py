"""Genesis: transformers' Llama under its own name.

Genesis is Llama's architecture (RMSNorm, half-split RoPE, grouped-query attention, SwiGLU), so the classes here
subclass `transformers.models.llama.modeling_llama` and add nothing to its computation: the decoder blocks, attention
interface (eager, sdpa, flash attention, flex), KV cache, masks, rotary embedding, loss and `generate()` are
transformers' own, resolved at import time. A change transformers makes to Llama's cache, attention or generation
interface (5.24 renamed the cache argument from `past_key_values` to `cache`) therefore reaches Genesis without a line
of ours; a hand copy of Llama drifted silently when that happened.

What Genesis keeps of its own:
- `GenesisConfig` (configuration_genesis.py): `model_type: genesis`, presets and defaults from the seed project;
- the class names that `model_type: genesis` maps to in the Auto classes and in the remote code (`GenesisModel`,
  `GenesisForCausalLM`); the decoder blocks stay `LlamaDecoderLayer`, the unit of FSDP wrapping and of
  `_no_split_modules`.

Module and parameter names are Llama's, so a Genesis state dict is a `LlamaForCausalLM` state dict (see
`genesis_hf.model.convert`), and PEFT targets, FSDP wrapping and serving engines that know Llama work unchanged.

This file is copied next to the weights of every saved model for `trust_remote_code=True`, so it imports only
transformers (and its sibling configuration file).
"""

from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .configuration_genesis import GenesisConfig


class GenesisPreTrainedModel(LlamaPreTrainedModel):
    """Llama's weight init, kernels support flags and `_no_split_modules`, bound to `GenesisConfig`."""

    config_class = GenesisConfig
    config: GenesisConfig


class GenesisModel(GenesisPreTrainedModel, LlamaModel):
    """The decoder stack without the language-model head (`LlamaModel`): returns the final normed hidden states."""


class GenesisForCausalLM(GenesisPreTrainedModel, LlamaForCausalLM):
    """Genesis with a language-model head (`LlamaForCausalLM`), tied to the input embeddings by default."""


__all__ = ["GenesisForCausalLM", "GenesisModel", "GenesisPreTrainedModel"]
