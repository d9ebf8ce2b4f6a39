"""Training checkpoints that survive anything: sharded, complete-or-invisible, checked on resume.

Layout (the "Training checkpoints" contract of docs/CONTRACTS.md):

    <output_dir>/checkpoints/step-0001200/
        model/              DCP shards of the model: every rank writes its own (`__<rank>_0.distcp`) + `.metadata`
        optimizer/          DCP shards of the AdamW state (exp_avg, exp_avg_sq, step per parameter)
        trainer_state.json  step, tokens_seen, loss, lr, wall time, scheduler state, every rank's data loader state
        rng_states.json     every rank's python / numpy / torch (/ CUDA) generator states
        run_config.yaml     the resolved PretrainArguments
        config.json         the GenesisConfig
        tokenizer/          the tokenizer, so a checkpoint is usable on its own
        checksums.json      CRC-32 of every shard file, written after the shards and checked before they are loaded

Why it is built this way:

- The seed run hung forever gathering a full state dict over NCCL across PCIe. Here each rank writes its own shards
  with `torch.distributed.checkpoint` (model and optimizer through `get_state_dict`, so FSDP2's DTensor shards stay
  sharded), and the few collectives a save needs go over a dedicated gloo group, never NCCL.
- A checkpoint is written to `step-XXXXXXX.tmp-<run id>` and renamed to `step-XXXXXXX` by rank 0 only after every
  rank's shards are on disk; a crash at any moment leaves either the complete checkpoint or an ignored `.tmp-*`.
  With `async_save`, `torch.distributed.checkpoint.async_save` copies the state to CPU memory synchronously and
  writes it from a thread of its own (one upload per DCP folder, each on its own gloo group); the rename happens once
  both uploads are done (`CheckpointManager.poll`, once per step).
- The seed run once restored the weights without the AdamW state: the loss looked fine for ~50 steps, then diverged,
  and ~1,000 steps were lost. `load_training_checkpoint` refuses a checkpoint whose optimizer state is missing or
  does not match the model (`OptimizerStateError`) unless `allow_fresh_optimizer` is set.
- A checkpoint counts only if it validates (`validate_checkpoint`): JSON files of the right structure, DCP metadata,
  every shard present with its bytes, and (before loading) the shard checksums. Rotation, resume and export see only
  such checkpoints, so a stub folder or a corrupted shard is skipped like a truncated one, never trusted.
- DCP's `.metadata` is a pickle, and a checkpoint folder may come from anywhere (a copy, a download). It is read with
  a restricted unpickler that builds only DCP's own metadata classes (`read_dcp_metadata`), for validation and for
  loading alike (`SafeFileSystemReader`), so a planted `.metadata` cannot run code. It may declare tensors and the
  optimizer's primitive `param_groups` values only (a bytes entry is an object DCP would `torch.load` with
  `weights_only=False`), and those are loaded by `safe_load_planner` with `weights_only=True`.

Events (`genesis_hf.events`): every rank announces `on_checkpoint_staged` once its shards are written and before the
rename (the test suite's fault injector kills the process there), and rank 0 announces `on_checkpoint_saved` once the
checkpoint is visible; a subscriber's `may_delete` can hold a checkpoint back from rotation (the Hub pusher).
"""

import base64
import contextlib
import errno
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
import warnings
import zlib
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from genesis_hf.args import ConfigError
from genesis_hf.events import Events
from genesis_hf.layout import (
    CHECKSUMS_FILE,
    DCP_METADATA_FILE,
    MODEL_CONFIG_FILE,
    MODEL_DIR,
    OPTIMIZER_DIR,
    RNG_STATES_FILE,
    RUN_CONFIG_FILE,
    STEP_DELETING_DIR,
    STEP_DIR,
    STEP_TMP_DIR,
    TOKENIZER_DIR,
    TRAINER_STATE_FILE,
    checkpoint_name,
    checkpoints_root,
)
from genesis_hf.model.configuration_genesis import SIZE_FIELDS

from . import distributed

logger = logging.getLogger(__name__)

