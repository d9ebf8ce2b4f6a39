"""Relaunching an SFT or DPO command continues the run: the output folder is checked, the newest complete
`checkpoint-N` is chosen and checked, and `metrics.jsonl` continues where that checkpoint stands.

- `plan_run` (every process, before anything loads): the rule every training run follows
  (`genesis_hf.pretrain.run_folder`: a `final/` that is not this run's, results and no checkpoint), then the run's
  settings against those recorded in `run_settings.json` by the launch that wrote the folder (other settings are
  refused; without checkpoints `--overwrite_output_dir true` starts afresh), then the checkpoint to resume from.
- A checkpoint is complete when its `trainer_state.json` parses as JSON with `global_step` equal to the N of its name
  and its weights are there; the Trainer writes the state last, so a save cut short has none, or a cut one. An
  incomplete checkpoint is skipped, never loaded and never deleted (the run writes it again when it gets there).
- Before resuming, the checkpoint's pickles (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, `*.bin`) must load
  with `torch.load(weights_only=True)`: tensors and plain containers, no code. transformers' Trainer loads them that
  way too; the check refuses a planted file with one line before any model loads. `training_args.bin` is never
  loaded (the Trainer writes it for humans; nothing here reads it).
- An FSDP run's checkpoint also holds DCP folders (`pytorch_model_fsdp_0/`, `optimizer_0/`) that Accelerate loads
  with torch's default reader and planner: they unpickle `.metadata` as it is, and each bytes entry it declares
  without `weights_only` (any object, any code). So every `.metadata` is read with the restricted unpickler of
  `genesis_hf.pretrain.checkpoint` (DCP's own classes only), and every bytes entry (the optimizer's `param_groups`
  values: lr, betas, the parameter names...) is read from its shard and must load with `weights_only=True`.
- `start_run` (main process, just before training): records the settings and, in `metrics.jsonl`, drops what the
  killed launch logged after the resumed step and marks the restart, so every step appears once.
"""

import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from genesis_hf.args import ConfigError
from genesis_hf.layout import (
    CHECKPOINT_METADATA_FILE,
    METRICS_FILE,
    RUN_SETTINGS_FILE,
    TRAINER_STATE_FILE,
    TRL_CHECKPOINT,
    has_weights,
)
from genesis_hf.pretrain.run_folder import check_run_folder, drop_partial_last_line

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# The Trainer pickles its TrainingArguments there for humans and never loads it; neither does genesis_hf.
NEVER_LOADED = ("training_args.bin",)
# Settings that may differ between launches of one run: where it writes, how it logs, saves and publishes.
LAUNCH_ONLY_SETTINGS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "disable_tqdm", "report_to",
    "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "push_to_hub",
    "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy", "hub_token", "hub_always_push", "save_steps",
    "save_strategy", "save_total_limit", "save_on_each_node", "logging_steps", "logging_strategy",
    "logging_first_step", "log_level", "log_level_replica", "log_on_each_node", "skip_memory_metrics", "eval_tasks",
    "eval_limit", "eval_include_path", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_pin_memory", "dataset_num_proc", "local_rank", "ddp_timeout",
}  # fmt: skip
logger = logging.getLogger(__name__)


class ResumeError(ConfigError):
    """The run cannot resume as asked; the message names the checkpoint, the problem and the fix."""


@dataclasses.dataclass
class RunPlan:
    """What a launch does with its output folder.

    Args:
        output_dir: the run's folder.
        settings: the run's settings, as `run_settings.json` records them.
        checkpoint: the `checkpoint-N` to resume from, or `None` for a start from step 0.
        step: the step of `checkpoint` (0 without one).
    """

    output_dir: Path
    settings: dict[str, Any]
    checkpoint: Path | None = None
    step: int = 0


def checkpoint_problem(path: str | Path, world_size: int = 1) -> str | None:
    """Why the TRL checkpoint folder `path` (`checkpoint-N`) is not complete, or `None` when it is.

    Args:
        path: the folder.
        world_size: the processes of the run: each writes its own `rng_state_<rank>.pth`, with no barrier before the
            main process writes `trainer_state.json`, so a multi-process checkpoint needs all of them.
    """
    path = Path(path)
    match = TRL_CHECKPOINT.match(path.name)
    if match is None or not path.is_dir():
        return "it is not a checkpoint-N folder"
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_FILE} (the save was cut short)"
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE_FILE} does not parse ({type(error).__name__}; the save was cut short)"
    step = state.get("global_step") if isinstance(state, dict) else None
    if step != int(match.group(1)):
        return f"its {TRAINER_STATE_FILE} says global_step {step!r}, not {match.group(1)}"
    sharded = any(child.is_dir() and child.name.startswith("pytorch_model_fsdp") for child in path.iterdir())
    if not (has_weights(path) or sharded or any((path / name).is_file() for name in ADAPTER_WEIGHTS)):
        return "it has no model weights"
    if world_size > 1 and any(path.glob("rng_state_*.pth")):
        missing = [
            f"rng_state_{rank}.pth" for rank in range(world_size) if not (path / f"rng_state_{rank}.pth").is_file()
        ]
        if missing:
            return f"it lacks {', '.join(missing)} (the save was cut short)"
    return None


