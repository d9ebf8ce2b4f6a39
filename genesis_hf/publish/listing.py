"""List the checkpoints of a run, locally or on the Hub: `genesis-hf checkpoints RUN_DIR_OR_REPO [--json]`.

A local run directory yields its training checkpoints (`checkpoints/step-XXXXXXX/`, read through
`genesis_hf.pretrain.checkpoint.list_checkpoints`) and every exported model folder in it (`final/`,
`hub_exports/step-XXXXXXX/`, ...), including the `checkpoint-N/` folders of transformers' Trainer (SFT and DPO runs,
step and loss from their `trainer_state.json`). A Hub repo id yields its `step-XXXXXXX` branches and `main`, with step, tokens seen
and loss read from the `genesis_checkpoint.json` that every export carries. The playground lists checkpoints through
`list_run_checkpoints`.
"""

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path

from genesis_hf.args import add_command
from genesis_hf.layout import (
    CHECKPOINT_METADATA_FILE,
    FINAL_POINTER_FILE,
    TRAINER_STATE_FILE,
    checkpoints_root,
    has_weights,
    step_of,
)


class CheckpointsError(ValueError):
    """The source cannot be listed; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint of a run.

    Args:
        name: what to call it: `step-0000400` (training checkpoint or Hub branch), `main`, or the folder's path
            relative to the run directory for exported folders (`final`, `hub_exports/step-0000400`).
        step: optimizer steps (0 when nothing says).
        tokens_seen: training tokens consumed, when known.
        loss: training loss at that step, when known.
        revision: the Hub branch (Hub entries).
        path: the local folder (local entries).
        kind: `training` (DCP checkpoint), `hf` (exported model folder) or `hub` (a repo revision).
    """

    name: str
    step: int
    tokens_seen: int | None = None
    loss: float | None = None
    revision: str | None = None
    path: Path | None = None
    kind: str = "training"

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        values["path"] = str(self.path) if self.path is not None else None
        return values


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _float_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _from_trainer_state(state: dict) -> dict:
    """`step`, `tokens_seen` and `loss` of a transformers `trainer_state.json` (`global_step`, `log_history`).

    The loss is the last one logged at or before the checkpoint's step; tokens are the Trainer's
    `num_input_tokens_seen` when it counted them, else TRL's `num_tokens` (the tokens trained on, all processes).
    """
    step = _int_or_none(state.get("global_step"))
    history = [record for record in state.get("log_history") or [] if isinstance(record, dict)]
    if step is not None:
        history = [record for record in history if (_int_or_none(record.get("step")) or 0) <= step]
    losses = [record["loss"] for record in history if _float_or_none(record.get("loss")) is not None]
    tokens = _int_or_none(state.get("num_input_tokens_seen")) or None
    if tokens is None:
        counted = [record["num_tokens"] for record in history if _int_or_none(record.get("num_tokens")) is not None]
        tokens = int(counted[-1]) if counted else None
    return {"step": step, "tokens_seen": tokens, "loss": losses[-1] if losses else None}


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and has_weights(folder)


def _is_training_checkpoint(folder: Path) -> bool:
    return (folder / TRAINER_STATE_FILE).is_file() and not has_weights(folder)


def _folder_metadata(folder: Path) -> dict:
    """Step, tokens and loss of an exported folder: its `genesis_checkpoint.json`, its `trainer_state.json`, or the
    trainer state of the training checkpoint named by `training_checkpoint.json` (the trainer's `final/`)."""
    for name in (CHECKPOINT_METADATA_FILE, TRAINER_STATE_FILE):
        data = _read_json(folder / name)
        if data:
            # genesis_hf writes `step`; transformers' Trainer writes `global_step` and its `log_history`.
            return _from_trainer_state(data) if "step" not in data and "global_step" in data else data
    pointer = _read_json(folder / FINAL_POINTER_FILE).get("checkpoint")
    if pointer:
        return _read_json(Path(pointer) / TRAINER_STATE_FILE)
    return {}


def _entry_from_folder(folder: Path, name: str, kind: str) -> CheckpointEntry:
    metadata = _folder_metadata(folder)
    step = _int_or_none(metadata.get("step"))
    if step is None:
        step = step_of(folder.name) or 0
    return CheckpointEntry(
        name=name,
        step=step,
        tokens_seen=_int_or_none(metadata.get("tokens_seen")),
        loss=_float_or_none(metadata.get("loss")),
        path=folder,
        kind=kind,
    )


