"""The playground: a Gradio app to browse a run's checkpoints and talk to them, locally or as a Hugging Face Space.

It shows the checkpoints of one training run (a local run directory) or one Hub model repo (step branches such as
`step-0000200`), their loss curve with the selected checkpoint marked, model facts, and lets you sample from a
checkpoint (streamed token by token), compare two checkpoints on the same prompt and seed, and chat with chat models
(ChatML, `<think>...</think>` folded).

```bash
genesis-hf playground --runs outputs/pretrain            # http://127.0.0.1:7860
genesis-hf playground --repo you/genesis-1b --port 7861
genesis-hf playground deploy --space you/genesis-playground --repo you/genesis-1b
```

Named API endpoints (for `gradio_client`):

- `/list_checkpoints() -> list[dict]`: `name, step, tokens_seen, loss, revision` of every checkpoint.
- `/generate(checkpoint, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> str`
- `/compare(checkpoint_a, checkpoint_b, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
  -> (str, str)`
- `/chat(checkpoint, message, system_prompt, history, max_new_tokens, temperature, top_p, top_k,
  repetition_penalty, seed) -> str` (the raw reply, `<think>...</think>` included; `history` is a list of
  `{"role", "content"}` dicts)

Safety: a request names a checkpoint, which is looked up in the listing of the configured run or repo; paths, URLs and
unknown names are refused. Prompts and outputs are bounded, errors reach the page as messages (never tracebacks), and
the Hub token is read on the server only (`HF_TOKEN` or the cached login), never sent to the page or uploaded.
"""

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import genesis_hf  # noqa: F401 - registers GenesisConfig/GenesisForCausalLM with the Auto classes
from genesis_hf.publish.listing import CheckpointEntry, CheckpointsError, list_run_checkpoints

if TYPE_CHECKING:
    # Imported where used: `genesis-hf --help` imports every subcommand's module and should not pay for Gradio.
    import gradio as gr
    import pandas as pd

try:
    # ZeroGPU Spaces: `spaces.GPU` attaches a GPU for the duration of the decorated call. Elsewhere the package is
    # absent (or its decorator is a no-op), and the playground runs on whatever torch sees.
    import spaces
except ImportError:  # pragma: no cover - depends on the machine
    spaces = None


def _identity(function: Callable) -> Callable:
    return function


# A source checkout's own `spaces/` folder imports as an empty namespace package: only Hugging Face's has `GPU`.
_gpu = spaces.GPU(duration=120) if hasattr(spaces, "GPU") else _identity


logger = logging.getLogger(__name__)

# Limits of one request. The page's sliders stop at these, and API calls beyond them are refused.
MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 4000
MAX_CHAT_MESSAGES = 32
MAX_SEED = 2**32 - 1
# Models kept in memory (least recently used evicted first) and requests that may run a model at the same time.
DEFAULT_CACHE_SIZE = 2
DEFAULT_CONCURRENCY = 2
# How long a listing is reused before the run or repo is read again (a live run keeps adding checkpoints).
LISTING_TTL_SECONDS = 30.0
# Points drawn in the loss curve; longer metrics files are thinned evenly.
MAX_CURVE_POINTS = 2000
# The file `deploy` writes next to the Space's app.py, telling it what to browse.
SPACE_CONFIG_FILE = "playground.json"
SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "playground"
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LOSS_SERIES, SELECTED_SERIES = "training loss", "selected checkpoint"
_KIND_DESCRIPTIONS = {
    "training": "training checkpoint (DCP shards)",
    "hf": "exported model folder",
    "hub": "Hub revision",
}
CHAT_END_TOKEN = "<|im_end|>"

METRICS_FILE = "metrics.jsonl"
# Anything that looks like a location rather than a checkpoint name; used only to word the refusal, since the lookup
# by exact name is what enforces the rule.
_PATH_LIKE = re.compile(r"[/\\]|\.\.|^~|^[A-Za-z][A-Za-z0-9+.-]*:")


# The first screen's prompt: one press of Generate shows what the newest checkpoint writes. A bare word, not "The "
# with a space: byte-level BPE puts the space in front of the next word, so a trailing space is a rare token.
DEFAULT_PROMPT = "The"


class PlaygroundError(ValueError):
    """A request the playground refuses or cannot serve; the message is shown to the user as is."""


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: listing, lookup by name, loading


def checkpoint_label(checkpoint: CheckpointEntry) -> str:
    """`step-0000200 · step 200 · 1.6M tokens · loss 3.214`: the picker's text for a checkpoint."""
    parts = [checkpoint.name, f"step {checkpoint.step:,}"]
    if checkpoint.tokens_seen is not None:
        parts.append(f"{format_count(checkpoint.tokens_seen)} tokens")
    if checkpoint.loss is not None:
        parts.append(f"loss {checkpoint.loss:.3f}")
    return " · ".join(parts)


