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
PEFT picks default target modules by `model_type` from its own tables; importing this module gives `genesis` Llama's
entries there (when PEFT is installed), so `LoraConfig(task_type="CAUSAL_LM")` without `target_modules` works as it
does for a Llama.

This file is copied next to the weights of every saved model for `trust_remote_code=True`, so it imports only
transformers (and its sibling configuration file; PEFT's tables only if PEFT is installed).
"""

import importlib.util

from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .configuration_genesis import GenesisConfig


def register_with_peft(model_type: str = GenesisConfig.model_type) -> None:
    """Give `model_type` Llama's entry in each of PEFT's per-model-type tables (default LoRA/IA3/... target modules),
    which PEFT reads when a config names no `target_modules`. Does nothing when PEFT is not installed; an entry PEFT
    already has is kept."""
    if importlib.util.find_spec("peft") is None:
        return
    from peft.utils import constants

    for name, table in vars(constants).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and "llama" in table:
            table.setdefault(model_type, table["llama"])


class GenesisPreTrainedModel(LlamaPreTrainedModel):
    """Llama's weight init, kernels support flags and `_no_split_modules`, bound to `GenesisConfig`."""

    config_class = GenesisConfig
    config: GenesisConfig


class GenesisModel(GenesisPreTrainedModel, LlamaModel):
    """The decoder stack without the language-model head (`LlamaModel`): returns the final normed hidden states."""


class GenesisForCausalLM(GenesisPreTrainedModel, LlamaForCausalLM):
    """Genesis with a language-model head (`LlamaForCausalLM`), tied to the input embeddings by default."""


register_with_peft()

__all__ = ["GenesisForCausalLM", "GenesisModel", "GenesisPreTrainedModel", "register_with_peft"]