def _training_checkpoints(run_dir: Path) -> list[CheckpointEntry]:
    try:
        from genesis_hf.pretrain.checkpoint import list_checkpoints
    except ImportError:
        list_checkpoints = None
    if list_checkpoints is not None:
        infos = list_checkpoints(run_dir)
        return [
            CheckpointEntry(
                name=info.path.name,
                step=info.step,
                tokens_seen=_int_or_none(info.tokens_seen),
                loss=_float_or_none(info.loss),
                path=info.path,
                # A model folder placed among the checkpoints loads with from_pretrained, not from DCP shards.
                kind="hf" if _is_model_folder(info.path) else "training",
            )
            for info in infos
        ]
    folders = sorted(checkpoints_root(run_dir).glob("step-*/"))
    return [
        _entry_from_folder(folder, folder.name, "training") for folder in folders if _is_training_checkpoint(folder)
    ]


def list_local_checkpoints(run_dir: str | Path) -> list[CheckpointEntry]:
    """Training checkpoints and exported model folders of a local run directory (or one checkpoint folder).

    Args:
        run_dir: a run's output directory, a training checkpoint or an exported model folder.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise CheckpointsError(f"{str(run_dir)!r} is not a directory; pass a run's output directory.")
    if _is_training_checkpoint(run_dir):
        return [_entry_from_folder(run_dir, run_dir.name, "training")]
    if _is_model_folder(run_dir) and not (run_dir / "checkpoints").is_dir():
        return [_entry_from_folder(run_dir, run_dir.name, "hf")]
    entries = _training_checkpoints(run_dir)
    seen = {entry.path for entry in entries}
    # Exported folders up to two levels down: final/, hub_exports/step-XXXXXXX/, exports/llama/, ...
    for folder in sorted([*run_dir.glob("*/"), *run_dir.glob("*/*/")]):
        relative = folder.relative_to(run_dir)
        # Hidden folders (the Hub pusher's `.hub_staging/` copies) and half-written exports are not checkpoints.
        if folder in seen or any(part.startswith(".") for part in relative.parts) or "-partial-" in folder.name:
            continue
        if _is_model_folder(folder):
            entries.append(_entry_from_folder(folder, relative.as_posix(), "hf"))
    return sorted(entries, key=lambda entry: (entry.step, entry.kind != "training", entry.name))


def list_hub_checkpoints(
    repo_id: str, *, token: str | None = None, endpoint: str | None = None, include_main: bool = True
) -> list[CheckpointEntry]:
    """The `step-XXXXXXX` branches (and `main`) of a Hub model repo, with step, tokens seen and loss.

    Args:
        repo_id: the model repo.
        token: for private repos; `huggingface_hub`'s own lookup when `None`.
        endpoint: the Hub URL (`HF_ENDPOINT` when `None`).
        include_main: also list `main` when it holds a model.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        refs = api.list_repo_refs(repo_id)
    except RepositoryNotFoundError:
        raise CheckpointsError(
            f"Hub repo {repo_id!r} was not found at {api.endpoint}. Check the id; for a private repo set HF_TOKEN to a "
            "token that can read it."
        ) from None
    except Exception as error:
        # No connection (DNS, refused, offline mode): the network, not the request. httpx's errors are not OSErrors.
        if not isinstance(error, OSError) and "Connect" not in type(error).__name__:
            raise
        raise CheckpointsError(
            f"Cannot reach the Hub at {api.endpoint} to list {repo_id!r} ({type(error).__name__}: {error}). Check the "
            "connection, or, if you meant a local folder, check its path: no such directory."
        ) from None
    entries = []
    for branch in refs.branches:
        step = step_of(branch.name)
        if step is None and not (include_main and branch.name == "main"):
            continue
        try:
            path = api.hf_hub_download(repo_id, CHECKPOINT_METADATA_FILE, revision=branch.target_commit)
            metadata = _read_json(Path(path))
        except (EntryNotFoundError, RevisionNotFoundError):
            metadata = {}
            if branch.name == "main" and not api.file_exists(repo_id, "config.json", revision=branch.target_commit):
                continue  # an empty main (only .gitattributes) is not a checkpoint
        metadata_step = _int_or_none(metadata.get("step"))
        entries.append(
            CheckpointEntry(
                name=branch.name,
                step=metadata_step if metadata_step is not None else (step or 0),
                tokens_seen=_int_or_none(metadata.get("tokens_seen")),
                loss=_float_or_none(metadata.get("loss")),
                revision=branch.name,
                kind="hub",
            )
        )
    return sorted(entries, key=lambda entry: (entry.step, entry.name == "main", entry.name))