def public_fields(checkpoint: CheckpointEntry) -> dict[str, Any]:
    """What `/list_checkpoints` returns of a checkpoint: no server paths."""
    return {
        "name": checkpoint.name,
        "step": checkpoint.step,
        "tokens_seen": checkpoint.tokens_seen,
        "loss": checkpoint.loss,
        "revision": checkpoint.revision,
    }


def format_count(count: int) -> str:
    """`1234` -> `1.23K`, `1_600_000` -> `1.6M`, `21_760` -> `21.8K`."""
    for threshold, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return str(count)


def _optional_number(value: Any, kind: type) -> Any:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if not (isinstance(number, float) and not math.isfinite(number)) else None


def _thin(points: list[dict], max_points: int) -> list[dict]:
    if len(points) <= max_points:
        return points
    stride = math.ceil(len(points) / max_points)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


class CheckpointSource:
    """The one run directory or Hub repo the playground may load checkpoints from.

    Listing is `genesis_hf.publish.listing.list_run_checkpoints`: a local run's training checkpoints
    (`checkpoints/step-XXXXXXX/`, DCP shards, loaded with `genesis_hf.pretrain.checkpoint.load_model_from_checkpoint`)
    and exported model folders (`final/`, `hub_exports/step-XXXXXXX/`), or a repo's `step-XXXXXXX` branches and `main`
    (loaded with `from_pretrained(repo, revision=branch)`). `trust_remote_code` stays off: importing genesis_hf
    registers the model classes, so no code from a checkpoint ever runs.

    Args:
        runs: a local run directory.
        repo: a Hub model repo id.
        token: Hub token for private repos; `None` uses `HF_TOKEN` or the cached login. It stays on the server.
    """

    def __init__(self, runs: str | Path | None = None, repo: str | None = None, token: str | None = None) -> None:
        if (runs is None) == (repo is None):
            raise PlaygroundError("Pass exactly one of --runs DIR (a local run) or --repo ID (a Hub model repo).")
        self.run_dir = Path(runs).expanduser().resolve() if runs is not None else None
        self.repo_id = repo
        self._token = token
        if self.run_dir is not None and not self.run_dir.is_dir():
            raise PlaygroundError(f"--runs {runs!s}: no such directory; pass the output directory of a training run.")
        self._lock = threading.Lock()
        self._listing: list[CheckpointEntry] = []
        self._listed_at = -math.inf
        self._metrics: list[dict] = []
        self._metrics_read_at = -math.inf

    @property
    def description(self) -> str:
        """What the page says it browses: the run folder's name (not its server path), or the repo id."""
        return f"run `{self.run_dir.name}`" if self.run_dir is not None else f"repo `{self.repo_id}`"

    def list_checkpoints(self, refresh: bool = False) -> list[CheckpointEntry]:
        """The checkpoints, oldest first; re-read when older than `LISTING_TTL_SECONDS` or when `refresh`."""
        with self._lock:
            if refresh or time.monotonic() - self._listed_at > LISTING_TTL_SECONDS:
                source = str(self.run_dir) if self.run_dir is not None else self.repo_id
                try:
                    self._listing = list_run_checkpoints(source, token=self._token)
                except CheckpointsError as error:
                    raise PlaygroundError(str(error)) from None
                self._listed_at = time.monotonic()
            return list(self._listing)

    def resolve(self, name: Any) -> CheckpointEntry:
        """The listed checkpoint called `name`; anything else (paths, URLs, unknown names) is refused.

        Raises:
            PlaygroundError: `name` is not the name of a listed checkpoint; the message says what to pass instead.
        """
        if not isinstance(name, str) or not name.strip():
            raise PlaygroundError("No checkpoint selected: pick one from the list (or pass its name to the API).")
        checkpoints = self.list_checkpoints()
        if name not in {checkpoint.name for checkpoint in checkpoints}:
            # A checkpoint may have appeared since the last listing.
            checkpoints = self.list_checkpoints(refresh=True)
        for checkpoint in checkpoints:
            if checkpoint.name == name:
                return checkpoint
        shown = repr(name if len(name) <= 80 else name[:77] + "...")
        known = ", ".join(checkpoint.name for checkpoint in checkpoints[-8:]) or "none yet"
        if _PATH_LIKE.search(name):
            raise PlaygroundError(
                f"Refused checkpoint {shown}: the playground loads only checkpoints of {self.description}, selected "
                f"by name, never paths or URLs. Pass one of: {known}."
            )
        raise PlaygroundError(
            f"Unknown checkpoint {shown}: {self.description} has no such checkpoint. Pass one of: {known}."
        )

    def location(self, checkpoint: CheckpointEntry) -> str:
        """Where a checkpoint lives, for people: its folder relative to the run, or `repo@revision`."""
        if checkpoint.path is not None and self.run_dir is not None:
            path = Path(checkpoint.path)
            if not path.resolve().is_relative_to(self.run_dir):
                link = next((part for part in [path, *path.parents] if part.is_symlink()), path)
                raise PlaygroundError(
                    f"Refused checkpoint {checkpoint.name!r}: {link} is a symlink to {link.resolve()}, outside the run "
                    f"folder {self.run_dir}; the playground serves only what lies inside --runs. Copy the folder in "
                    "instead of linking it, or pass its own run with --runs."
                )
            return path.resolve().relative_to(self.run_dir).as_posix() or "."
        return f"{self.repo_id}@{checkpoint.revision}"

    def _pretrained_kwargs(self, checkpoint: CheckpointEntry) -> tuple[str, dict]:
        """`(name_or_path, kwargs)` for `from_pretrained` of an exported folder or a Hub revision."""
        if checkpoint.path is not None:
            return str(checkpoint.path), {}
        return self.repo_id, {"revision": checkpoint.revision, "token": self._token}

    def load_config(self, checkpoint: CheckpointEntry) -> PretrainedConfig:
        """The model config of `checkpoint`; only `config.json` is read."""
        if checkpoint.kind == "training":
            return AutoConfig.from_pretrained(Path(checkpoint.path) / "config.json", trust_remote_code=False)
        location, kwargs = self._pretrained_kwargs(checkpoint)
        return AutoConfig.from_pretrained(location, trust_remote_code=False, **kwargs)

    def load(
        self, checkpoint: CheckpointEntry, device: str | torch.device, dtype: torch.dtype
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model (eval mode, on `device` in `dtype`) and tokenizer of `checkpoint`."""
        if checkpoint.kind == "training":
            # Imported here: only training checkpoints need the trainer's loader (and torch.distributed.checkpoint).
            from genesis_hf.pretrain.checkpoint import load_model_from_checkpoint

            model, tokenizer, _ = load_model_from_checkpoint(checkpoint.path, dtype=dtype)
        else:
            location, kwargs = self._pretrained_kwargs(checkpoint)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, trust_remote_code=False, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, **kwargs)
        return model.to(device).eval(), tokenizer

    def metrics(self) -> list[dict]:
        """The training loss curve `[{"step", "loss"}, ...]` from the run's `metrics.jsonl` (a repo's, on `main`,
        when it has one), else the losses of the listed checkpoints; re-read after `LISTING_TTL_SECONDS`."""
        if time.monotonic() - self._metrics_read_at > LISTING_TTL_SECONDS:
            self._metrics = self._read_metrics()
            self._metrics_read_at = time.monotonic()
        return list(self._metrics)

    def _read_metrics(self) -> list[dict]:
        from genesis_hf.model.card import loss_points, read_metrics

        metrics_path = None
        if self.run_dir is not None:
            metrics_path = self.run_dir / METRICS_FILE
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

            try:
                metrics_path = Path(hf_hub_download(self.repo_id, METRICS_FILE, token=self._token))
            except (EntryNotFoundError, HfHubHTTPError, OSError):
                metrics_path = None
        points = []
        if metrics_path is not None and metrics_path.is_file():
            points = [{"step": int(step), "loss": loss} for step, loss in loss_points(read_metrics(metrics_path))]
        if not points:
            points = [
                {"step": checkpoint.step, "loss": checkpoint.loss}
                for checkpoint in self.list_checkpoints()
                if checkpoint.loss is not None
            ]
        return _thin(sorted(points, key=lambda point: point["step"]), MAX_CURVE_POINTS)


class ModelCache:
    """At most `capacity` loaded models, least recently used evicted first; one load per checkpoint at a time.

    Args:
        capacity: models kept in memory (a 1B model in bf16 takes 2 GB).
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be at least 1 (the model being used is always kept).")
        self.capacity = capacity
        self._models: OrderedDict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.loads = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._models

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def get(
        self, key: str, load: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The cached value of `key`, or `load()`'s, cached (two requests for one checkpoint load it once)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            value = load()
            with self._lock:
                self.loads += 1
                self._models[key] = value
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
                self._load_locks.pop(key, None)
        return value


# ---------------------------------------------------------------------------------------------------------------------
# Generation


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
        self.stop_ids = frozenset(
            token_id
            for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN))
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id
        )

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
    if not stripped.startswith(THINK_OPEN):
        return None, text, True
    inner = stripped[len(THINK_OPEN) :]
    if THINK_CLOSE not in inner:
        return inner.strip(), "", False
    thinking, answer = inner.split(THINK_CLOSE, 1)
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


