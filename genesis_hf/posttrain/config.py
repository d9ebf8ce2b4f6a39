"""Arguments of `recipes/sft.py` and `recipes/dpo.py`: TRL's own `SFTConfig`/`DPOConfig` and `ModelConfig`, plus the
data arguments below, parsed with the project's one idiom (`genesis_hf.args.parse_args`: `--config file.yaml` gives
defaults, CLI flags override, unknown keys are an error naming the valid ones).
"""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

from genesis_hf.args import ConfigError, parse_args

from .conversations import BAD_EXAMPLE_POLICIES
from .data import OVERLONG_POLICIES


@dataclasses.dataclass
class SFTDataArguments:
    """Where the SFT conversations come from and what happens to bad or long ones."""

    mixture: str = dataclasses.field(
        default="default", metadata={"help": "SFT mixture: default (embedded), genesis-1b, or a YAML path."}
    )
    dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "One dataset instead of the mixture: local .jsonl/.parquet file or folder, or hub:ORG/NAME."
        },
    )
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    on_bad_example: str = dataclasses.field(
        default="error", metadata={"help": "error: stop at a bad row and name it; skip: skip and count it."}
    )
    overlong: str = dataclasses.field(
        default="truncate", metadata={"help": "Conversations longer than max_length: truncate or drop (counted)."}
    )

    def __post_init__(self) -> None:
        if self.on_bad_example not in BAD_EXAMPLE_POLICIES:
            raise ConfigError(f"on_bad_example={self.on_bad_example!r}; use one of {', '.join(BAD_EXAMPLE_POLICIES)}.")
        if self.overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"overlong={self.overlong!r}; use one of {', '.join(OVERLONG_POLICIES)}.")


@dataclasses.dataclass
class DPODataArguments:
    """Where the preference pairs come from."""

    dataset_name: str = dataclasses.field(
        default="embedded:dpo",
        metadata={
            "help": "embedded:dpo, a local .jsonl/.parquet file or folder (e.g. the constitution's dpo.jsonl), "
            "or hub:ORG/NAME."
        },
    )
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    on_bad_example: str = dataclasses.field(
        default="error", metadata={"help": "error: stop at a bad pair and name it; skip: skip and count it."}
    )

    def __post_init__(self) -> None:
        if self.on_bad_example not in BAD_EXAMPLE_POLICIES:
            raise ConfigError(f"on_bad_example={self.on_bad_example!r}; use one of {', '.join(BAD_EXAMPLE_POLICIES)}.")


@dataclasses.dataclass
class TrainingEvalArguments:
    """Optional small lm-eval runs on every saved checkpoint, logged with the training metrics."""

    eval_tasks: str | None = dataclasses.field(
        default=None,
        metadata={"help": "lm-eval tasks (comma-separated) to evaluate at every checkpoint, eval_limit docs each."},
    )
    eval_limit: int = dataclasses.field(default=100, metadata={"help": "Documents per task in those evaluations."})
    eval_include_path: str | None = dataclasses.field(
        default=None, metadata={"help": "Extra lm-eval task folder(s) for eval_tasks, comma-separated."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int) or self.eval_limit < 1:
            raise ConfigError(f"eval_limit={self.eval_limit!r}; pass a positive number of documents, e.g. 100.")


@dataclasses.dataclass
class RunFolderArguments:
    """What a launch may do with an output folder that holds a previous run (see `genesis_hf.posttrain.resume`)."""

    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Start from step 0 in an output_dir that holds a previous run (its results, its checkpoints, or "
            "other settings); without it such a launch resumes the run when the settings match, or is refused."
        },
    )


def parse_recipe_args(dataclass_types: tuple[type, ...], argv: list[str] | None, default_config: str | Path):
    """`parse_args` with `default_config` as the `--config` when the command line names none.

    The recipes' defaults are the CPU `genesis-tiny` config, so the bare `accelerate launch recipes/sft.py` runs.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(item == "--config" or item.startswith("--config=") for item in argv):
        argv = ["--config", str(default_config), *argv]
    if _multi_process_without_cuda() and not any(item.startswith("--use_cpu") for item in argv):
        # transformers' TrainingArguments sets up gloo across CPU processes only with use_cpu; without it each
        # process of `accelerate launch` would train alone on its own copy and write its own final/.
        argv += ["--use_cpu", "true"]
    return parse_args(dataclass_types, argv)


def _multi_process_without_cuda() -> bool:
    import os

    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def hub_push_settings(training_args) -> SimpleNamespace:
    """Take `push_to_hub` away from the TRL trainer (it would push the output folder itself) and return the settings
    for genesis_hf's per-checkpoint pusher (a branch per checkpoint, `main` = newest, verified exports), as
    `genesis_hf.publish.push.pusher_for_run` takes them."""
    settings = {
        "push_to_hub": bool(training_args.push_to_hub),
        "hub_model_id": training_args.hub_model_id,
        "output_dir": training_args.output_dir,
        "hub_private_repo": training_args.hub_private_repo,
    }
    if settings["push_to_hub"] and not settings["hub_model_id"]:
        raise ConfigError("push_to_hub=true needs hub_model_id (e.g. --hub_model_id your-name/genesis-tiny-sft).")
    training_args.push_to_hub = False
    return SimpleNamespace(**settings)


__all__ = [
    "DPODataArguments",
    "RunFolderArguments",
    "SFTDataArguments",
    "TrainingEvalArguments",
    "hub_push_settings",
    "parse_recipe_args",
]
