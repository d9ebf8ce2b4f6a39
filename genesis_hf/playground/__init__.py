"""The playground: a Gradio app to browse a run's checkpoints and talk to them, locally or as a Hugging Face Space.

Modules, in the order they build on each other: `sources` (the run or repo, its checkpoints by name, the model
cache), `generation` (sampling settings, the seeded decoding loop, chat history and `<think>` folding), `service`
(`Playground`: what the page and the API do, without Gradio), `api` (the named endpoints for `gradio_client`) and
`app` (the page, `launch_app`, the Space's entry points and `genesis-hf playground`). Publishing the playground as a
Space is `genesis_hf.publish.space`.
"""

from genesis_hf.playground.app import (
    DEFAULT_PROMPT,
    build_app,
    launch_app,
    load_space_config,
    playground_from_config,
)
from genesis_hf.playground.generation import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    SamplingSettings,
    chat_display_messages,
    decode_tokens,
    normalize_history,
    split_thinking,
)
from genesis_hf.playground.service import Playground
from genesis_hf.playground.sources import CheckpointSource, ModelCache, PlaygroundError, checkpoint_label

__all__ = [
    "DEFAULT_PROMPT",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_CHARS",
    "CheckpointSource",
    "ModelCache",
    "Playground",
    "PlaygroundError",
    "SamplingSettings",
    "build_app",
    "chat_display_messages",
    "checkpoint_label",
    "decode_tokens",
    "launch_app",
    "load_space_config",
    "normalize_history",
    "playground_from_config",
    "split_thinking",
]