# DCP warns on every call without a process group that it assumes a single process; in one process that is the intent.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable).*single process")
# GenesisConfig fields that change the shapes or the function of the weights: a checkpoint is only compatible with a
# model that agrees on all of them. Every size is one.
ARCHITECTURE_FIELDS = (
    *SIZE_FIELDS,
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


class OptimizerStateError(CheckpointError):
    """The checkpoint's optimizer state is missing or does not match the model."""


@dataclass
class CheckpointInfo:
    """A complete checkpoint.

    Args:
        path: its folder, `<output_dir>/checkpoints/step-XXXXXXX`.
        step: optimizer steps done when it was written.
        tokens_seen: training tokens consumed by then (all ranks).
        loss: training loss of its last step.
    """

    path: Path
    step: int
    tokens_seen: int
    loss: float | None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    with open(Path(path) / TRAINER_STATE_FILE) as handle:
        return json.load(handle)


def _step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every published checkpoint folder (`step-XXXXXXX`), oldest first, intact or not."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir() if (match := STEP_DIR.match(path.name))]
    return sorted((step, path) for step, path in found if path.is_dir())


def has_checkpoint_folders(output_dir: str | Path) -> bool:
    """Whether `checkpoints/` holds any published `step-XXXXXXX` folder, intact or not."""
    return bool(_step_dirs(output_dir))


def list_checkpoints(output_dir: str | Path) -> list[CheckpointInfo]:
    """The complete checkpoints of a run, oldest first.

    Only renamed folders (`step-XXXXXXX`) that pass `validate_checkpoint` (structure, metadata, shard sizes; not the
    checksums, which need every byte read) count; interrupted saves (`*.tmp-*`), folders being deleted and stubs are
    ignored. Rotation decides on this list, so it never counts (or keeps in place of a good one) a broken folder.

    Args:
        output_dir: the run's output directory (the one holding `checkpoints/`).
    """
    found = []
    for step, path in _step_dirs(output_dir):
        if validate_checkpoint(path) is not None:
            continue
        state = read_trainer_state(path)
        found.append(
            CheckpointInfo(path=path, step=step, tokens_seen=state.get("tokens_seen"), loss=state.get("loss"))
        )
    return found


# DCP's `.metadata` pickles only these (checked against torch 2.13): its dataclasses, torch.Size, dtypes, layouts and
# the paths of the shard files. Anything else in a `.metadata` is refused before it is built.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata classes (and torch dtypes); any other global is an `UnpicklingError`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a DCP metadata class; this .metadata was not written by torch.distributed."
            "checkpoint and is not loaded"
        )


def unpickle_dcp_metadata(folder: str | Path):
    """The DCP `Metadata` of any DCP folder, unpickled with only DCP's own classes allowed (never runs code), whatever
    entries it declares. `read_dcp_metadata` adds the trainer's own rule on entries.

    Args:
        folder: a DCP folder (one holding `.metadata`).

    Raises:
        pickle.UnpicklingError: the file references anything else, or is not DCP metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = _DCPMetadataUnpickler(io.BytesIO((Path(folder) / DCP_METADATA_FILE).read_bytes())).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def read_dcp_metadata(folder: str | Path):
    """The DCP `Metadata` of a checkpoint folder, unpickled with only DCP's own classes allowed (never runs code).

    Args:
        folder: a DCP folder (`model/` or `optimizer/` of a checkpoint).

    Raises:
        pickle.UnpicklingError: the file references anything else, is not DCP metadata, or declares a bytes entry
            other than the optimizer's `param_groups` values.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = unpickle_dcp_metadata(folder)
    # A bytes entry is a torch.save'd object that DCP's default planner unpickles with weights_only=False. Model and
    # optimizer states are tensors, plus the primitive param_groups values the trainer writes itself.
    for key, entry in (metadata.state_dict_metadata or {}).items():
        if isinstance(entry, BytesStorageMetadata) and not _PRIMITIVE_ENTRY.fullmatch(str(key)):
            raise pickle.UnpicklingError(
                f"it declares {key!r} as a pickled object, not a tensor; a checkpoint written by genesis_hf holds "
                "only tensors there, so it is not loaded"
            )
    return metadata


# The only non-tensor entries the trainer's checkpoints hold: AdamW's param_groups values (lr, betas, params, ...),
# loaded with torch.load(weights_only=True) by `SafeLoadPlanner`.
_PRIMITIVE_ENTRY = re.compile(r"optimizer\.param_groups\.\d+\.[A-Za-z_]+")


def safe_load_planner():
    """DCP's default load planner, except that bytes entries are read with `torch.load(weights_only=True)`: primitives
    and tensors only, never an object's code (DCP's own planner uses `weights_only=False`)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"its entry {read_item.dest_index.fqn!r} holds a pickled object, not a primitive value the trainer "
                    "writes; it was not unpickled"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with `.metadata` read by `read_dcp_metadata` instead of a plain `pickle.load`."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def load_dcp(state: dict[str, Any], folder: str | Path, **kwargs: Any) -> None:
    """`torch.distributed.checkpoint.load` of `folder` into `state` with `safe_reader` and `safe_load_planner`.

    Raises:
        CheckpointError: an entry holds something other than tensors and primitives (one line, nothing unpickled).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=safe_reader(folder), planner=safe_load_planner(), **kwargs)
    except CheckpointException as error:  # a BaseException: one per failed rank, each with its traceback
        for failure in error.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, CheckpointError):
                raise CheckpointError(f"Checkpoint folder {folder} is refused: {cause}.") from None
        raise


def safe_reader(folder: str | Path):
    """A DCP storage reader for `folder` that unpickles its `.metadata` with `read_dcp_metadata`."""
    return _safe_reader_class()(str(folder))


