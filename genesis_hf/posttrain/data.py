"""Post-training data: the SFT mixture (YAML, like the pretraining mixture) and DPO preference pairs.

An SFT mixture lists sources, each converted to `messages` from its own schema (see `conversations`), then the
conversations of all sources are deduplicated and shuffled with a seed:

    name: genesis-1b
    seed: 42
    sources:
      - name: openhermes-2.5
        location: hub:teknium/OpenHermes-2.5   # or a local .jsonl/.json/.parquet file or folder, or embedded:sft
        count: 200000                          # take this many valid conversations (null: all)
        schema: sharegpt                       # optional: detected from the columns

`mixture_statistics` counts, per source, the conversations, the tokens of the rendered chat and the trainable
(assistant) tokens, and the conversations longer than `max_length` (the seed: 365.6M tokens, 73.2% trainable).
"""

import dataclasses
import glob
import os
import random
from pathlib import Path
from typing import Any

from genesis_hf.args import ConfigError, check_keys, load_yaml

from . import embedded
from .conversations import (
    BAD_EXAMPLE_POLICIES,
    SCHEMAS,
    ConversationError,
    SkipCounter,
    conversation_key,
    conversation_problem,
    conversation_reason,
    convert_rows,
    detect_schema,
)

MIXTURES_DIR = Path(__file__).resolve().parents[1] / "configs" / "sft"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
OVERLONG_POLICIES = ("truncate", "drop")


@dataclasses.dataclass
class SFTSource:
    """One source of an SFT mixture.

    Args:
        name: a short unique name; it keys the statistics.
        location: `hub:ORG/NAME`, `embedded:sft`, or a local `.jsonl`/`.json`/`.parquet` file, folder or glob.
        count: how many valid conversations to take (the first ones, before the shuffle); `None` takes all.
        schema: one of `conversations.SCHEMAS`; detected from the columns when `None`.
        config: the Hub dataset's configuration name.
        split: the Hub dataset's split.
        revision: the Hub dataset's revision.
    """

    name: str
    location: str
    count: int | None = None
    schema: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1
        ):
            raise ConfigError(f"SFT source {self.name!r} has count {self.count!r}; use a positive integer or null.")
        if self.schema is not None and self.schema not in SCHEMAS:
            raise ConfigError(f"SFT source {self.name!r} has schema {self.schema!r}; use one of {', '.join(SCHEMAS)}.")
        if self.location.startswith("embedded:") and self.location != "embedded:sft":
            raise ConfigError(f"SFT source {self.name!r}: unknown embedded set {self.location!r}; use embedded:sft.")


@dataclasses.dataclass
class SFTMixture:
    name: str
    sources: list[SFTSource]
    seed: int = 42
    description: str = ""


def load_sft_mixture(name_or_path: str | Path) -> SFTMixture:
    """Load `default`, `genesis-1b` (shipped in `genesis_hf/configs/sft/`) or a YAML file.

    Raises:
        ConfigError: the file does not exist, a key is unknown or a value is invalid.
    """
    path = Path(name_or_path)
    if not path.suffix and (MIXTURES_DIR / f"{name_or_path}.yaml").is_file():
        path = MIXTURES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(item.stem for item in MIXTURES_DIR.glob("*.yaml")))
        raise ConfigError(f"SFT mixture {str(name_or_path)!r} is neither a shipped one ({shipped}) nor a YAML file.")
    values = load_yaml(path)
    check_keys(values, (SFTMixture,), source=str(path))
    sources = values.get("sources") or []
    if not sources:
        raise ConfigError(f"SFT mixture {str(path)!r} lists no sources; add at least one under `sources:`.")
    parsed = []
    for source in sources:
        check_keys(source, (SFTSource,), source=f"{path} (source {source.get('name')!r})")
        parsed.append(SFTSource(**source))
    names = [source.name for source in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"SFT mixture {str(path)!r} has duplicate source names: {names}.")
    return SFTMixture(
        name=values.get("name", path.stem),
        sources=parsed,
        seed=values.get("seed", 42),
        description=values.get("description", ""),
    )


def local_files(location: str) -> list[str]:
    """The supported data files of a local file, folder or glob, sorted."""
    location = os.path.expanduser(location)
    if any(char in location for char in "*?["):
        candidates = sorted(glob.glob(location, recursive=True))
    elif os.path.isdir(location):
        candidates = sorted(str(path) for path in Path(location).rglob("*"))
    elif os.path.isfile(location):
        candidates = [location]
    else:
        hint = f" For a Hub dataset write hub:{location}." if location.count("/") == 1 else ""
        raise ConfigError(f"Dataset location {location!r} does not exist (no file, folder or glob match).{hint}")
    files = [path for path in candidates if os.path.isfile(path) and Path(path).suffix in LOCAL_SUFFIXES]
    if not files:
        raise ConfigError(
            f"Dataset location {location!r} holds no {', '.join(LOCAL_SUFFIXES)} file; point it at your data files."
        )
    suffixes = {LOCAL_SUFFIXES[Path(path).suffix] for path in files}
    if len(suffixes) > 1:
        raise ConfigError(f"Dataset location {location!r} mixes JSON and Parquet files; give one kind per source.")
    return files


