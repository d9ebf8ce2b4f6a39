"""Decoding for the playground: validated sampling settings, a seeded token loop on transformers' logits processors,
text streamed token by token, and the chat side (ChatML history, `<think>...</think>` folded for display)."""

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from genesis_hf.layout import THINK_END, THINK_START, eos_token_ids
from genesis_hf.playground.sources import PlaygroundError

try:
    # ZeroGPU Spaces: `spaces.GPU` attaches a GPU for the duration of the decorated call. Elsewhere the package is
    # absent (or its decorator is a no-op), and the playground runs on whatever torch sees.
    import spaces
except ImportError:  # pragma: no cover - depends on the machine
    spaces = None


def _identity(function: Callable) -> Callable:
    return function


# Any other folder named `spaces` on the path imports as an empty namespace package: only Hugging Face's has `GPU`.
_gpu = spaces.GPU(duration=120) if hasattr(spaces, "GPU") else _identity

# Limits of one request. The page's sliders stop at these, and API calls beyond them are refused.
MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 4000
MAX_CHAT_MESSAGES = 32
MAX_SEED = 2**32 - 1


def _optional_number(value: Any, kind: type) -> Any:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if not (isinstance(number, float) and not math.isfinite(number)) else None


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings of one request, validated against the playground's limits.

    Args:
        max_new_tokens: tokens to generate at most (1 to `MAX_NEW_TOKENS`; fewer when the context is full).
        temperature: 0 decodes greedily; higher is more random.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: sample among the `top_k` likeliest tokens; 0 disables it.
        repetition_penalty: CTRL's penalty on tokens already present (1 disables it).
        seed: same seed, same settings, same checkpoint: same text.
    """

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int = 0

    @classmethod
    def from_request(
        cls,
        max_new_tokens: Any,
        temperature: Any,
        top_p: Any,
        top_k: Any,
        repetition_penalty: Any,
        seed: Any,
    ) -> "SamplingSettings":
        """Settings from request values (numbers as the page or the API send them), refusing out-of-range ones.

        Raises:
            PlaygroundError: a value is missing, not a number, or out of range; the message names it and the range.
        """
        return cls(
            max_new_tokens=_checked_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS),
            temperature=_checked_float("temperature", temperature, 0.0, 5.0),
            top_p=_checked_float("top_p", top_p, 0.0, 1.0, low_open=True),
            top_k=_checked_int("top_k", top_k, 0, 100_000),
            repetition_penalty=_checked_float("repetition_penalty", repetition_penalty, 0.5, 5.0),
            seed=_checked_int("seed", seed, 0, MAX_SEED),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _checked_float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    number = _optional_number(value, float)
    if number is None or number > high or number < low or (low_open and number == low):
        bracket = "(" if low_open else "["
        raise PlaygroundError(f"{name}={value!r} is out of range: pass a number in {bracket}{low:g}, {high:g}].")
    return number


def _checked_int(name: str, value: Any, low: int, high: int) -> int:
    number = _optional_number(value, float)
    if number is None or number != int(number) or not low <= number <= high:
        raise PlaygroundError(f"{name}={value!r} is out of range: pass a whole number from {low} to {high:,}.")
    return int(number)


def check_prompt(prompt: Any, what: str = "prompt") -> str:
    """`prompt` if it is a string of at most `MAX_PROMPT_CHARS` characters.

    Raises:
        PlaygroundError: it is not text, or too long (the message gives its length and the limit).
    """
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise PlaygroundError(f"The {what} must be text, not {type(prompt).__name__}.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PlaygroundError(
            f"The {what} is {len(prompt):,} characters; the playground takes at most {MAX_PROMPT_CHARS:,}. Shorten it."
        )
    return prompt


def _logits_processors(settings: SamplingSettings) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if not settings.greedy:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword that `model.forward` takes its KV cache by: `cache` (transformers >= 5.24) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@_gpu
@torch.inference_mode()
def decode_tokens(
    model: PreTrainedModel,
    input_ids: list[int],
    settings: SamplingSettings,
    max_new_tokens: int,
    stop_ids: frozenset[int],
) -> Iterator[int]:
    """Yield sampled token ids one at a time (a stop id ends the loop and is not yielded).

    A hand-written loop rather than `generate(streamer=...)` in a thread: sampling draws from a `torch.Generator`
    seeded per request, so two requests running at once cannot disturb each other's random stream, and the same seed
    gives the same text whatever else the server is doing. The logits processors are transformers' own.

    Args:
        model: a causal LM in eval mode.
        input_ids: the prompt's token ids (at least one).
        settings: the validated decoding settings.
        max_new_tokens: tokens to generate at most (already fitted to the context).
        stop_ids: ids that end generation (eos, `<|im_end|>`).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    processors = _logits_processors(settings)
    # (1, seq): the prompt, then every sampled token (the repetition penalty looks at all of them).
    all_ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    next_input = all_ids
    # The cache is filled in place; its keyword is the model's own (`cache` from transformers 5.24, before that
    # `past_key_values`), so the loop follows whichever transformers is installed.
    cache_argument = {cache_keyword(model): DynamicCache(config=model.config)}
    for _ in range(max_new_tokens):
        outputs = model(input_ids=next_input, use_cache=True, logits_to_keep=1, **cache_argument)
        # (1, vocab) in fp32: bf16 logits would make top-p and the sampling coarser than the model is.
        scores = processors(all_ids, outputs.logits[:, -1, :].float())
        if settings.greedy:
            next_token = scores.argmax(dim=-1, keepdim=True)
        else:
            next_token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)
        token_id = int(next_token)
        if token_id in stop_ids:
            return
        yield token_id
        all_ids = torch.cat([all_ids, next_token], dim=-1)
        next_input = next_token