def _dcp_problem(folder: Path) -> str | None:
    """Why the DCP checkpoint in `folder` is unreadable (missing metadata, missing or truncated shard), or `None`."""
    if not (folder / DCP_METADATA_FILE).is_file():
        return f"{folder.name}/{DCP_METADATA_FILE} is missing"
    try:
        metadata = read_dcp_metadata(folder)
    except Exception as error:  # a truncated or planted pickle raises anything from EOFError to UnpicklingError
        return f"{folder.name}/{DCP_METADATA_FILE} is unreadable ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for storage in (metadata.storage_data or {}).values():
        end = storage.offset + storage.length
        needed[storage.relative_path] = max(needed.get(storage.relative_path, 0), end)
    for relative_path, size in sorted(needed.items()):
        shard = folder / relative_path
        if not shard.resolve().is_relative_to(folder.resolve()):
            return f"{folder.name}/{DCP_METADATA_FILE} names a shard outside the checkpoint ({relative_path!r})"
        if not shard.is_file():
            return f"shard {folder.name}/{relative_path} is missing"
        if shard.stat().st_size < size:
            return f"shard {folder.name}/{relative_path} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def _read_json_file(path: Path) -> tuple[Any, str | None]:
    try:
        with open(path) as handle:
            return json.load(handle), None
    except (OSError, ValueError) as error:
        return None, f"{path.name} is missing or unreadable ({type(error).__name__})"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _state_problem(path: Path, resumable: bool) -> str | None:
    """What is structurally wrong with `trainer_state.json` and `rng_states.json` (parsing is not enough: `{}` and
    `[]` parse), or `None`. `resumable` also requires what a resume reads: the scheduler and each rank's RNG state."""
    state, problem = _read_json_file(path / TRAINER_STATE_FILE)
    if problem:
        return problem
    if not isinstance(state, dict) or not _is_count(state.get("step")):
        return f"{TRAINER_STATE_FILE} has no step count (it holds {str(state)[:60]!r})"
    loader_states = state.get("data_loader_states")
    if not isinstance(loader_states, list) or not loader_states:
        return f"{TRAINER_STATE_FILE} has no data_loader_states list (one entry per rank)"
    if resumable and not isinstance(state.get("scheduler"), dict):
        return f"{TRAINER_STATE_FILE} has no scheduler state"
    rng_states, problem = _read_json_file(path / RNG_STATES_FILE)
    if problem:
        return problem
    if not isinstance(rng_states, list) or len(rng_states) != len(loader_states):
        return f"{RNG_STATES_FILE} must list {len(loader_states)} rank state(s), it holds {str(rng_states)[:60]!r}"
    needed = ("python", "numpy", "torch") if resumable else ()
    if not all(isinstance(rank, dict) and all(key in rank for key in needed) for rank in rng_states):
        return f"{RNG_STATES_FILE} has a rank entry without its python/numpy/torch generator states"
    return None


def _crc32(path: Path) -> str:
    checksum = 0
    with open(path, "rb") as handle:
        while block := handle.read(16 << 20):
            checksum = zlib.crc32(block, checksum)
    return f"{checksum:08x}"


def _checksums(path: Path, files: list[str]) -> dict[str, str]:
    # CRC-32 catches flipped or zeroed bytes (what disks and copies do) at ~1.3 GB/s on one core, twice SHA-256's
    # speed here; zlib releases the GIL, so one thread per shard file uses every core (a 1B run's 12 GB of shards).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(lambda name: _crc32(path / name), files)))


def folder_checksums(folder: Path) -> dict[str, str]:
    """CRC-32 of every file of a DCP folder, keyed as in `checksums.json` (`model/__0_0.distcp`)."""
    names = sorted(file.name for file in folder.iterdir() if file.is_file()) if folder.is_dir() else []
    return {f"{folder.name}/{name}": checksum for name, checksum in _checksums(folder, names).items()}


def write_checksums(path: Path, checksums: dict[str, str]) -> None:
    """Record the CRC-32 of every file of `model/` and `optimizer/` in `checksums.json` (rank 0, once the shards of
    every rank are written, before the rename that makes the checkpoint visible).

    Args:
        path: the staging folder of a checkpoint.
        checksums: the `folder_checksums` of both DCP folders, taken by their writers (`_checksumming_writer_class`).
    """
    _write_json(path / CHECKSUMS_FILE, {"crc32": dict(sorted(checksums.items()))})


