"""The playground's logic, without Gradio: everything the page and the named API do (list, describe and load the
checkpoints of one `CheckpointSource`, stream generations and chat replies from them)."""

import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from genesis_hf.model.sizes import parameter_counts
from genesis_hf.playground.generation import SamplingSettings, TextStream, check_prompt, normalize_history
from genesis_hf.playground.sources import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_CONCURRENCY,
    CheckpointSource,
    ModelCache,
    PlaygroundError,
    format_count,
    public_fields,
)
from genesis_hf.publish.listing import CheckpointEntry

logger = logging.getLogger(__name__)

LOSS_SERIES, SELECTED_SERIES = "training loss", "selected checkpoint"
_KIND_DESCRIPTIONS = {
    "training": "training checkpoint (DCP shards)",
    "hf": "exported model folder",
    "hub": "Hub revision",
}


def default_device() -> tuple[str, torch.dtype]:
    """`("cuda", bfloat16)` with a GPU (ZeroGPU included), else `("cpu", float32)`."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


class Playground:
    """The app's logic: lists, describes and loads checkpoints of one `CheckpointSource` and generates from them.

    Args:
        source: the run or repo to browse.
        cache_size: models kept loaded.
        concurrency: requests that may run a model at once (the Gradio queue's limit).
        device: where models run; default `default_device()`.
        dtype: their dtype; default bf16 on GPU, fp32 on CPU.
    """

    def __init__(
        self,
        source: CheckpointSource,
        cache_size: int = DEFAULT_CACHE_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        default_device_name, default_dtype = default_device()
        self.source = source
        self.cache = ModelCache(cache_size)
        self.concurrency = concurrency
        self.device = device or default_device_name
        self.dtype = dtype or (default_dtype if self.device == default_device_name else torch.float32)
        self._facts: dict[CheckpointEntry, dict] = {}

    # Listing and facts ------------------------------------------------------------------------------------------------

    def list_checkpoints(self, refresh: bool = False) -> list[dict]:
        """`name, step, tokens_seen, loss, revision` of each checkpoint, oldest first."""
        return [public_fields(checkpoint) for checkpoint in self.source.list_checkpoints(refresh=refresh)]

    def _cache_key(self, checkpoint: CheckpointEntry) -> str:
        # With the step: a Hub `main` that moved on to a newer checkpoint is loaded again.
        return f"{self.source.location(checkpoint)} step {checkpoint.step}"

    def is_loaded(self, name: str) -> bool:
        """Whether the checkpoint called `name` is in the model cache (refused unless listed)."""
        return self._cache_key(self.source.resolve(name)) in self.cache

    def model(self, name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The loaded model and tokenizer of the checkpoint called `name` (refused unless listed)."""
        checkpoint = self.source.resolve(name)
        cache_key = self._cache_key(checkpoint)

        def load() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
            logger.info("Loading checkpoint %s on %s in %s", checkpoint.name, self.device, self.dtype)
            try:
                return self.source.load(checkpoint, self.device, self.dtype)
            except Exception as error:
                logger.exception("Loading checkpoint %s failed", checkpoint.name)
                raise PlaygroundError(
                    f"Checkpoint {checkpoint.name} could not be loaded ({type(error).__name__}); the server log has "
                    "the details."
                ) from error

        return self.cache.get(cache_key, load)

    def facts(self, name: str) -> dict:
        """Parameters, context length, shape and revision of a checkpoint, from its config only (no weights)."""
        checkpoint = self.source.resolve(name)
        # Keyed by the whole entry: a Hub `main` that moved on to a newer step is a different checkpoint.
        if checkpoint not in self._facts:
            config = self.source.load_config(checkpoint)
            parameters = parameter_counts(config).total
            self._facts[checkpoint] = {
                **public_fields(checkpoint),
                "revision": checkpoint.revision or self.source.location(checkpoint),
                "kind": checkpoint.kind,
                "parameters": parameters,
                "context_length": getattr(config, "max_position_embeddings", None),
                "layers": getattr(config, "num_hidden_layers", None),
                "hidden_size": getattr(config, "hidden_size", None),
                "vocab_size": getattr(config, "vocab_size", None),
                "model_type": getattr(config, "model_type", None),
            }
        return dict(self._facts[checkpoint])

    def facts_markdown(self, name: str) -> str:
        facts = self.facts(name)
        rows = [
            ("checkpoint", f"`{facts['name']}`"),
            ("revision", f"`{facts['revision']}`"),
            ("format", _KIND_DESCRIPTIONS.get(facts["kind"], facts["kind"])),
            ("step", f"{facts['step']:,}"),
            ("tokens seen", format_count(facts["tokens_seen"]) if facts["tokens_seen"] is not None else "unknown"),
            ("loss", f"{facts['loss']:.4f}" if facts["loss"] is not None else "unknown"),
            ("parameters", f"{facts['parameters']:,} ({format_count(facts['parameters'])})"),
            ("context", f"{facts['context_length']:,} tokens" if facts["context_length"] else "unknown"),
            ("shape", f"{facts['layers']} layers × {facts['hidden_size']} hidden, vocab {facts['vocab_size']}"),
            ("runs on", f"{self.device} ({str(self.dtype).removeprefix('torch.')})"),
        ]
        header, *body = rows
        return f"| {header[0]} | {header[1]} |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in body)

    def loss_curve(self, selected: str | None = None) -> list[dict]:
        """Points `{"step", "loss", "series"}` of the training loss, plus a vertical line at the selected checkpoint."""
        points = [{**point, "series": LOSS_SERIES} for point in self.source.metrics()]
        checkpoint = None
        if selected:
            try:
                checkpoint = self.source.resolve(selected)
            except PlaygroundError:
                checkpoint = None
        if checkpoint is not None and points:
            losses = [point["loss"] for point in points]
            # One fixed name: the page's plot keeps the color scale of its first value, so a new name would vanish.
            series = SELECTED_SERIES
            points += [
                {"step": checkpoint.step, "loss": min(losses), "series": series},
                {"step": checkpoint.step, "loss": max(losses), "series": series},
            ]
        return points

    # Generation -------------------------------------------------------------------------------------------------------

    def _stream(self, name: str, loaded, input_ids: list[int], settings: SamplingSettings, what: str) -> TextStream:
        """`loaded` is `self.model(name)`, looked up once by the caller (the cache may evict it between lookups)."""
        model, tokenizer = loaded
        context = _context_length(model)
        if not input_ids:
            # An empty prompt starts a new document, which is how pretraining data begins after a separator.
            input_ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
        if len(input_ids) >= context:
            raise PlaygroundError(
                f"The {what} is {len(input_ids):,} tokens; checkpoint {name}'s context is {context:,} tokens, which "
                "leaves no room to generate. Shorten it."
            )
        max_new_tokens = min(settings.max_new_tokens, context - len(input_ids))
        return TextStream(model, tokenizer, input_ids, settings, max_new_tokens, settings.max_new_tokens)

    def generate_stream(self, name: str, prompt: str, settings: SamplingSettings) -> TextStream:
        """A `TextStream` continuing `prompt` with the checkpoint called `name`."""
        prompt = check_prompt(prompt)
        model, tokenizer = self.model(name)
        input_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._stream(name, (model, tokenizer), input_ids, settings, "prompt")

    def compare_stream(
        self, name_a: str, name_b: str, prompt: str, settings: SamplingSettings
    ) -> Iterator[tuple[str, str]]:
        """Yield `(text_a, text_b)` as the same prompt, settings and seed run through two checkpoints, A then B."""
        # Both names are checked before any work, so a bad second name fails at once.
        self.source.resolve(name_a)
        self.source.resolve(name_b)
        text_a = ""
        for text_a in self.generate_stream(name_a, prompt, settings):
            yield text_a, ""
        for text_b in self.generate_stream(name_b, prompt, settings):
            yield text_a, text_b

    def chat_stream(
        self, name: str, message: str, history: Any, system_prompt: str, settings: SamplingSettings
    ) -> TextStream:
        """A `TextStream` of the assistant's reply to `message` after `history`, through the ChatML template.

        The oldest turns are dropped when the conversation does not fit the context with room for the reply.
        """
        message = check_prompt(message, "message")
        system_prompt = check_prompt(system_prompt, "system prompt")
        if not message.strip():
            raise PlaygroundError("The message is empty: type something to send.")
        turns = normalize_history(history) + [{"role": "user", "content": message}]
        model, tokenizer = self.model(name)
        if not getattr(tokenizer, "chat_template", None):
            raise PlaygroundError(
                f"Checkpoint {name} has no chat template: it is a base model. Use the Generate tab, or pick a "
                "checkpoint fine-tuned for chat."
            )
        context = _context_length(model)
        system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        while True:
            input_ids = tokenizer.apply_chat_template(
                system + turns, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            # Room for a useful reply: a quarter of the context or the requested length, whichever is smaller.
            if len(input_ids) + min(settings.max_new_tokens, context // 4) <= context or len(turns) == 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]
        return self._stream(name, (model, tokenizer), list(input_ids), settings, "conversation")


def _context_length(model) -> int:
    """Tokens the model attends over (prompt and reply together); unbounded when its config does not say."""
    return getattr(model.config, "max_position_embeddings", None) or 10**9