def complete_checkpoints(
    output_dir: str | Path, world_size: int = 1
) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """The complete `checkpoint-N` folders of `output_dir` by step, and the incomplete ones with their problem."""
    output_dir = Path(output_dir)
    complete, skipped = [], []
    if not output_dir.is_dir():
        return complete, skipped
    for path in output_dir.iterdir():
        match = TRL_CHECKPOINT.match(path.name)
        if match is None or not path.is_dir():
            continue
        problem = checkpoint_problem(path, world_size)
        if problem is None:
            complete.append((int(match.group(1)), path))
        else:
            skipped.append((path, problem))
    return sorted(complete), sorted(skipped)


def check_pickles(checkpoint: str | Path) -> None:
    """Refuse a checkpoint whose pickled files hold anything but tensors and plain containers.

    Each `.pt`/`.pth`/`.bin` file (but `training_args.bin`, which nothing loads) is opened the way transformers'
    Trainer opens it on resume, `torch.load(weights_only=True)` with numpy's arrays allowed, memory-mapped so that the
    tensors are not read; then the DCP folders of an FSDP run (`check_dcp_folders`).

    Raises:
        ResumeError: naming the file and the fix.
    """
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    checkpoint = Path(checkpoint)
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix not in PICKLE_SUFFIXES or path.name in NEVER_LOADED or not path.is_file():
            continue
        try:
            with safe_globals():
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip torch.save
        except pickle.UnpicklingError as error:
            raise ResumeError(
                f"{path} holds objects other than tensors (torch.load with weights_only refuses it: "
                f"{_weights_only_reason(error)}); "
                "loading it could run code. The run did not write this: move the checkpoint out of the output "
                f"folder (the run then resumes from an earlier one), or pass --resume_from_checkpoint with another."
            ) from None
        except Exception as error:
            raise ResumeError(
                f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]}); move the checkpoint out of the "
                "output folder (the run then resumes from an earlier one), or pass --resume_from_checkpoint with "
                "another."
            ) from None
    check_dcp_folders(checkpoint)


