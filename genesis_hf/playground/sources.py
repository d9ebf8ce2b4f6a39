"""Where the playground's checkpoints come from: one run directory or Hub repo (`CheckpointSource`), listed by name,
looked up by exact name only, loaded on demand and kept in a small LRU (`ModelCache`)."""

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import genesis_hf  # noqa: F401 - registers GenesisConfig/GenesisForCausalLM with the Auto classes
from genesis_hf.layout import METRICS_FILE, MODEL_CONFIG_FILE
from genesis_hf.publish.listing import CheckpointEntry, CheckpointsError, list_run_checkpoints, path_in_run

# Models kept in memory (least recently used evicted first) and requests that may run a model at the same time.
DEFAULT_CACHE_SIZE = 2
DEFAULT_CONCURRENCY = 2
# How long a listing is reused before the run or repo is read again (a live run keeps adding checkpoints).
LISTING_TTL_SECONDS = 30.0
# Points drawn in the loss curve; longer metrics files are thinned evenly.
MAX_CURVE_POINTS = 2000
# Anything that looks like a location rather than a checkpoint name; used only to word the refusal, since the lookup
# by exact name is what enforces the rule.
# An absolute server path inside an error message (not a URL's path: no scheme, host or word right before it).
_SERVER_PATH = re.compile(r"(?<![\w.:/])/[^\s'\",;()]+")
_PATH_LIKE = re.compile(r"[/\\]|\.\.|^~|^[A-Za-z][A-Za-z0-9+.-]*:")


class PlaygroundError(ValueError):
    """A request the playground refuses or cannot serve; the message is shown to the user as is."""


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

    def public_message(self, message: str) -> str:
        """`message` for API callers: server paths become the run's name or a path inside the run, and a path outside
        the run is not shown at all (what the server's disk holds is not the caller's business)."""

        def shown(match: re.Match) -> str:
            path = Path(match.group(0).rstrip("."))
            tail = match.group(0)[len(str(path)) :]
            if self.run_dir is not None and path == self.run_dir:
                return f"run {self.run_dir.name}" + tail
            if self.run_dir is not None and path.is_relative_to(self.run_dir):
                return path.relative_to(self.run_dir).as_posix() + tail
            return "a folder outside the run" + tail

        return _SERVER_PATH.sub(shown, message)

    def list_checkpoints(self, refresh: bool = False) -> list[CheckpointEntry]:
        """The checkpoints, oldest first; re-read when older than `LISTING_TTL_SECONDS` or when `refresh`."""
        with self._lock:
            if refresh or time.monotonic() - self._listed_at > LISTING_TTL_SECONDS:
                source = str(self.run_dir) if self.run_dir is not None else self.repo_id
                try:
                    self._listing = list_run_checkpoints(source, token=self._token)
                except CheckpointsError as error:
                    raise PlaygroundError(self.public_message(str(error))) from None
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
            try:
                return path_in_run(self.run_dir, checkpoint).as_posix() or "."
            except CheckpointsError as error:
                raise PlaygroundError(self.public_message(str(error))) from None
        return f"{self.repo_id}@{checkpoint.revision}"

    def _pretrained_kwargs(self, checkpoint: CheckpointEntry) -> tuple[str, dict]:
        """`(name_or_path, kwargs)` for `from_pretrained` of an exported folder or a Hub revision."""
        if checkpoint.path is not None:
            return str(checkpoint.path), {}
        return self.repo_id, {"revision": checkpoint.revision, "token": self._token}

    def load_config(self, checkpoint: CheckpointEntry) -> PretrainedConfig:
        """The model config of `checkpoint`; only `config.json` is read."""
        if checkpoint.kind == "training":
            return AutoConfig.from_pretrained(Path(checkpoint.path) / MODEL_CONFIG_FILE, trust_remote_code=False)
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