def _refuse_missing_local_path(source: str, path: Path) -> None:
    """A `source` that can only be a local path (`./x`, `/x`, `~/x`, `a/b/c`), or whose first part is an existing
    local folder (`outputs/genesis-tny` next to `outputs/`), is a mistyped path, not a Hub repo id."""
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    parent = path.parent if str(path.parent) not in ("", ".") else None
    if path.exists() and not path.is_dir():
        raise CheckpointsError(
            f"{source!r} is a file; pass a run's output directory (the folder holding checkpoints/)."
        )
    if not looks_local and (parent is None or not parent.is_dir()):
        return
    close = []
    if parent is not None and parent.is_dir():
        siblings = [child.name for child in parent.iterdir() if child.is_dir()]
        close = [str(parent / name) for name in difflib.get_close_matches(path.name, siblings, n=3)]
    hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    raise CheckpointsError(
        f"No local directory {source!r}.{hint} Pass a run's output directory, or a Hub repo id like "
        "'your-name/genesis-1b' (one that does not name a local folder)."
    )


def path_in_run(run_dir: Path, entry: CheckpointEntry) -> Path:
    """A listed local checkpoint's folder relative to `run_dir`, which must hold it: serving or shipping a run never
    reaches outside it through a symlink.

    Raises:
        CheckpointsError: the folder lies outside `run_dir`; the message names the symlink.
    """
    path = Path(entry.path)
    if not path.resolve().is_relative_to(run_dir):
        link = next((part for part in [path, *path.parents] if part.is_symlink()), path)
        raise CheckpointsError(
            f"Refused checkpoint {entry.name!r}: {link} is a symlink to {link.resolve()}, outside the run folder "
            f"{run_dir}; only what lies inside the run is served or shipped. Copy the folder into the run instead of "
            "linking it."
        )
    return path.resolve().relative_to(run_dir)


def list_run_checkpoints(
    source: str | Path, *, token: str | None = None, endpoint: str | None = None
) -> list[CheckpointEntry]:
    """The checkpoints of a local run directory or a Hub repo, oldest first.

    Args:
        source: a local directory (run output dir, checkpoint or exported folder) or a Hub repo id.
        token: Hub token for private repos.
        endpoint: the Hub URL (`HF_ENDPOINT` when `None`).

    Raises:
        CheckpointsError: `source` is neither an existing directory nor a valid repo id, or the repo does not exist.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return list_local_checkpoints(path)
    _refuse_missing_local_path(str(source), path)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise CheckpointsError(
            f"{str(source)!r} is neither a local directory nor a valid Hub repo id; pass a run's output directory or "
            "a repo id like 'your-name/genesis-1b'."
        ) from None
    if "/" not in str(source):
        raise CheckpointsError(
            f"{str(source)!r} is not a local directory, and as a Hub repo id it lacks its namespace; pass "
            "'namespace/name' (e.g. 'your-name/genesis-1b') or an existing directory."
        )
    return list_hub_checkpoints(str(source), token=token, endpoint=endpoint)


def format_table(entries: list[CheckpointEntry]) -> str:
    """A plain-text table of the entries."""
    rows = [("name", "step", "tokens_seen", "loss", "location")]
    for entry in entries:
        rows.append(
            (
                entry.name,
                str(entry.step),
                f"{entry.tokens_seen:,}" if entry.tokens_seen is not None else "-",
                f"{entry.loss:.4f}" if entry.loss is not None else "-",
                f"revision {entry.revision}" if entry.revision else str(entry.path),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _run_checkpoints(args: argparse.Namespace) -> int:
    try:
        entries = list_run_checkpoints(args.source)
    except CheckpointsError as error:
        print(f"genesis-hf checkpoints: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([entry.to_json() for entry in entries], indent=2))
    elif entries:
        print(format_table(entries))
    else:
        print(f"No checkpoints in {args.source}.")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf checkpoints` to the top-level `subparsers`."""
    help = "List the checkpoints of a local run or of a Hub repo."
    parser = add_command(subparsers, "checkpoints", help=help, description=__doc__, func=_run_checkpoints)
    parser.add_argument("source", help="A run's output directory, or a Hub repo id (uses HF_TOKEN for private repos).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


__all__ = [
    "CheckpointEntry",
    "CheckpointsError",
    "format_table",
    "list_hub_checkpoints",
    "list_local_checkpoints",
    "list_run_checkpoints",
    "path_in_run",
    "register_cli",
]