class TextStream:
    """Iterating yields the text generated so far after each token; afterwards `text`, `num_tokens`, `seconds` and
    `stop_reason` (`"stop"`: an end token, `"length"`: `max_new_tokens`, `"context"`: the model's context) are set.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        input_ids: list[int],
        settings: SamplingSettings,
        max_new_tokens: int,
        requested_new_tokens: int,
    ) -> None:
        self.model, self.tokenizer, self.input_ids, self.settings = model, tokenizer, input_ids, settings
        self.max_new_tokens, self.requested_new_tokens = max_new_tokens, requested_new_tokens
        self.text, self.num_tokens, self.seconds, self.stop_reason = "", 0, 0.0, None
        self.stop_ids = frozenset(eos_token_ids(tokenizer))

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        token_ids: list[int] = []
        for token_id in decode_tokens(self.model, self.input_ids, self.settings, self.max_new_tokens, self.stop_ids):
            token_ids.append(token_id)
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            self.num_tokens, self.seconds = len(token_ids), time.perf_counter() - started
            # A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives.
            if not text.endswith("\ufffd"):
                self.text = text
                yield text
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        self.num_tokens, self.seconds = len(token_ids), time.perf_counter() - started
        if len(token_ids) < self.max_new_tokens:
            self.stop_reason = "stop"
        else:
            self.stop_reason = "context" if self.max_new_tokens < self.requested_new_tokens else "length"
        yield self.text

    def summary(self) -> str:
        """`42 tokens in 1.3 s (32.3 tokens/s)`, plus why generation stopped when it was the context."""
        rate = self.num_tokens / self.seconds if self.seconds > 0 else 0.0
        summary = f"{self.num_tokens} tokens in {self.seconds:.2f} s ({rate:.1f} tokens/s)"
        if self.stop_reason == "context":
            summary += f"; stopped at the model's context of {self.context_length} tokens"
        return summary

    @property
    def context_length(self) -> int:
        return len(self.input_ids) + self.max_new_tokens


def split_thinking(text: str) -> tuple[str | None, str, bool]:
    """Split a reply into `(thinking, answer, thinking_done)`.

    `"<think>plan</think>Hi"` -> `("plan", "Hi", True)`; a reply still inside `<think>` (streaming) ->
    `("pla", "", False)`; a reply without `<think>` -> `(None, text, True)`.
    """
    stripped = text.lstrip()
    if not stripped.startswith(THINK_START):
        return None, text, True
    inner = stripped[len(THINK_START) :]
    if THINK_END not in inner:
        return inner.strip(), "", False
    thinking, answer = inner.split(THINK_END, 1)
    return thinking.strip(), answer.lstrip(), True


def chat_display_messages(reply: str, seconds: float | None = None) -> list[dict]:
    """The Chatbot messages of one assistant reply: the thinking as a folded "Thinking" message, then the answer."""
    thinking, answer, done = split_thinking(reply)
    messages = []
    if thinking is not None:
        metadata = {"title": "Thinking", "status": "done" if done else "pending"}
        if done and seconds is not None:
            metadata["duration"] = round(seconds, 2)
        messages.append({"role": "assistant", "content": thinking or "(empty)", "metadata": metadata})
    if answer or thinking is None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or Gradio's list of parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(_message_text(part) for part in content)
    return ""


def normalize_history(history: Any) -> list[dict]:
    """`[{"role", "content"}]` of the user and assistant turns of `history` (a Chatbot value or an API list).

    Thinking messages (Chatbot messages with a metadata title) are dropped: earlier reasoning is not fed back to the
    model, as reasoning models are trained. Consecutive assistant messages (a reply split for display) are merged.

    Raises:
        PlaygroundError: `history` is not a list of messages, or is longer than `MAX_CHAT_MESSAGES`.
    """
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(message, dict) for message in history):
        raise PlaygroundError('history must be a list of {"role": "user" | "assistant", "content": "..."} messages.')
    turns: list[dict] = []
    for message in history:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        if (message.get("metadata") or {}).get("title"):
            continue
        text = _message_text(message.get("content"))
        if turns and turns[-1]["role"] == role == "assistant":
            turns[-1]["content"] += text
        else:
            turns.append({"role": role, "content": text})
    if len(turns) > MAX_CHAT_MESSAGES:
        raise PlaygroundError(
            f"The conversation has {len(turns)} messages; the playground keeps at most {MAX_CHAT_MESSAGES}. "
            "Clear the chat to start over."
        )
    return turns