def checksum_problem(path: str | Path, parts: tuple[str, ...] = (MODEL_DIR, OPTIMIZER_DIR)) -> str | None:
    """Which shard's bytes differ from the checksum recorded at save, or `None` (also for checkpoints written before
    checksums were recorded, which have no `checksums.json`).

    Args:
        path: a `step-XXXXXXX` folder.
        parts: the DCP folders to check (`("model",)` when only the weights will be read: a third of the bytes).
    """
    path = Path(path)
    if not (path / CHECKSUMS_FILE).exists():
        return None
    recorded, problem = _read_json_file(path / CHECKSUMS_FILE)
    sums = recorded.get("crc32") if isinstance(recorded, dict) else None
    if problem or not isinstance(sums, dict):
        return problem or f"{CHECKSUMS_FILE} has no crc32 mapping of shard file to checksum"
    # A removed optimizer/ as a whole is the resume policy's business (load_training_checkpoint), not corruption.
    sums = {
        name: value for name, value in sums.items() if name.split("/")[0] in parts and (path / name).parent.is_dir()
    }
    for relative_path in sorted(sums):
        file = path / relative_path
        if not file.resolve().is_relative_to(path.resolve()) or not file.is_file():
            return f"{relative_path} (listed in {CHECKSUMS_FILE}) is missing"
    actual = _checksums(path, sorted(sums))
    for relative_path, expected in sorted(sums.items()):
        if actual[relative_path] != expected:
            return f"{relative_path} is corrupted (its CRC-32 differs from the one recorded when it was saved)"
    return None


def validate_checkpoint(path: str | Path, *, checksums: bool = False, resumable: bool = False) -> str | None:
    """What is wrong with a checkpoint folder, or `None` if it is complete.

    Checks `trainer_state.json` and `rng_states.json` have the structure the loaders read, `config.json` parses, and
    every DCP shard that the metadata references exists with enough bytes (the metadata is read without running
    code, see `read_dcp_metadata`). A missing `optimizer/` is not reported here: that is a resume policy decision
    (`load_training_checkpoint`).

    Args:
        path: a `step-XXXXXXX` folder.
        checksums: also read every shard and compare it with `checksums.json` (before loading it).
        resumable: also require what a resume reads (scheduler state, every rank's generator states).
    """
    path = Path(path)
    problem = _state_problem(path, resumable)
    if problem is None:
        config, problem = _read_json_file(path / MODEL_CONFIG_FILE)
        if problem is None and not isinstance(config, dict):
            problem = f"{MODEL_CONFIG_FILE} is not a JSON object"
    if problem is None:
        problem = _dcp_problem(path / MODEL_DIR)
    if problem is None and (path / OPTIMIZER_DIR).exists():
        problem = _dcp_problem(path / OPTIMIZER_DIR)
    if problem is None and checksums:
        problem = checksum_problem(path)
    return problem