def open_rows(location: str, *, config: str | None = None, split: str = "train", revision: str | None = None):
    """The rows of a dataset location: a `datasets` dataset (streamed from the Hub) or, for `embedded:`, a list."""
    import datasets

    if location == "embedded:sft":
        return [{"messages": messages} for messages in embedded.sft_conversations()]
    if location == "embedded:dpo":
        return embedded.preference_pairs()
    if location.startswith("hub:"):
        try:
            return datasets.load_dataset(location[4:], config, split=split, revision=revision, streaming=True)
        except Exception as error:
            raise ConfigError(
                f"Cannot open the Hub dataset {location[4:]!r} ({type(error).__name__}: {str(error)[:300]}). Check "
                "the id, config and split, the network (HF_HUB_OFFLINE), or download it and use the local files."
            ) from None
    files = local_files(location)
    for path in files:
        if os.path.getsize(path) == 0:
            raise ConfigError(f"Data file {path!r} is empty; point the dataset at a file with rows.")
    try:
        return datasets.load_dataset(LOCAL_SUFFIXES[Path(files[0]).suffix], data_files=files, split="train")
    except Exception as error:
        raise ConfigError(_unreadable(files, error)) from None


def _unreadable(files: list[str], error: Exception) -> str:
    """Why `datasets` could not read local data files: the first line of a `.jsonl` file that is not JSON, if any."""
    import json

    for path in files:
        if Path(path).suffix != ".jsonl":
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as problem:
                    return (
                        f"Data file {path!r} line {number} is not valid JSON ({problem}); each line of a .jsonl file "
                        "must be one JSON object. Fix or remove that line."
                    )
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return (
        f"Cannot read the data file(s) {', '.join(files[:3])} ({type(error).__name__}: {detail}). Check that they "
        "are valid JSON lines or Parquet with one row per conversation."
    )


def _columns(rows) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names:
        return list(names)
    first = next(iter(rows), None)
    return sorted(first) if isinstance(first, dict) else []


def build_sft_dataset(mixture: SFTMixture, *, on_bad_example: str = "error") -> tuple[Any, SkipCounter]:
    """Read, convert, deduplicate and shuffle the mixture's conversations.

    Returns:
        A `datasets.Dataset` with columns `messages` and `source`, and the skipped rows by reason (bad rows when
        `on_bad_example="skip"`, and `"<source>: duplicate"`).
    """
    import datasets

    skipped = SkipCounter()
    seen = set()
    records = []
    for source in mixture.sources:
        rows = open_rows(source.location, config=source.config, split=source.split, revision=source.revision)
        schema = source.schema or detect_schema(_columns(rows))
        taken = 0
        for messages in convert_rows(rows, schema, source=source.name, on_bad_example=on_bad_example, skipped=skipped):
            key = conversation_key(messages)
            if key in seen:
                skipped[f"{source.name}: duplicate"] += 1
                continue
            seen.add(key)
            records.append({"messages": messages, "source": source.name})
            taken += 1
            if source.count is not None and taken == source.count:
                break
        if taken == 0:
            raise ConfigError(f"SFT source {source.name!r} ({source.location}) gave no valid conversation.")
    random.Random(mixture.seed).shuffle(records)
    return datasets.Dataset.from_list(records), skipped