# ---------------------------------------------------------------------------------------------------------------------
# The playground: everything the page and the API do, without Gradio


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
            # A model on the meta device has shapes and no memory: counting its parameters costs nothing.
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            parameters = sum(parameter.numel() for parameter in skeleton.parameters())
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

    def _stream(self, name: str, input_ids: list[int], settings: SamplingSettings, what: str) -> TextStream:
        model, tokenizer = self.model(name)
        context = getattr(model.config, "max_position_embeddings", None) or 10**9
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
        _, tokenizer = self.model(name)
        return self._stream(name, tokenizer(prompt, add_special_tokens=False)["input_ids"], settings, "prompt")

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
        context = getattr(model.config, "max_position_embeddings", None) or 10**9
        system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        while True:
            input_ids = tokenizer.apply_chat_template(
                system + turns, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            # Room for a useful reply: a quarter of the context or the requested length, whichever is smaller.
            if len(input_ids) + min(settings.max_new_tokens, context // 4) <= context or len(turns) == 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[1:]
        return self._stream(name, list(input_ids), settings, "conversation")


# ---------------------------------------------------------------------------------------------------------------------
# The Gradio app

_CSS = """
#genesis-output textarea, .genesis-compare textarea { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
"""
_SAMPLING_DEFAULTS = SamplingSettings()


def _as_gradio_error(error: Exception) -> Exception:
    import gradio as gr

    if isinstance(error, gr.Error):
        return error
    if isinstance(error, PlaygroundError):
        return gr.Error(str(error), print_exception=False)
    # Unexpected: the traceback goes to the server log, the page gets one line.
    logger.error("Playground request failed", exc_info=error)
    return gr.Error(
        f"The request failed unexpectedly ({type(error).__name__}); the server log has the details.",
        print_exception=False,
    )


def _user_errors(function: Callable) -> Callable:
    """Turn any exception of a handler (plain or generator) into a `gr.Error` with a message and no traceback."""
    import inspect

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except Exception as error:
                raise _as_gradio_error(error) from None

        return generator_wrapper

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise _as_gradio_error(error) from None

    return wrapper


def build_app(playground: Playground, title: str = "Genesis playground") -> "gr.Blocks":
    """The Gradio app: checkpoint picker, loss curve, model facts, Generate / Compare / Chat tabs, named API endpoints.

    The queue is set up here (`default_concurrency_limit=playground.concurrency`); launch it with `launch_app`.

    Args:
        playground: the logic the page and the API call.
        title: the page title.
    """
    import gradio as gr
    import pandas as pd

    model_events = {"concurrency_id": "model", "concurrency_limit": playground.concurrency, "time_limit": 600}

    def choices() -> list[tuple[str, str]]:
        return [(checkpoint_label(checkpoint), checkpoint.name) for checkpoint in playground.source.list_checkpoints()]

    def curve_frame(selected: str | None) -> "pd.DataFrame":
        return pd.DataFrame(playground.loss_curve(selected), columns=["step", "loss", "series"])

    def table_frame() -> "pd.DataFrame":
        rows = [
            [c.name, c.step, c.tokens_seen, c.loss, c.revision or ""] for c in playground.source.list_checkpoints()
        ]
        return pd.DataFrame(rows, columns=["name", "step", "tokens seen", "loss", "revision"])

    # Handlers of the page (private endpoints) ------------------------------------------------------------------------

    @_user_errors
    def on_select(name: str | None):
        if not name:
            return "Pick a checkpoint.", curve_frame(None)
        return playground.facts_markdown(name), curve_frame(name)

    @_user_errors
    def on_refresh(selected: str | None, compare_a: str | None, compare_b: str | None, chat_selected: str | None):
        playground.source.list_checkpoints(refresh=True)
        options = choices()
        names = [value for _, value in options]
        latest = names[-1] if names else None

        def keep(value: str | None, fallback: str | None) -> Any:
            return gr.update(choices=options, value=value if value in names else fallback)

        first = names[0] if names else None
        return (
            keep(selected, latest),
            keep(compare_a, first),
            keep(compare_b, latest),
            keep(chat_selected, latest),
            table_frame(),
        )

    @_user_errors
    def on_generate(name, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed):
        settings = SamplingSettings.from_request(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        if not playground.is_loaded(name):
            yield "", f"Loading {name}..."
        stream = playground.generate_stream(name, prompt, settings)
        yield "", "Generating..."
        for text in stream:
            yield text, f"{stream.num_tokens} tokens..."
        if stream.stop_reason == "context":
            gr.Warning(f"Generation stopped at the model's context of {stream.context_length} tokens.")
        yield stream.text, stream.summary()

    @_user_errors
    def on_compare(name_a, name_b, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed):
        settings = SamplingSettings.from_request(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        yield from playground.compare_stream(name_a, name_b, prompt, settings)

    @_user_errors
    def on_chat(name, message, history, system_prompt, max_new_tokens, temperature, top_p, top_k, rep, seed):
        settings = SamplingSettings.from_request(max_new_tokens, temperature, top_p, top_k, rep, seed)
        history = list(history or [])
        stream = playground.chat_stream(name, message, history, system_prompt, settings)
        shown = history + [{"role": "user", "content": message}]
        yield shown, ""
        for reply in stream:
            yield shown + chat_display_messages(reply), ""
        yield shown + chat_display_messages(stream.text, stream.seconds), ""

    # Named API endpoints (plain functions, typed: gradio derives the API schema from the hints) -----------------------

    @_user_errors
    def list_checkpoints() -> list[dict]:
        """Every checkpoint of the browsed run or repo: name, step, tokens_seen, loss, revision (oldest first)."""
        return playground.list_checkpoints()

    @_user_errors
    def generate(
        checkpoint: str,
        prompt: str,
        max_new_tokens: int = _SAMPLING_DEFAULTS.max_new_tokens,
        temperature: float = _SAMPLING_DEFAULTS.temperature,
        top_p: float = _SAMPLING_DEFAULTS.top_p,
        top_k: int = _SAMPLING_DEFAULTS.top_k,
        repetition_penalty: float = _SAMPLING_DEFAULTS.repetition_penalty,
        seed: int = _SAMPLING_DEFAULTS.seed,
    ) -> str:
        """Continue `prompt` with `checkpoint` (a name from list_checkpoints); temperature 0 is greedy."""
        settings = SamplingSettings.from_request(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        stream = playground.generate_stream(checkpoint, prompt, settings)
        for _ in stream:
            pass
        return stream.text

    @_user_errors
    def compare(
        checkpoint_a: str,
        checkpoint_b: str,
        prompt: str,
        max_new_tokens: int = _SAMPLING_DEFAULTS.max_new_tokens,
        temperature: float = _SAMPLING_DEFAULTS.temperature,
        top_p: float = _SAMPLING_DEFAULTS.top_p,
        top_k: int = _SAMPLING_DEFAULTS.top_k,
        repetition_penalty: float = _SAMPLING_DEFAULTS.repetition_penalty,
        seed: int = _SAMPLING_DEFAULTS.seed,
    ) -> tuple[str, str]:
        """The same prompt, settings and seed through two checkpoints: `(text_a, text_b)`."""
        settings = SamplingSettings.from_request(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        texts = ("", "")
        for update in playground.compare_stream(checkpoint_a, checkpoint_b, prompt, settings):
            texts = update
        return texts

    @_user_errors
    def chat(
        checkpoint: str,
        message: str,
        system_prompt: str = "",
        history: list[dict] | None = None,
        max_new_tokens: int = _SAMPLING_DEFAULTS.max_new_tokens,
        temperature: float = _SAMPLING_DEFAULTS.temperature,
        top_p: float = _SAMPLING_DEFAULTS.top_p,
        top_k: int = _SAMPLING_DEFAULTS.top_k,
        repetition_penalty: float = _SAMPLING_DEFAULTS.repetition_penalty,
        seed: int = _SAMPLING_DEFAULTS.seed,
    ) -> str:
        """The assistant's reply to `message` after `history` (`[{"role", "content"}]`), `<think>...</think>`
        included."""
        settings = SamplingSettings.from_request(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        stream = playground.chat_stream(checkpoint, message, history, system_prompt, settings)
        for _ in stream:
            pass
        return stream.text

    # Layout ----------------------------------------------------------------------------------------------------------

    initial = playground.source.list_checkpoints()
    initial_choices = [(checkpoint_label(checkpoint), checkpoint.name) for checkpoint in initial]
    latest = initial[-1].name if initial else None
    first = initial[0].name if initial else None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nCheckpoints of {playground.source.description}: pick one, read its loss and facts, then "
            "generate, compare two checkpoints on the same prompt and seed, or chat."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                checkpoint = gr.Dropdown(
                    initial_choices,
                    value=latest,
                    label="Checkpoint",
                    info="step · tokens seen · loss",
                    elem_id="genesis-checkpoint",
                )
                refresh = gr.Button("Refresh list", size="sm", variant="secondary")
                facts = gr.Markdown(playground.facts_markdown(latest) if latest else "No checkpoints yet.")
            with gr.Column(scale=3, min_width=360):
                curve = gr.LinePlot(
                    curve_frame(latest),
                    x="step",
                    y="loss",
                    color="series",
                    color_map={LOSS_SERIES: "#3b82f6", SELECTED_SERIES: "#f97316"},
                    # The legend would be clipped at the bottom of the plot; the label says what the colors are.
                    colors_in_legend=[],
                    x_title="step (optimizer steps)",
                    y_title="training loss",
                    label="Loss curve (orange: the selected checkpoint)",
                    elem_id="genesis-loss-curve",
                )
        with gr.Accordion("Sampling settings (all tabs)", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1, MAX_NEW_TOKENS, value=_SAMPLING_DEFAULTS.max_new_tokens, step=1, label="max new tokens"
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=_SAMPLING_DEFAULTS.temperature, step=0.05, label="temperature", info="0 = greedy"
                )
                top_p = gr.Slider(0.05, 1.0, value=_SAMPLING_DEFAULTS.top_p, step=0.01, label="top-p")
            with gr.Row():
                top_k = gr.Slider(0, 200, value=_SAMPLING_DEFAULTS.top_k, step=1, label="top-k", info="0 = off")
                repetition_penalty = gr.Slider(
                    1.0, 2.0, value=_SAMPLING_DEFAULTS.repetition_penalty, step=0.01, label="repetition penalty"
                )
                seed = gr.Number(_SAMPLING_DEFAULTS.seed, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
        sampling = [max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]

        with gr.Tabs():
            with gr.Tab("Generate"):
                prompt = gr.Textbox(
                    DEFAULT_PROMPT,
                    label="Prompt",
                    lines=3,
                    max_length=MAX_PROMPT_CHARS,
                    placeholder="Once upon a time",
                    elem_id="genesis-prompt",
                )
                generate_button = gr.Button("Generate", variant="primary", elem_id="genesis-generate")
                output = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="genesis-output")
                stats = gr.Markdown(elem_id="genesis-stats")
            with gr.Tab("Compare"):
                with gr.Row():
                    compare_a = gr.Dropdown(initial_choices, value=first, label="Checkpoint A")
                    compare_b = gr.Dropdown(initial_choices, value=latest, label="Checkpoint B")
                compare_prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS)
                compare_button = gr.Button("Compare", variant="primary")
                with gr.Row():
                    output_a = gr.Textbox(label="A", lines=8, interactive=False, elem_classes="genesis-compare")
                    output_b = gr.Textbox(label="B", lines=8, interactive=False, elem_classes="genesis-compare")
            with gr.Tab("Chat"):
                chat_checkpoint = gr.Dropdown(initial_choices, value=latest, label="Chat checkpoint")
                system_prompt = gr.Textbox(label="System prompt (optional)", lines=1, max_length=MAX_PROMPT_CHARS)
                chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="genesis-chatbot")
                with gr.Row():
                    chat_message = gr.Textbox(label="Message", scale=5, max_length=MAX_PROMPT_CHARS)
                    send = gr.Button("Send", variant="primary", scale=1)
                clear = gr.Button("Clear", size="sm", variant="secondary")
        with gr.Accordion("All checkpoints", open=False):
            table = gr.Dataframe(table_frame(), interactive=False)
        gr.Markdown(
            f"Limits: prompts up to {MAX_PROMPT_CHARS:,} characters, up to {MAX_NEW_TOKENS} new tokens; "
            f"{playground.cache.capacity} models kept loaded. API: `list_checkpoints`, `generate`, `compare`, `chat` "
            "(see *Use via API* below)."
        )

        private = {"api_visibility": "private"}
        checkpoint.change(on_select, checkpoint, [facts, curve], **private)
        refresh.click(
            on_refresh,
            [checkpoint, compare_a, compare_b, chat_checkpoint],
            [checkpoint, compare_a, compare_b, chat_checkpoint, table],
            **private,
        )
        generate_button.click(on_generate, [checkpoint, prompt, *sampling], [output, stats], **private, **model_events)
        compare_button.click(
            on_compare,
            [compare_a, compare_b, compare_prompt, *sampling],
            [output_a, output_b],
            **private,
            **model_events,
        )
        chat_inputs = [chat_checkpoint, chat_message, chatbot, system_prompt, *sampling]
        send.click(on_chat, chat_inputs, [chatbot, chat_message], **private, **model_events)
        chat_message.submit(on_chat, chat_inputs, [chatbot, chat_message], **private, **model_events)
        clear.click(lambda: ([], ""), None, [chatbot, chat_message], **private)

        gr.api(list_checkpoints, api_name="list_checkpoints", concurrency_limit=None)
        gr.api(generate, api_name="generate", **model_events)
        gr.api(compare, api_name="compare", **model_events)
        gr.api(chat, api_name="chat", **model_events)

    demo.queue(default_concurrency_limit=playground.concurrency, max_size=64)
    return demo


def launch_app(demo: "gr.Blocks", host: str | None = "127.0.0.1", port: int | None = None, **launch_kwargs: Any):
    """Launch `demo` with the playground's theme (system fonts: nothing fetched from font CDNs) on `host:port`.

    Args:
        demo: from `build_app`.
        host: interface to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 shares it on the network.
        port: the port; `None` lets Gradio pick (7860 or the next free one).
        launch_kwargs: more `Blocks.launch` arguments (`prevent_thread_lock=True` to return at once).
    """
    import gradio as gr

    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "SFMono-Regular", "monospace"]
    )
    # show_error: gr.Error messages reach the page (handlers raise nothing else); ssr_mode off: no Node server.
    options = {"show_error": True, "ssr_mode": False, "theme": theme, "css": _CSS, "footer_links": ["api"]}
    return demo.launch(server_name=host, server_port=port, **{**options, **launch_kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Space configuration and deployment


def load_space_config(config_path: str | Path | None = None) -> dict:
    """What a Space (or `spaces/playground/app.py` run locally) browses: `{"runs": ...}` or `{"repo": ...}`.

    `GENESIS_PLAYGROUND_RUNS` / `GENESIS_PLAYGROUND_REPO` win over `config_path` (the `playground.json` that
    `deploy` writes next to app.py); a relative `runs` is relative to that file.

    Raises:
        PlaygroundError: neither the environment nor the file says what to browse.
    """
    if os.environ.get("GENESIS_PLAYGROUND_RUNS"):
        return {"runs": os.environ["GENESIS_PLAYGROUND_RUNS"]}
    if os.environ.get("GENESIS_PLAYGROUND_REPO"):
        return {"repo": os.environ["GENESIS_PLAYGROUND_REPO"]}
    if config_path is not None and Path(config_path).is_file():
        try:
            config = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except ValueError as error:
            raise PlaygroundError(f"{config_path} is not valid JSON ({error}); `deploy` writes it again.") from None
        if config.get("runs"):
            return {**config, "runs": str((Path(config_path).parent / config["runs"]).resolve())}
        if config.get("repo"):
            return config
    raise PlaygroundError(
        f"Nothing to browse: set GENESIS_PLAYGROUND_REPO (a Hub model repo id) or GENESIS_PLAYGROUND_RUNS (a run "
        f"directory), or write {SPACE_CONFIG_FILE} next to app.py (`genesis-hf playground deploy` does)."
    )


def playground_from_config(config: dict) -> Playground:
    """A `Playground` from `load_space_config()`'s dict (`cache_size`, `concurrency` optional)."""
    source = CheckpointSource(runs=config.get("runs"), repo=config.get("repo"))
    return Playground(
        source,
        cache_size=int(config.get("cache_size", DEFAULT_CACHE_SIZE)),
        concurrency=int(config.get("concurrency", DEFAULT_CONCURRENCY)),
    )


def _with_models_front_matter(readme: str, repo_id: str) -> str:
    """README with `models: [repo_id]` added to its front matter (links the Space to the model on the Hub)."""
    match = re.match(r"---\n(.*?)\n---\n", readme, flags=re.DOTALL)
    if match is None or re.search(r"^models:", match.group(1), flags=re.MULTILINE):
        return readme
    front_matter = match.group(1) + f"\nmodels:\n  - {repo_id}"
    return f"---\n{front_matter}\n---\n" + readme[match.end() :]


def _copy_package(target: Path) -> None:
    """Copy the genesis_hf package (sources and package data; no caches, no test helpers) to `target`, for the Space
    to import."""
    package_dir = Path(genesis_hf.__file__).resolve().parent

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith((".pyc", ".so"))}
        if Path(directory).resolve() == package_dir:
            skipped |= {"testing"} & set(names)
        return skipped

    shutil.copytree(package_dir, target, ignore=ignore)


def stage_space(folder: Path, repo: str | None = None, runs: str | Path | None = None) -> Path:
    """Fill `folder` with what the Space repo gets: `spaces/playground/*`, the genesis_hf package, `playground.json`
    (and, for `runs`, the run's exported checkpoint folders and `metrics.jsonl` under `run/`).

    Args:
        folder: an empty directory.
        repo: the Hub model repo the Space browses.
        runs: a local run to ship inside the Space instead (small models only: Spaces hold a few GB at most).
    """
    if not (SPACE_DIR / "app.py").is_file():
        raise PlaygroundError(f"The Space files are not at {SPACE_DIR}; deploy from a source checkout of genesis_hf.")
    source = CheckpointSource(runs=runs, repo=repo)
    for name in SPACE_FILES:
        shutil.copy2(SPACE_DIR / name, folder / name)
    _copy_package(folder / "genesis_hf")
    config: dict[str, Any]
    if repo is not None:
        config = {"repo": repo}
        readme = folder / "README.md"
        readme.write_text(_with_models_front_matter(readme.read_text(encoding="utf-8"), repo), encoding="utf-8")
    else:
        config = {"runs": "run"}
        run_folder = folder / "run"
        # Only exported model folders travel: training checkpoints carry the optimizer state (3x the weights).
        exported = [checkpoint for checkpoint in source.list_checkpoints() if checkpoint.kind == "hf"]
        if not exported:
            raise PlaygroundError(
                f"--runs {runs}: the run has no exported model folder to ship (its training checkpoints hold optimizer "
                "state). Export one (`genesis-hf export CHECKPOINT RUN/final`), or publish the run to a Hub repo and "
                "deploy with --repo ID."
            )
        for checkpoint in exported:
            shutil.copytree(checkpoint.path, run_folder / source.location(checkpoint))
        if (source.run_dir / METRICS_FILE).is_file():
            shutil.copy2(source.run_dir / METRICS_FILE, run_folder / METRICS_FILE)
    (folder / SPACE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def _check_no_token(folder: Path, token: str | None) -> None:
    """Refuse to upload a staged file that contains the Hub token (a copied `.env`, a config with a token...)."""
    if not token:
        return
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise PlaygroundError(
                f"Refusing to upload: {path.relative_to(folder)} contains your Hub token. Remove it and deploy again."
            )


def deploy_space(
    space_id: str,
    repo: str | None = None,
    runs: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create (or update) the Space `space_id` running the playground on `repo` (or a shipped copy of `runs`).

    One commit uploads app.py, requirements.txt, README.md (Spaces front matter), the genesis_hf package and
    `playground.json`. The token authenticates the upload only: it is in no uploaded file (checked before the upload),
    and the Space reads its own `HF_TOKEN` secret, if it needs one, on its server.

    Args:
        space_id: `user/name` of the Space.
        repo: Hub model repo to browse (its `step-XXXXXXX` branches).
        runs: a local run to ship inside the Space instead of `repo`.
        private: create the Space private.
        token: Hub token; `None` uses `HF_TOKEN` or the cached login.
        endpoint: the Hub URL; `None` uses `HF_ENDPOINT` or huggingface.co.

    Returns:
        The Space's URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="genesis-space-") as staging:
        # Staged and checked before the Space exists, so a refused deploy leaves nothing behind on the Hub.
        folder = stage_space(Path(staging), repo=repo, runs=runs)
        _check_no_token(folder, token or get_token())
        repo_url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=space_id,
            repo_type="space",
            commit_message=f"Deploy the Genesis playground for {repo or 'a shipped run'}",
            # Files of an older deploy that this one no longer has (removed modules, checkpoints) go away.
            delete_patterns=["genesis_hf/**", "run/**"],
        )
    return str(repo_url)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def port_problem(host: str | None, port: int | None) -> str | None:
    """Why the app could not listen on `host:port` (a busy port), or `None`; checked before anything is loaded."""
    import socket

    if port is None:
        return None
    with socket.socket(socket.AF_INET6 if host and ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does: TIME_WAIT is no conflict
        try:
            sock.bind((host or "127.0.0.1", port))
        except OSError as error:
            return (
                f"cannot listen on {host}:{port} ({error.strerror or error}): another program (another playground?) "
                f"uses that port. Pass a free one with --port (e.g. --port {port + 1}), or stop that program."
            )
    return None


def _run_playground(args: argparse.Namespace) -> int:
    problem = port_problem(args.host, args.port)
    if problem is not None:
        print(f"genesis-hf playground: error: {problem}", file=sys.stderr)
        return 2
    try:
        playground = Playground(
            CheckpointSource(runs=args.runs, repo=args.repo), cache_size=args.cache_size, concurrency=args.concurrency
        )
        demo = build_app(playground)
    except ValueError as error:  # PlaygroundError included: a bad source or setting, said in one line
        print(f"genesis-hf playground: error: {error}", file=sys.stderr)
        return 2
    launch_app(demo, host=args.host, port=args.port)
    return 0


def _run_deploy(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = deploy_space(args.space, repo=args.repo, runs=args.runs, private=args.private)
    except (ValueError, HfHubHTTPError) as error:
        # The Hub's answer (401: no or bad token, 403: no write access to the namespace, ...) names the fix.
        print(f"genesis-hf playground deploy: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # connection refused, DNS, TLS: the network, not the request
        print(
            f"genesis-hf playground deploy: error: could not reach the Hub at {constants.ENDPOINT} "
            f"({type(error).__name__}: {error}). Check the network (or HF_ENDPOINT) and deploy again.",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"space": args.space, "url": url, "browses": args.repo or "shipped run"}))
    return 0


def _add_source_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--runs", metavar="DIR", help="A local training run directory to browse.")
    group.add_argument(
        "--repo", metavar="ID", help="A Hub model repo whose step-XXXXXXX branches are the checkpoints."
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf playground` (serve locally) and `genesis-hf playground deploy` (publish as a Space).

    Args:
        subparsers: the `add_subparsers()` object of the top-level `genesis-hf` parser.
    """
    parser = subparsers.add_parser(
        "playground",
        help="Browse a run's checkpoints and talk to them in a Gradio app (or deploy it as a Space).",
        description=__doc__.split("\n\n")[0],
    )
    _add_source_arguments(parser, required=False)
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 shares it).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: 7860 or the next free one).")
    parser.add_argument("--cache-size", type=int, default=DEFAULT_CACHE_SIZE, help="Models kept loaded.")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="Generations at once.")
    parser.set_defaults(func=_run_playground_or_usage, playground_parser=parser)
    commands = parser.add_subparsers(dest="playground_command", metavar="SUBCOMMAND")
    deploy = commands.add_parser(
        "deploy",
        help="Create or update a Hugging Face Space running the playground.",
        description="Create or update a Gradio Space running the playground on a Hub model repo (or a shipped run).",
    )
    deploy.add_argument("--space", required=True, metavar="ID", help="The Space, e.g. you/genesis-playground.")
    _add_source_arguments(deploy, required=True)
    deploy.add_argument("--private", action="store_true", help="Create the Space private.")
    deploy.set_defaults(func=_run_deploy)


def _run_playground_or_usage(args: argparse.Namespace) -> int:
    if args.runs is None and args.repo is None:
        args.playground_parser.print_usage(sys.stderr)
        print(
            "genesis-hf playground: error: pass --runs DIR or --repo ID (or the deploy subcommand).", file=sys.stderr
        )
        return 2
    return _run_playground(args)


__all__ = [
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_CHARS",
    "CheckpointSource",
    "ModelCache",
    "Playground",
    "PlaygroundError",
    "SamplingSettings",
    "TextStream",
    "build_app",
    "chat_display_messages",
    "checkpoint_label",
    "decode_tokens",
    "deploy_space",
    "launch_app",
    "load_space_config",
    "normalize_history",
    "playground_from_config",
    "register_cli",
    "split_thinking",
    "stage_space",
]