def _weights_only_reason(error: Exception) -> str:
    """The line of a `torch.load(weights_only=True)` refusal that names what was refused (`Unsupported global: GLOBAL
    io.open ...`), without torch's advice to load it with `weights_only=False` or its terminal colours."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error: (.+?)(?: Please |\n|$)", text)
    reason = match.group(1) if match else next(iter(text.strip().splitlines()), type(error).__name__)
    return re.sub(r"\x1b\[[0-9;]*m", "", reason).strip()[:200]


def check_dcp_folders(checkpoint: str | Path) -> None:
    """Refuse a checkpoint whose DCP folders (an FSDP run's `pytorch_model_fsdp_0/`, `optimizer_0/`) would run code
    when Accelerate loads them.

    Each `.metadata` is unpickled with DCP's own classes only (`unpickle_dcp_metadata`), and each bytes entry it
    declares is read from its shard file and opened with `torch.load(weights_only=True)`: what Accelerate's sharded
    save writes there (the optimizer's `param_groups` values) passes; a pickled object does not. Nothing is
    unpickled otherwise, and the tensors are not read.

    Raises:
        ResumeError: naming the checkpoint, the DCP folder, the entry and the fix.
    """
    import pickle

    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from transformers.trainer_pt_utils import safe_globals

    from genesis_hf.layout import DCP_METADATA_FILE
    from genesis_hf.pretrain.checkpoint import unpickle_dcp_metadata

    checkpoint = Path(checkpoint)
    fix = (
        "The run did not write this: move the checkpoint out of the output folder (the run then resumes from an "
        "earlier one), or pass --resume_from_checkpoint with another."
    )
    for metadata_path in sorted(checkpoint.rglob(DCP_METADATA_FILE)):
        folder = metadata_path.parent
        where = f"{checkpoint}: {folder.relative_to(checkpoint)}/{DCP_METADATA_FILE}"
        if not metadata_path.is_file():
            continue
        try:
            metadata = unpickle_dcp_metadata(folder)
            declared = dict(metadata.state_dict_metadata or {})
            storage = dict(metadata.storage_data or {})
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ResumeError(
                f"Checkpoint {where} is not DCP metadata ({reason}); loading it could run code. {fix}"
            ) from None
        except Exception as error:  # a truncated or planted pickle raises anything from EOFError to TypeError
            raise ResumeError(
                f"Checkpoint {where} cannot be read ({type(error).__name__}: {str(error)[:200]}). {fix}"
            ) from None
        for index, info in storage.items():
            fqn = getattr(index, "fqn", index)
            if not isinstance(declared.get(fqn), BytesStorageMetadata):
                continue  # a tensor: DCP reads it with torch.load(weights_only=True) itself
            entry = f"Checkpoint {checkpoint}: entry {fqn!r} of {folder.relative_to(checkpoint)}/"
            try:
                data = _dcp_entry_bytes(folder, info)
                with safe_globals():
                    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                raise ResumeError(
                    f"{entry} holds objects other than tensors and plain values (torch.load with weights_only "
                    f"refuses it: {_weights_only_reason(error)}); Accelerate would unpickle it with "
                    f"weights_only=False, which could run code. {fix}"
                ) from None
            except Exception as error:
                raise ResumeError(
                    f"{entry} cannot be read ({type(error).__name__}: {str(error)[:200]}). {fix}"
                ) from None


def _dcp_entry_bytes(folder: Path, info) -> bytes:
    """The bytes of one DCP entry, as `FileSystemReader.read_data` reads them: `info.length` bytes at `info.offset` of
    the shard `info.relative_path`, through the stream transforms the entry names (none unless the writer had some)."""
    relative_path, offset, length = info.relative_path, info.offset, info.length
    if not (isinstance(relative_path, str) and isinstance(offset, int) and isinstance(length, int)):
        raise ValueError(f"its storage record is not a file slice ({info!r})")
    shard = folder / relative_path
    if not shard.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"it names a shard outside its folder ({relative_path!r})")
    if offset < 0 or length < 0 or shard.stat().st_size < offset + length:
        raise ValueError(f"shard {relative_path} holds {shard.stat().st_size} bytes, not {offset} + {length}")
    with open(shard, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    descriptors = getattr(info, "transform_descriptors", None) or ()
    if descriptors:  # DCP's own extensions (e.g. zstd), applied as its reader applies them
        from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

        data = _StorageReaderTransforms().transform_load_stream(None, descriptors, io.BytesIO(data)).read()
    return data


def run_settings(recipe: str, *arguments) -> dict[str, Any]:
    """The settings that make a run what it is: every field of the recipe's argument dataclasses but the
    launch-only ones (`LAUNCH_ONLY_SETTINGS`), as JSON values."""
    values: dict[str, Any] = {"recipe": recipe, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    for argument in arguments:
        fields = argument.to_dict() if hasattr(argument, "to_dict") else dataclasses.asdict(argument)
        values.update({key: value for key, value in fields.items() if key not in LAUNCH_ONLY_SETTINGS})
    return json.loads(json.dumps(values, default=str))


def _changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    keys = sorted((recorded.keys() | settings.keys()) - LAUNCH_ONLY_SETTINGS)
    missing = object()
    return [
        f"{key}: {recorded.get(key, missing)!r} -> {settings.get(key, missing)!r}".replace(repr(missing), "(unset)")
        for key in keys
        if recorded.get(key, missing) != settings.get(key, missing)
    ]


def plan_run(training_args, settings: dict[str, Any], *, overwrite_output_dir: bool = False) -> RunPlan:
    """Check the output folder and choose the checkpoint to resume from; reads only, on every process.

    Checkpoints are never replaced by a run of other settings (`--overwrite_output_dir` does not change that: the
    two runs' checkpoints would mix); a fresh start over results without checkpoints (`final/`, `metrics.jsonl`)
    needs `--overwrite_output_dir true`, as in pretraining.

    Args:
        training_args: the recipe's `SFTConfig`/`DPOConfig` (`output_dir`, `resume_from_checkpoint`).
        settings: `run_settings(...)` of this launch.
        overwrite_output_dir: start afresh from step 0 over a previous run's results that no checkpoint resumes.

    Raises:
        ConfigError: the folder would lose results (see `genesis_hf.pretrain.run_folder.check_run_folder`), or it
            holds a run of other settings.
        ResumeError: no checkpoint is complete, `--resume_from_checkpoint` is not a complete checkpoint, or the
            chosen checkpoint holds a pickle that could run code.
    """
    output_dir = Path(training_args.output_dir)
    explicit = training_args.resume_from_checkpoint
    world_size = settings.get("world_size", 1)
    complete, skipped = complete_checkpoints(output_dir, world_size)
    check_run_folder(
        output_dir,
        final_marker=CHECKPOINT_METADATA_FILE,
        resumable=explicit is not None or bool(complete),
        overwrite_output_dir=overwrite_output_dir,
    )
    recorded = _read_settings(output_dir)
    changed = _changed_settings(recorded, settings) if recorded is not None else []
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        if complete or skipped:
            raise ConfigError(
                f"output_dir={str(output_dir)!r} holds checkpoints of a run with other settings ({shown}). Relaunch "
                "with the same settings to resume it, or pass a new --output_dir (checkpoints are never replaced; "
                "move them elsewhere first to start afresh there)."
            )
        if not overwrite_output_dir:
            raise ConfigError(
                f"output_dir={str(output_dir)!r} holds a run with other settings ({shown}). Relaunch with the same "
                "settings, pass a new --output_dir, or --overwrite_output_dir true to start afresh there "
                "(metrics.jsonl keeps the old records and marks the restart; final/ is replaced at the end)."
            )
    if not complete and skipped and explicit is None and not overwrite_output_dir:
        raise ResumeError(
            f"None of the checkpoints in {output_dir} is complete ({skipped[0][0].name}: {skipped[0][1]}). Pass "
            "--resume_from_checkpoint with a complete one, or --overwrite_output_dir true to start afresh from step 0 "
            "(the incomplete ones are written again as the run reaches them)."
        )
    plan = RunPlan(output_dir=output_dir, settings=settings)
    if explicit is not None:
        checkpoint = Path(explicit)
        problem = checkpoint_problem(checkpoint, world_size)
        if problem is not None:
            raise ResumeError(f"--resume_from_checkpoint {checkpoint} is not usable: {problem}.")
        plan.checkpoint, plan.step = checkpoint, int(TRL_CHECKPOINT.match(checkpoint.name).group(1))
    elif complete:
        plan.step, plan.checkpoint = complete[-1]
    if plan.checkpoint is not None:
        for path, problem in skipped:
            logger.warning(
                "Skipping %s: %s. It is left as it is; the run writes it again at that step.", path, problem
            )
        check_pickles(plan.checkpoint)
    return plan


def _read_settings(output_dir: Path) -> dict[str, Any] | None:
    try:
        recorded = json.loads((output_dir / RUN_SETTINGS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{output_dir / RUN_SETTINGS_FILE} does not parse ({type(error).__name__}); it records the settings of "
            "the run in this folder. Pass a new --output_dir, or --overwrite_output_dir true to start afresh."
        ) from None
    return recorded if isinstance(recorded, dict) else None


def start_run(plan: RunPlan) -> None:
    """On the main process, just before training: record the run's settings, and let `metrics.jsonl` continue at the
    resumed step (records of later steps, logged by a launch that was killed, are dropped; a restart record says
    where this launch starts)."""
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    settings_path = plan.output_dir / RUN_SETTINGS_FILE
    temporary = settings_path.with_name(f".{RUN_SETTINGS_FILE}.{os.getpid()}")
    temporary.write_text(json.dumps(plan.settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, settings_path)
    metrics_path = plan.output_dir / METRICS_FILE
    drop_partial_last_line(metrics_path)
    if not (metrics_path.is_file() and metrics_path.stat().st_size):
        return
    kept, dropped = [], 0
    for line in metrics_path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None
        if plan.checkpoint is not None and isinstance(step, int) and step > plan.step:
            dropped += 1
        else:
            kept.append(line)
    restart = {"event": "restart", "step": plan.step, "time": time.time()}
    restart["resumed_from"] = str(plan.checkpoint) if plan.checkpoint is not None else None
    restart["dropped_records"] = dropped
    kept.append(json.dumps(restart, allow_nan=False) + "\n")
    temporary = metrics_path.with_name(f".{METRICS_FILE}.{os.getpid()}")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, metrics_path)
    if plan.checkpoint is not None:
        logger.info(
            "Resuming from %s (step %d); %d record(s) logged after it by the interrupted launch were dropped from %s.",
            plan.checkpoint,
            plan.step,
            dropped,
            METRICS_FILE,
        )


def check_training_settings(training_args) -> None:
    """Refuse, in one line and before anything is written, settings that cannot train: a learning rate that is not a
    positive number, `max_steps` 0, or no epochs.

    Raises:
        ConfigError: naming the value and the fix.
    """
    learning_rate = training_args.learning_rate
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ConfigError(f"learning_rate={learning_rate!r}; pass a positive number, e.g. --learning_rate 1e-5.")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ConfigError(
            f"max_steps={training_args.max_steps}; pass a positive number of optimizer steps, or -1 to train "
            "num_train_epochs epochs."
        )
    epochs = training_args.num_train_epochs
    if training_args.max_steps == -1 and (not math.isfinite(epochs) or epochs <= 0):
        raise ConfigError(
            f"num_train_epochs={epochs!r} with max_steps -1 trains nothing; pass a positive number of epochs (e.g. "
            "--num_train_epochs 1) or --max_steps N."
        )


__all__ = [
    "ResumeError",
    "RunPlan",
    "check_dcp_folders",
    "check_pickles",
    "check_training_settings",
    "checkpoint_problem",
    "complete_checkpoints",
    "plan_run",
    "run_settings",
    "start_run",
]
