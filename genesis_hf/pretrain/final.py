"""The end of a pretraining run: `<output_dir>/final/`, a Hugging Face model folder written from the last checkpoint.

`FinalExport` subscribes to the run's `on_train_end` (genesis_hf.events); `run_pretraining` always subscribes it.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from genesis_hf.args import ConfigError
from genesis_hf.events import TrainingCallback
from genesis_hf.layout import FINAL_DIR, FINAL_POINTER_FILE

from . import checkpoint as ckpt


class FinalExport(TrainingCallback):
    """Writes `final/` when the run ends (main process), from the newest intact checkpoint; `final_dir` says where."""

    def __init__(self) -> None:
        self.final_dir: Path | None = None

    def on_train_end(self, run_dir: Path, checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is not None:
            self.final_dir = export_final(Path(run_dir), Path(checkpoint_dir))


def export_final(output_dir: Path, checkpoint_path: Path) -> Path:
    """Write `<output_dir>/final/` (save_pretrained model + tokenizer) from a sharded checkpoint, in this process.

    Reads the shards from disk instead of gathering them over the network; the folder is swapped in atomically. An
    existing `final/` is replaced only if it holds `training_checkpoint.json` (written here); anything else there is
    the user's and stops the export (`check_output_dir` refuses it before training).

    Raises:
        ConfigError: `final/` exists and was not written by this function.
    """
    final_dir = output_dir / FINAL_DIR
    if final_dir.is_symlink() or (final_dir.exists() and not (final_dir / FINAL_POINTER_FILE).is_file()):
        raise ConfigError(f"{final_dir} was not written by genesis-hf; move it elsewhere and relaunch to export.")
    model, tokenizer, _ = ckpt.load_model_from_checkpoint(checkpoint_path)
    dtype = model.config.dtype
    dtype = getattr(torch, str(dtype).removeprefix("torch.")) if dtype is not None else torch.float32
    staging = Path(tempfile.mkdtemp(prefix=f"{FINAL_DIR}.tmp-", dir=output_dir))
    try:
        model.to(dtype).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(staging / FINAL_POINTER_FILE, "w") as handle:
            json.dump({"checkpoint": str(checkpoint_path)}, handle)
        if final_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{FINAL_DIR}.old-", dir=output_dir))
            os.rename(final_dir, old / FINAL_DIR)
            shutil.rmtree(old)
        os.rename(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final_dir
