"""Stage 1, the model: `GenesisConfig` and `GenesisForCausalLM` (a diff over transformers' Llama classes), the
Genesis -> Llama weight conversion (`convert`) and the one writer of Hugging Face model folders (`folder`).

`configuration_genesis.py` and `modeling_genesis.py` are also the remote code saved next to exported weights, so they
import only torch and transformers.
"""
