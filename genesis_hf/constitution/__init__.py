"""Constitutional AI on hardware you own: critique-and-revise data for SFT and DPO, and an engagement benchmark.

Stage order: model, tokenizer, data, pretrain, posttrain, **constitution**, evaluate, publish, playground. This stage
uses the model and tokenizer stages (to load a model) and nothing later.

- `principles`: the constitution YAML (packaged `constitution.yaml`, or your own) and its checks.
- `prompts`: prompt sets (`genesis_hf:prompts`, `genesis_hf:engagement`, your .jsonl/.txt).
- `backends`: a transformers model in this process (batched) or an OpenAI-compatible endpoint (`--base_url`).
- `pipeline`: answer, critique, revise; resumable rows. `pairs`: SFT examples and guarded DPO pairs.
- `flags` and `engagement`: the engagement benchmark.
- `harmbench`: a HarmBench-style attack success rate from local behaviours and a local classifier.
"""

from .backends import BackendError, GenerationSettings, OpenAIBackend, TransformersBackend
from .flags import engagement_flags
from .principles import Constitution, ConstitutionError, load_constitution
from .prompts import Prompt, PromptsError, load_prompts

__all__ = [
    "BackendError",
    "Constitution",
    "ConstitutionError",
    "GenerationSettings",
    "OpenAIBackend",
    "Prompt",
    "PromptsError",
    "TransformersBackend",
    "engagement_flags",
    "load_constitution",
    "load_prompts",
]