def select_checkpoint(output_dir: str | Path) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest complete and intact checkpoint of a run, and a warning for each newer one that was skipped.

    Intact means `validate_checkpoint(path, checksums=True, resumable=True)`: a stub, a structurally wrong state file,
    a truncated or a corrupted shard all fall back to the previous checkpoint.

    Args:
        output_dir: the run's output directory.

    Raises:
        CheckpointError: checkpoints exist but none is intact.
    """
    skipped = []
    candidates = _step_dirs(output_dir)
    for step, path in reversed(candidates):
        problem = validate_checkpoint(path, checksums=True, resumable=True)
        if problem is None:
            state = read_trainer_state(path)
            return CheckpointInfo(path, step, state.get("tokens_seen"), state.get("loss")), skipped
        skipped.append(f"Skipping checkpoint {path}: {problem}. Falling back to the previous one.")
    if candidates:
        raise CheckpointError(
            f"None of the {len(candidates)} checkpoints in {checkpoints_root(output_dir)} is intact:\n  "
            + "\n  ".join(skipped)
            + "\nMove them aside to start from scratch, or point --output_dir at a new folder."
        )
    return None, skipped


def check_model_config_compatible(output_dir: str | Path, config) -> None:
    """Refuse to train `config` into an output directory whose checkpoints hold a different architecture.

    Args:
        output_dir: the run's output directory.
        config: the `GenesisConfig` this run builds.

    Raises:
        ConfigError: naming each differing field with both values.
    """
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return
    newest = checkpoints[-1].path
    try:
        with open(newest / MODEL_CONFIG_FILE) as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return  # an unreadable checkpoint is dealt with by select_checkpoint
    current = config.to_dict()
    differences = [
        f"{name}: checkpoint {saved.get(name)!r} vs this run {current.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if saved.get(name) != current.get(name)
    ]
    if differences:
        raise ConfigError(
            f"{output_dir} holds checkpoints of a different model ({newest.name}):\n  "
            + "\n  ".join(differences)
            + "\nResuming would load weights of the wrong shape. Use a new --output_dir for this model, or restore "
            "the model settings (model_preset / model_overrides) of that run to resume it."
        )


# ---------------------------------------------------------------------------------------------------------------------
# RNG states


def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, as JSON-serialisable values."""
    version, python_state, gauss = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [bit_generator, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_encode_bytes(device_state) for device_state in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what `capture_rng_state` returned (CUDA states only when CUDA is in use)."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    bit_generator, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_bytes(device_state) for device_state in state["cuda"]])


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.write("\n")


def _checksumming_writer_class():
    from torch.distributed.checkpoint import FileSystemWriter

    class ChecksummingFileSystemWriter(FileSystemWriter):
        """DCP's file writer that also takes the CRC-32 of its folder's files once they are all written.

        `finish` runs on the coordinator (rank 0) only, after every rank reported its shards written and the
        `.metadata` is in place, and in the thread that runs the save: for `dcp.async_save`, off the training thread.
        """

        checksums: dict[str, str] = {}

        def finish(self, metadata, results) -> None:
            super().finish(metadata, results)
            self.checksums = folder_checksums(Path(self.path))

    return ChecksummingFileSystemWriter


@dataclass
class _PendingSave:
    """An async save in flight: one `dcp.async_save` upload per DCP folder, with the writer that checksums it."""

    step: int
    staging_dir: Path
    uploads: list[tuple[Future, Any]]

    def done(self) -> bool:
        return all(future.done() for future, _ in self.uploads)

    def wait(self) -> None:
        futures.wait([future for future, _ in self.uploads])

    def checksums(self) -> dict[str, str]:
        """The CRC-32 of both folders (rank 0; empty elsewhere); re-raises the error of a failed upload."""
        checksums: dict[str, str] = {}
        for future, writer in self.uploads:
            future.result()
            checksums.update(writer.checksums)
        return checksums


class CheckpointManager:
    """Writes, publishes and rotates the checkpoints of one run. Every rank creates one, in the same order.

    Args:
        output_dir: the run's output directory.
        save_total_limit: keep the newest N checkpoints that are not milestones; `None` keeps all.
        milestone_steps: checkpoints at multiples of this step are never deleted.
        async_save: copy the state to CPU memory and write it in the background (`dcp.async_save`).
        events: the run's subscribers (`genesis_hf.events.Events`): `on_checkpoint_staged` on every rank before a
            checkpoint is made visible, `on_checkpoint_saved` on rank 0 after, `may_delete` before rotation.
        run_config: the resolved arguments, written to `run_config.yaml`.
        model_config: the `GenesisConfig`, written to `config.json`.
        tokenizer: saved to `tokenizer/`.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        save_total_limit: int | None,
        milestone_steps: int | None,
        async_save: bool,
        events: Events | None = None,
        run_config: dict[str, Any],
        model_config,
        tokenizer,
    ) -> None:
        self.root = checkpoints_root(output_dir)
        self.save_total_limit = save_total_limit
        self.milestone_steps = milestone_steps
        self.async_save = async_save
        self.events = events if events is not None else Events()
        self.run_config = run_config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        # Checkpoint collectives (DCP planning, gathers) go over gloo: NCCL is busy with training, and the seed run's
        # save hung in an NCCL gather. Async saves need a CPU group anyway.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # Without a process group DCP would warn on every call that it assumes a single process; say so instead.
        self.no_dist = not dist.is_initialized()
        self.run_id = distributed.broadcast_object(uuid.uuid4().hex[:8], group=self.group)
        # An async save writes model/ and optimizer/ in two threads at once: each gets its own gloo group, since the
        # collectives of two threads sharing one group could pair up in a different order on each rank.
        self.upload_groups = {MODEL_DIR: self.group, OPTIMIZER_DIR: self.group}
        if async_save and dist.is_initialized():
            self.upload_groups[OPTIMIZER_DIR] = dist.new_group(backend="gloo")
        self.pending: _PendingSave | None = None
        self._space = (0, 0)  # (bytes free, bytes needed) when the newest save began, for a disk-full error
        self.last_saved_step: int | None = None

    def remove_stale_staging_dirs(self) -> None:
        """Delete `*.tmp-*` folders left by saves that were interrupted (rank 0; they were never visible)."""
        if not self.is_main or not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if STEP_TMP_DIR.match(path.name) or STEP_DELETING_DIR.match(path.name):
                logger.warning("Removing %s: an interrupted save or deletion left it incomplete.", path)
                shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Write a checkpoint of `step` (collective: every rank calls it at the same step).

        Args:
            step: optimizer steps done.
            model: the wrapped model (FSDP2, DDP or plain).
            optimizer: its optimizer.
            trainer_state: JSON-serialisable run state (rank 0's is written).
            rank_state: this rank's `{"data_loader": ..., "rng": ...}`; all ranks' are gathered.
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        started = time.perf_counter()
        rank_states = distributed.all_gather_object(rank_state, group=self.group)
        staging_dir = self.root / f"{checkpoint_name(step)}.tmp-{self.run_id}"
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {MODEL_DIR: {"model": model_state}, OPTIMIZER_DIR: {"optimizer": optimizer_state}}
        self._space = self._space_before_save(state)
        with self._disk_full_as_one_line(step, staging_dir):
            if self.is_main:
                self._write_metadata_files(staging_dir, trainer_state, rank_states)
            if self.async_save:
                self.pending = _PendingSave(step, staging_dir, self._start_uploads(state, staging_dir))
            else:
                self._write_shards(state, staging_dir)
                distributed.barrier(self.group)
                self._publish(step, staging_dir)
        logger.info(
            "Checkpoint of step %d %s in %.2fs.",
            step,
            "staged" if self.async_save else "written",
            time.perf_counter() - started,
        )

    def _space_before_save(self, state: dict[str, dict]) -> tuple[int, int]:
        """`(bytes free on the checkpoints' disk, bytes the save needs)`: the newest checkpoint's size (saves of one run
        are alike), or this rank's tensors times the world size before the first one."""
        folder = self.root if self.root.is_dir() else self.root.parent
        free = shutil.disk_usage(folder).free if folder.is_dir() else 0
        previous = list_checkpoints(self.root.parent) if self.root.is_dir() else []
        if previous:
            needed = sum(path.stat().st_size for path in previous[-1].path.rglob("*") if path.is_file())
        else:
            local = [value for value in _tensors(state)]
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            needed = world_size * sum(getattr(t, "_local_tensor", t).nbytes for t in local)
        return free, needed

    @contextlib.contextmanager
    def _disk_full_as_one_line(self, step: int, staging_dir: Path):
        """A save that fails for lack of space becomes one `CheckpointError` saying how much it needed and how much was
        free; its staging folder (never visible) is removed, so the previous checkpoint stays the newest."""
        try:
            yield
        except BaseException as error:  # DCP's CheckpointException is a BaseException
            if not _is_disk_full(error):
                raise
            if self.is_main:
                shutil.rmtree(staging_dir, ignore_errors=True)
            free, needed = self._space
            previous = [info for info in list_checkpoints(self.root.parent) if info.step < step]
            kept = (
                f"The previous checkpoint {previous[-1].path.name} is intact" if previous else "No checkpoint is lost"
            )
            raise CheckpointError(
                f"Saving checkpoint {checkpoint_name(step)} failed: the disk of {self.root} is full (the save needs "
                f"about {_format_bytes(needed)}; {_format_bytes(free)} were free when it began). {kept}: free space "
                "(or lower --save_total_limit) and launch the same command again to resume from it."
            ) from None

    def _write_metadata_files(self, staging_dir: Path, trainer_state: dict[str, Any], rank_states: list[dict]) -> None:
        staging_dir.mkdir(parents=True, exist_ok=True)
        state = dict(trainer_state, world_size=len(rank_states))
        state["data_loader_states"] = [rank_state["data_loader"] for rank_state in rank_states]
        _write_json(staging_dir / TRAINER_STATE_FILE, state)
        _write_json(staging_dir / RNG_STATES_FILE, [rank_state["rng"] for rank_state in rank_states])
        with open(staging_dir / RUN_CONFIG_FILE, "w") as handle:
            yaml.safe_dump(self.run_config, handle, sort_keys=False)
        self.model_config.to_json_file(staging_dir / MODEL_CONFIG_FILE)
        self.tokenizer.save_pretrained(staging_dir / TOKENIZER_DIR)

    def _write_shards(self, state: dict[str, dict], staging_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp

        writer_class, checksums = _checksumming_writer_class(), {}
        for name, part in state.items():
            writer = writer_class(staging_dir / name)
            dcp.save(part, storage_writer=writer, process_group=self.group, no_dist=self.no_dist)
            checksums.update(writer.checksums)
        # Rank 0's DCP save returns once every rank's shards are written; its writers have taken the checksums.
        if self.is_main:
            write_checksums(staging_dir, checksums)

    def _start_uploads(self, state: dict[str, dict], staging_dir: Path) -> list[tuple[Future, Any]]:
        """`dcp.async_save` of each DCP folder: copied to CPU memory here (the live tensors keep training), written by
        a thread of DCP's own; returns each upload's future and writer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        # async_save's own default stager, made explicit because the writer below would otherwise stage: a blocking
        # copy into fresh CPU memory (no pinned or shared buffers kept between saves).
        stager = DefaultStager(StagingOptions(False, False, False, False))
        writer_class = _checksumming_writer_class()
        uploads = []
        try:
            for name, part in state.items():
                writer = writer_class(staging_dir / name)
                future = dcp.async_save(
                    part,
                    storage_writer=writer,
                    process_group=self.upload_groups[name],
                    # A thread, not a process: the writer's checksums and the CPU copy stay in this process.
                    async_checkpointer_type=AsyncCheckpointerType.THREAD,
                    async_stager=stager,
                    no_dist=self.no_dist,
                )
                # With a blocking stager, async_save returns the upload's Future (not an AsyncSaveResponse).
                uploads.append((future, writer))
        finally:
            stager.close()  # staging is done (it blocks); the staged copies live on in the uploads
        return uploads

    def poll(self) -> None:
        """Publish a finished background save (call once per step on every rank; only rank 0 renames)."""
        if self.pending is not None and self.pending.done():
            self._finish_pending()

    def wait(self) -> None:
        """Block until a background save is written and published."""
        if self.pending is not None:
            self.pending.wait()
            self._finish_pending()

    def _finish_pending(self) -> None:
        pending, self.pending = self.pending, None
        with self._disk_full_as_one_line(pending.step, pending.staging_dir):
            checksums = pending.checksums()  # re-raises a failed write
        # Rank 0's uploads return only after every rank reported its shards written (DCP's finish step gathers them),
        # so rank 0 can publish without another collective; its writers have taken the checksums by then.
        if self.is_main:
            write_checksums(pending.staging_dir, checksums)
        self._publish(pending.step, pending.staging_dir)

    def _publish(self, step: int, staging_dir: Path) -> None:
        self.events.on_checkpoint_staged(staging_dir, step)
        self.last_saved_step = step
        if not self.is_main:
            return
        final_dir = self.root / checkpoint_name(step)
        if final_dir.exists():
            # A checkpoint of the same step from an earlier launch (possible after a fallback): the new one replaces it.
            self._delete(final_dir)
        os.rename(staging_dir, final_dir)
        _fsync_dir(self.root)
        logger.info("Checkpoint %s is complete.", final_dir)
        self.events.on_checkpoint_saved(final_dir, step)
        self.rotate()

    def is_milestone(self, step: int) -> bool:
        return bool(self.milestone_steps) and step % self.milestone_steps == 0

    def rotate(self) -> None:
        """Delete the oldest non-milestone checkpoints beyond `save_total_limit` (rank 0), unless a subscriber vetoes."""
        if not self.is_main or self.save_total_limit is None:
            return
        regular = [info for info in list_checkpoints(self.root.parent) if not self.is_milestone(info.step)]
        for info in regular[: -self.save_total_limit]:
            # A subscriber may keep a checkpoint it still needs (the Hub pusher, until the upload is confirmed).
            if self.events.may_delete(info.path):
                self._delete(info.path)

    def _delete(self, path: Path) -> None:
        # Rename first: a half-deleted folder must never look like a checkpoint.
        doomed = path.with_name(f"{path.name}.deleting-{self.run_id}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        self.wait()


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _is_disk_full(error: BaseException) -> bool:
    """Whether a failed save ran out of space: ENOSPC anywhere in the chain (DCP wraps each rank's error), or torch's
    file writer's "unexpected pos" (what it reports when a write to a full disk comes up short)."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current) or "unexpected pos" in str(current):
            return True
        pending += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


def _format_bytes(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,} bytes" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _dcp_keys(folder: Path) -> dict[str, Any]:
    return read_dcp_metadata(folder).state_dict_metadata


def _optimizer_problems(folder: Path, optimizer_state: dict[str, Any], model_state: dict[str, Any]) -> list[str]:
    """What is missing or mis-shaped in the saved optimizer state, against this model's parameters."""
    if not (folder / DCP_METADATA_FILE).is_file():
        return [f"{folder} does not exist or has no {DCP_METADATA_FILE}: the checkpoint holds no optimizer state"]
    saved = _dcp_keys(folder)
    problems = []
    for fqn in optimizer_state["state"]:
        shape = tuple(model_state[fqn].shape) if fqn in model_state else None
        for key in ("exp_avg", "exp_avg_sq", "step"):
            entry = saved.get(f"optimizer.state.{fqn}.{key}")
            if entry is None:
                problems.append(f"no {key} for {fqn}")
            elif key != "step" and shape is not None and tuple(getattr(entry, "size", ())) != shape:
                problems.append(f"{key} of {fqn} has shape {tuple(entry.size)}, the parameter {shape}")
    return problems


def _optimizer_error(path: Path, problems: list[str], previous: list[CheckpointInfo]) -> OptimizerStateError:
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    with_state = [info for info in previous if (info.path / OPTIMIZER_DIR / DCP_METADATA_FILE).is_file()]
    alternative = (
        f" An older checkpoint has optimizer state: --resume_from_checkpoint {with_state[-1].path}."
        if with_state
        else ""
    )
    return OptimizerStateError(
        f"Checkpoint {path} cannot be resumed: its AdamW state is missing or does not match the model:\n  {shown}\n"
        "Restoring the weights without the optimizer's moments is the seed run's silent failure: the loss looked "
        "healthy for ~50 steps, then diverged, and ~1,000 steps were trained on poisoned weights."
        f"{alternative} To start AdamW from zero on purpose (with a fresh warmup of its moments), relaunch with "
        "--allow_fresh_optimizer true."
    )


@dataclass
class ResumeResult:
    """What `load_training_checkpoint` restored.

    Args:
        trainer_state: the checkpoint's `trainer_state.json`.
        fresh_optimizer: the optimizer state was not restored (`allow_fresh_optimizer`).
        problems: why it was not.
    """

    trainer_state: dict[str, Any]
    fresh_optimizer: bool
    problems: list[str]


def load_training_checkpoint(
    path: str | Path,
    model,
    optimizer: torch.optim.Optimizer,
    *,
    allow_fresh_optimizer: bool,
    group=None,
    older_checkpoints: Sequence[CheckpointInfo] = (),
) -> ResumeResult:
    """Restore model weights and optimizer state (collective), after checking the optimizer state fits the model.

    Checks, before loading: `optimizer/` exists; for every parameter it holds `exp_avg`, `exp_avg_sq` and `step`; the
    moments have the parameter's (global) shape. After loading: every parameter's `step` equals the checkpoint's
    `optimizer_steps` (optimizer updates done; steps skipped for a non-finite loss do not count).

    Args:
        path: a `step-XXXXXXX` folder.
        model: the wrapped model (FSDP2, DDP or plain).
        optimizer: its optimizer, freshly built.
        allow_fresh_optimizer: load only the weights when the optimizer state fails the checks.
        group: process group for DCP's collectives (the checkpoint manager's gloo group).
        older_checkpoints: checkpoints before `path`, to suggest one in the error.

    Raises:
        OptimizerStateError: the optimizer state is missing or wrong and `allow_fresh_optimizer` is false.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    trainer_state = read_trainer_state(path)
    model_state = get_model_state_dict(model)
    no_dist = not dist.is_initialized()
    load_dcp({"model": model_state}, path / MODEL_DIR, process_group=group, no_dist=no_dist)
    set_model_state_dict(model, model_state)

    # The skeleton: get_optimizer_state_dict materialises AdamW's state with a zero-LR step, which changes nothing.
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    problems = _optimizer_problems(path / OPTIMIZER_DIR, optimizer_state, model_state)
    if not problems:
        load_dcp({"optimizer": optimizer_state}, path / OPTIMIZER_DIR, process_group=group, no_dist=no_dist)
        set_optimizer_state_dict(model, optimizer, optimizer_state)
        expected = trainer_state.get("optimizer_steps", trainer_state["step"])
        wrong = sorted(
            {float(state["step"]) for state in optimizer.state.values() if float(state["step"]) != expected}
        )
        if wrong:
            problems = [f"AdamW step counts {wrong} differ from the {expected} optimizer updates the run had done"]
    # Every rank saw the same files, but agree explicitly: one rank must never resume with state the others dropped.
    flag = distributed.all_reduce_sum(torch.tensor([float(bool(problems))]), group=group)  # CPU tensor: gloo group
    if flag.item() and not problems:
        problems = ["another rank found the optimizer state inconsistent"]
    if problems:
        if not allow_fresh_optimizer:
            raise _optimizer_error(path, problems, older_checkpoints)
        optimizer.state.clear()
    return ResumeResult(trainer_state=trainer_state, fresh_optimizer=bool(problems), problems=problems)


def read_rng_states(path: str | Path) -> list[dict[str, Any]]:
    with open(Path(path) / RNG_STATES_FILE) as handle:
        return json.load(handle)


def load_model_from_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load the model, tokenizer and trainer state of a training checkpoint, in one process, without a process group.

    Reads the DCP shards of every rank directly (no collective is used even if a process group exists), so it also
    works on a laptop for a checkpoint written by 8 GPUs.

    Args:
        path: a `step-XXXXXXX` folder.
        dtype: dtype of the returned model's weights.

    Returns:
        `(GenesisForCausalLM, tokenizer, trainer_state)`; the model is in eval mode on CPU.
    """
    from transformers import AutoTokenizer

    from genesis_hf import GenesisConfig, GenesisForCausalLM

    path = Path(path)
    problem = validate_checkpoint(path) or checksum_problem(path, parts=(MODEL_DIR,))  # the weights are all it reads
    if problem is not None:
        raise CheckpointError(f"Checkpoint {path} is not intact: {problem}.")
    config = GenesisConfig.from_json_file(path / MODEL_CONFIG_FILE)
    model = GenesisForCausalLM(config).float()
    saved = _dcp_keys(path / MODEL_DIR)
    state = {}
    for key, tensor in model.state_dict().items():
        if f"model.{key}" in saved:
            state[key] = tensor
        elif not (key == "lm_head.weight" and config.tie_word_embeddings):
            raise CheckpointError(f"Checkpoint {path} has no weights for {key}; it was not written for this model.")
    load_dcp({"model": state}, path / MODEL_DIR, no_dist=True)
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
    return model, tokenizer, read_trainer_state(path)


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "OptimizerStateError",
    "capture_rng_state",
    "check_model_config_compatible",
    "checksum_problem",
    "has_checkpoint_folders",
    "list_checkpoints",
    "load_model_from_checkpoint",
    "load_training_checkpoint",
    "read_dcp_metadata",
    "unpickle_dcp_metadata",
    "restore_rng_state",
    "load_dcp",
    "safe_load_planner",
    "safe_reader",
    "select_checkpoint",
    "validate_checkpoint",
]
