"""genesis_hf: train a small language model from scratch on hardware you own, then align, evaluate and publish it.

Importing the package registers `GenesisConfig`/`GenesisForCausalLM` with transformers' Auto classes, and marks
them so that `save_pretrained` writes an `auto_map` plus the self-contained configuration and modeling files next to
the weights: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` then works without genesis_hf.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .model.configuration_genesis import GENESIS_PRESETS, GenesisConfig
from .model.modeling_genesis import GenesisForCausalLM, GenesisModel, GenesisPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(GenesisConfig.model_type, GenesisConfig, exist_ok=True)
AutoModel.register(GenesisConfig, GenesisModel, exist_ok=True)
AutoModelForCausalLM.register(GenesisConfig, GenesisForCausalLM, exist_ok=True)
GenesisConfig.register_for_auto_class()
GenesisModel.register_for_auto_class("AutoModel")
GenesisForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "GENESIS_PRESETS",
    "GenesisConfig",
    "GenesisForCausalLM",
    "GenesisModel",
    "GenesisPreTrainedModel",
    "__version__",
]
