"""Where a model folder comes from: the stage that made it, the recipe command, its data and the model it started from.

The recipes record it as a `lineage` mapping: pretraining in its checkpoints' `run_config.yaml`, SFT and DPO in their
`final/`'s `genesis_checkpoint.json`; every export of a folder copies its lineage into the new folder's
`genesis_checkpoint.json`, so a GGUF file of an SFT model still knows its base. The model card reads it:

    {"stage": "sft", "command": "accelerate launch recipes/sft.py --max_steps 2",
     "base_model": "outputs/genesis-tiny/final", "base_model_hub_id": "you/genesis-tiny", "base_model_revision": null,
     "data": "default", "datasets": []}

`base_model` is what the run was started from as the user named it (a local path or a Hub repo id); only
`base_model_hub_id` (a Hub id, or the repo a local folder was pushed to) may go into a card's `base_model` metadata,
which the Hub resolves as a repo. `datasets` holds only Hub dataset ids, for the same reason; `data` names the
mixture or file in words. This module imports only `genesis_hf.layout`.
"""

import json
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

from genesis_hf.layout import CHECKPOINT_METADATA_FILE, CHECKPOINTS_DIR, FINAL_DIR, HUB_JOURNAL_FILE, STEP_DIR

STAGES = ("pretraining", "sft", "dpo")
HUB_DATASET_PREFIX = "hub:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_repo_id(name: str | None) -> bool:
    """`namespace/name` that is not an existing local path."""
    return bool(name) and bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def recipe_command(recipe: str, argv: Sequence[str] | None) -> str:
    """The launch command of a recipe with its arguments, as a user would type it (`accelerate launch recipes/...`)."""
    arguments = " ".join(shlex.quote(str(argument)) for argument in (argv or ()))
    return f"accelerate launch {recipe}" + (f" {arguments}" if arguments else "")


def hub_datasets(locations: Iterable[str]) -> list[str]:
    """The Hub dataset ids among mixture source locations (`hub:ORG/NAME`), in order, without repeats."""
    found = []
    for location in locations:
        if isinstance(location, str) and location.startswith(HUB_DATASET_PREFIX):
            dataset = location[len(HUB_DATASET_PREFIX) :].strip()
            if dataset and dataset not in found:
                found.append(dataset)
    return found


def read_lineage(folder: str | Path) -> dict | None:
    """The `lineage` recorded in a model folder's `genesis_checkpoint.json`, or `None`."""
    try:
        metadata = json.loads((Path(folder) / CHECKPOINT_METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    lineage = metadata.get("lineage") if isinstance(metadata, dict) else None
    return lineage if isinstance(lineage, dict) else None


def hub_id_of(name_or_path: str | Path | None) -> str | None:
    """The Hub repo id of a model: the id itself, or for a local folder the repo it was published to.

    A local folder counts as published when its own metadata says so (`genesis_checkpoint.json`'s `hub_id`, written
    when it was exported for a repo) or when its run's Hub journal (`<run>/hub_uploads.json`, the pusher's) names a
    repo; `None` otherwise.
    """
    if name_or_path is None:
        return None
    if is_hub_repo_id(str(name_or_path)):
        return str(name_or_path)
    folder = Path(name_or_path).expanduser()
    try:
        metadata = json.loads((folder / CHECKPOINT_METADATA_FILE).read_text())
        if is_hub_repo_id(metadata.get("hub_id")):
            return metadata["hub_id"]
    except (OSError, ValueError, AttributeError):
        pass
    for run_dir in (folder, folder.parent, folder.parent.parent):  # a run's final/ or checkpoints/step-N
        try:
            repo_id = json.loads((run_dir / HUB_JOURNAL_FILE).read_text()).get("repo_id")
        except (OSError, ValueError, AttributeError):
            continue
        if is_hub_repo_id(repo_id):
            return repo_id
    return None


def model_name_of(name_or_path: str | Path) -> str:
    """A model's name for titles: a Hub id's name, else its recorded `model_name`, else its run folder's name
    (`outputs/genesis-tiny/final` and `outputs/genesis-tiny/checkpoints/step-0000200` are `genesis-tiny`)."""
    if is_hub_repo_id(str(name_or_path)):
        return str(name_or_path).split("/")[-1]
    folder = Path(name_or_path).expanduser().resolve()
    recorded = (read_lineage(folder) or {}).get("model_name")
    if recorded:
        return recorded
    if folder.name == FINAL_DIR or (folder.parent.name == CHECKPOINTS_DIR and STEP_DIR.match(folder.name)):
        return folder.parent.name if folder.name == FINAL_DIR else folder.parent.parent.name
    return folder.name


def finetune_lineage(
    stage: str,
    argv: Sequence[str] | None,
    *,
    base_model: str,
    base_model_revision: str | None = None,
    data: str | None = None,
    datasets: Iterable[str] = (),
    hub_model_id: str | None = None,
) -> dict:
    """The lineage an SFT or DPO run records for its `final/` and `adapter/`; the model is named after the Hub repo
    it is pushed to, else after its base (`genesis-tiny` -> `genesis-tiny-sft`).

    Args:
        stage: `sft` or `dpo`.
        argv: the recipe's command-line arguments.
        base_model: the starting point as resolved (a local folder or a Hub repo id).
        base_model_revision: the Hub revision of a repo id.
        data: the mixture or dataset, in words.
        datasets: mixture source locations; the `hub:` ones become the card's `datasets`.
        hub_model_id: the repo the run pushes to (`--hub_model_id`).
    """
    if stage not in STAGES[1:]:
        raise ValueError(f"stage={stage!r}; a fine-tuning lineage is one of {', '.join(STAGES[1:])}.")
    model_name = hub_model_id.split("/")[-1] if hub_model_id else f"{model_name_of(base_model)}-{stage}"
    return {
        "stage": stage,
        "model_name": model_name,
        "command": recipe_command(f"recipes/{stage}.py", argv),
        "base_model": str(base_model),
        "base_model_hub_id": hub_id_of(base_model),
        "base_model_revision": base_model_revision if is_hub_repo_id(str(base_model)) else None,
        "data": data,
        "datasets": hub_datasets(datasets),
    }


def pretraining_lineage(argv: Sequence[str] | None, *, data: str | None, datasets: Iterable[str] = ()) -> dict:
    """The lineage a pretraining run records in its checkpoints' run config (a model trained from scratch)."""
    return {
        "stage": "pretraining",
        "command": recipe_command("recipes/pretrain.py", argv),
        "data": data,
        "datasets": hub_datasets(datasets),
    }


__all__ = [
    "STAGES",
    "finetune_lineage",
    "hub_datasets",
    "hub_id_of",
    "is_hub_repo_id",
    "model_name_of",
    "pretraining_lineage",
    "read_lineage",
    "recipe_command",
]
