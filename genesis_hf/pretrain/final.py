"""The end of a pretraining run: `<output_dir>/final/`, the verified Hugging Face model folder of the last checkpoint.

`FinalExport` subscribes to the run's `on_train_end` (genesis_hf.events); `run_pretraining` always subscribes it. It
reads the newest intact checkpoint's shards from disk in this process (no full-state gather across ranks) and writes
`final/` with the one model-folder writer (`genesis_hf.model.folder`): weights in the model's own dtype, remote code,
tokenizer, generation config, card, and `training_checkpoint.json` naming the checkpoint. The folder is verified
(reloaded through its remote code, logits compared) and swapped in atomically.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from genesis_hf.args import ConfigError
from genesis_hf.events import TrainingCallback
from genesis_hf.layout import EXPORT_MARKER_FILE, FINAL_DIR, FINAL_POINTER_FILE
from genesis_hf.model.folder import EXPORT_DTYPES, MODEL_LOADING_LOCK, LoadedCheckpoint, write_model_folder

from . import checkpoint as ckpt

# "bfloat16" -> "bf16": the export dtype that keeps the model's own.
_DTYPE_NAMES = {str(dtype).removeprefix("torch."): name for name, dtype in EXPORT_DTYPES.items()}


class FinalExport(TrainingCallback):
    """Writes `final/` when the run ends (main process), from the newest intact checkpoint; `final_dir` says where."""

    def __init__(self) -> None:
        self.final_dir: Path | None = None

    def on_train_end(self, run_dir: Path, checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is not None:
            self.final_dir = export_final(Path(run_dir), Path(checkpoint_dir))


def export_final(output_dir: Path, checkpoint_path: Path) -> Path:
    """Write `<output_dir>/final/` from a sharded checkpoint and return it.

    An existing `final/` is replaced only if it holds `training_checkpoint.json` and is an unchanged earlier export;
    anything else there is the user's and stops the export (`check_output_dir` refuses it before training). A
    `final/` of an earlier genesis-hf (the pointer file, no export marker) is replaced once the new one is verified,
    as that version replaced its own.

    Raises:
        ConfigError: `final/` exists and was not written by genesis-hf.
    """
    final_dir = output_dir / FINAL_DIR
    if final_dir.is_symlink() or (final_dir.exists() and not (final_dir / FINAL_POINTER_FILE).is_file()):
        raise ConfigError(f"{final_dir} was not written by genesis-hf; move it elsewhere and relaunch to export.")
    earlier_format = final_dir.exists() and not (final_dir / EXPORT_MARKER_FILE).is_file()
    target = output_dir / f"{FINAL_DIR}.new-{os.getpid()}" if earlier_format else final_dir
    write_checkpoint_folder(
        checkpoint_path,
        target,
        repo_id=output_dir.name,
        overwrite=True,
        extra_files={FINAL_POINTER_FILE: {"checkpoint": str(checkpoint_path)}},
    )
    if earlier_format:
        # Moved aside before it is deleted: a crash leaves one complete final/ (old or new), never a half-deleted one.
        old = Path(tempfile.mkdtemp(prefix=f"{FINAL_DIR}.old-", dir=output_dir))
        os.rename(final_dir, old / FINAL_DIR)
        os.rename(target, final_dir)
        shutil.rmtree(old)
    return final_dir


def checkpoint_source(checkpoint_path: str | Path) -> LoadedCheckpoint:
    """A training checkpoint as the model-folder writer's source, loaded in this process from its shards: the model in
    fp32 (eval mode, on CPU), its tokenizer, trainer state and run config.

    Raises:
        CheckpointError: the checkpoint is not intact or not for this model.
    """
    path = Path(checkpoint_path)
    model, tokenizer, trainer_state = ckpt.load_model_from_checkpoint(path, dtype=torch.float32)
    model = model.float().eval()
    return LoadedCheckpoint.from_folder(model, tokenizer, path, "training", trainer_state, trainer_state=trainer_state)


def write_checkpoint_folder(checkpoint_path: Path, out_dir: Path, *, dtype: str | None = None, **folder_options):
    """Write a training checkpoint (`checkpoint_source`) as a verified model folder at `out_dir`.

    Args:
        checkpoint_path: a `step-XXXXXXX` folder.
        out_dir: the folder to write.
        dtype: `fp32`, `bf16` or `fp16`; the model's own dtype (`config.dtype`) when `None`.
        folder_options: `repo_id`, `overwrite`, `extra_files`, `log`... of `genesis_hf.model.folder.write_model_folder`.

    Raises:
        CheckpointError: the checkpoint is not intact or not for this model.
        ExportError: `out_dir` may not be written, or the written folder does not reproduce the model.
    """
    with MODEL_LOADING_LOCK:  # not while the Hub pusher's thread is inside from_pretrained (see the lock)
        source = checkpoint_source(checkpoint_path)
    dtype = dtype or _DTYPE_NAMES.get(str(source.model.config.dtype).removeprefix("torch."), "fp32")
    return write_model_folder(source, out_dir, dtype=dtype, **folder_options)


__all__ = ["FinalExport", "checkpoint_source", "export_final", "write_checkpoint_folder"]