def mixture_statistics(dataset, tokenizer, *, max_length: int | None = None, num_proc: int | None = None) -> dict:
    """Per source and in total: conversations, tokens, trainable (assistant) tokens and their share, overlong rows.

    Tokens are those of the rendered chat template, as the SFT trainer tokenizes it; trainable tokens are the ones the
    template's generation markers put in the assistant mask.
    """

    def count(batch):
        encoded = tokenizer.apply_chat_template(
            batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return {
            "num_tokens": [len(ids) for ids in encoded["input_ids"]],
            "num_trainable": [sum(mask) for mask in encoded["assistant_masks"]],
        }

    counted = dataset.map(count, batched=True, batch_size=256, num_proc=num_proc, desc="Counting tokens")
    per_source: dict[str, dict[str, int]] = {}
    for source, tokens, trainable in zip(counted["source"], counted["num_tokens"], counted["num_trainable"]):
        entry = per_source.setdefault(source, {"conversations": 0, "tokens": 0, "trainable_tokens": 0, "overlong": 0})
        entry["conversations"] += 1
        entry["tokens"] += tokens
        entry["trainable_tokens"] += trainable
        entry["overlong"] += int(max_length is not None and tokens > max_length)
    total = {key: sum(entry[key] for entry in per_source.values()) for key in ("conversations", "tokens")}
    total.update({key: sum(entry[key] for entry in per_source.values()) for key in ("trainable_tokens", "overlong")})
    for entry in [*per_source.values(), total]:
        entry["trainable_share"] = round(entry["trainable_tokens"] / max(entry["tokens"], 1), 4)
    return {"sources": per_source, "total": total, "lengths": counted["num_tokens"]}


def format_statistics(stats: dict) -> str:
    lines = [f"{'source':<28} {'conversations':>13} {'tokens':>12} {'trainable':>12} {'share':>6} {'overlong':>8}"]
    for name, entry in [*stats["sources"].items(), ("total", stats["total"])]:
        lines.append(
            f"{name:<28} {entry['conversations']:>13,} {entry['tokens']:>12,} {entry['trainable_tokens']:>12,} "
            f"{entry['trainable_share']:>6.1%} {entry['overlong']:>8,}"
        )
    return "\n".join(lines)


def apply_length_policy(dataset, lengths: list[int], max_length: int | None, overlong: str) -> tuple[Any, int]:
    """Drop the conversations longer than `max_length` (`overlong="drop"`), or keep them for the trainer to truncate.

    Returns:
        The dataset and the number of overlong conversations (dropped or to be truncated).
    """
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"overlong={overlong!r}; use one of {', '.join(OVERLONG_POLICIES)}.")
    if max_length is None:
        return dataset, 0
    long_rows = [index for index, length in enumerate(lengths) if length > max_length]
    if overlong == "drop" and long_rows:
        drop = set(long_rows)
        dataset = dataset.select([index for index in range(len(dataset)) if index not in drop])
    return dataset, len(long_rows)


# ---------------------------------------------------------------------------------------------------------------------
# DPO


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "role" in item for item in value)


def _pair_problem(row: dict[str, Any]) -> str | None:
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        if not (isinstance(value, str) and value.strip()) and not (_is_messages(value) and value):
            return f"{key} is empty or neither a string nor a list of messages"
    # Each answer after its prompt must be a conversation SFT would accept: known roles, string contents, no empty
    # assistant turn, the assistant's reply last.
    prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    for key in ("chosen", "rejected"):
        answer = row[key] if isinstance(row[key], list) else [{"role": "assistant", "content": row[key]}]
        problem = conversation_problem([*prompt, *answer])
        if problem is not None:
            return f"prompt + {key}: {problem}"
    if row["chosen"] == row["rejected"]:
        return "chosen equals rejected (the pair teaches nothing)"
    return None


def _pair_reason(problem: str) -> str:
    if problem.startswith("prompt + "):
        return f"{problem.split(':')[0].removeprefix('prompt + ')} {conversation_reason(problem)}"
    return problem.split(" (")[0]


def build_preference_dataset(
    location: str, *, on_bad_example: str = "error", **open_kwargs
) -> tuple[Any, SkipCounter]:
    """Preference pairs in TRL's `prompt`/`chosen`/`rejected` form (plain strings or message lists) from a location.

    The constitution pipeline's `dpo.jsonl` has this form (chosen = the revision, rejected = the original).
    """
    import datasets

    if on_bad_example not in BAD_EXAMPLE_POLICIES:
        raise ConfigError(f"on_bad_example={on_bad_example!r}; use one of {', '.join(BAD_EXAMPLE_POLICIES)}.")
    rows = open_rows(location, **open_kwargs)
    columns = _columns(rows)
    if not {"prompt", "chosen", "rejected"} <= set(columns):
        raise ConversationError(
            f"Preference data {location!r} has columns {sorted(columns)}; DPO needs prompt, chosen and rejected "
            "(plain strings or lists of messages). Rename the columns to these."
        )
    skipped = SkipCounter()
    pairs = []
    for index, row in enumerate(rows):
        problem = _pair_problem(row)
        if problem is None:
            pairs.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
        elif on_bad_example == "skip":
            skipped[f"{location}: {_pair_reason(problem)}"] += 1
        else:
            raise ConversationError(
                f"{location} row {index}: {problem}. Fix the data, or pass --on_bad_example skip to skip such rows."
            )
    if not pairs:
        raise ConfigError(f"Preference data {location!r} has no valid pair.")
    return datasets.Dataset.from_list(pairs), skipped


__all__ = [
    "OVERLONG_POLICIES",
    "SFTMixture",
    "SFTSource",
    "apply_length_policy",
    "build_preference_dataset",
    "build_sft_dataset",
    "format_statistics",
    "load_sft_mixture",
    "local_files",
    "mixture_statistics",
    "open_rows",
]
