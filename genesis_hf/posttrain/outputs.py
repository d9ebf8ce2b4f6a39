"""What a post-training run leaves behind, like pretraining: `<output_dir>/final` (a verified HF folder with remote
code and the chat template), `<output_dir>/adapter` for LoRA runs, and `metrics.jsonl` (see `callbacks`).
"""

import os
import shutil
from pathlib import Path

import torch

from .model import merge_lora

FINAL_DIR = "final"
ADAPTER_DIR = "adapter"


def final_model(trainer, output_dir: str | Path):
    """The trained model as a plain fp32 model; a LoRA adapter is saved to `<output_dir>/adapter` and merged in."""
    from peft import PeftModel

    # keep_fp32_wrapper=False: Accelerate patches `forward` on the instance, and a copy would keep calling the original.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if isinstance(model, PeftModel):
        if trainer.accelerator.is_main_process:
            model.save_pretrained(Path(output_dir) / ADAPTER_DIR)
        model = merge_lora(model)
    return model.to(torch.float32).eval()


def last_loss(trainer) -> float | None:
    for record in reversed(trainer.state.log_history):
        if "loss" in record:
            return float(record["loss"])
    return None


def write_final(
    model, tokenizer, output_dir: str | Path, *, step: int, loss: float | None, dtype: str = "fp32"
) -> Path:
    """Export `model` and `tokenizer` to `<output_dir>/final` with genesis_hf's verified exporter (reloaded with
    `trust_remote_code` and its logits compared) and a model card built from `metrics.jsonl`.

    Args:
        model: a `GenesisForCausalLM` (merged, if it was trained with LoRA).
        tokenizer: its tokenizer, with the chat template.
        output_dir: the run's output folder.
        step: the optimizer step reached.
        loss: the last training loss.
        dtype: weights dtype of the export (`fp32`, `bf16`).
    """
    # The exporter belongs to the later publish stage; imported here, at the end of the run, as pretraining does.
    from genesis_hf.publish.export import CHECKPOINT_METADATA_FILE, LoadedCheckpoint, export_checkpoint

    output_dir = Path(output_dir)
    final_dir = output_dir / FINAL_DIR
    if final_dir.exists() and not (final_dir / CHECKPOINT_METADATA_FILE).is_file():
        raise FileExistsError(
            f"{final_dir} exists and was not written by a genesis_hf export; move it away or pick another output_dir."
        )
    # The exporter refuses to write inside a run folder, so it writes next to it and the finished, verified folder is
    # renamed into place. `path` points at final/ so that the model card finds the run's metrics.jsonl.
    staging = output_dir.parent / f".{output_dir.name}-final-{os.getpid()}"
    loaded = LoadedCheckpoint(model=model, tokenizer=tokenizer, path=final_dir, kind="hf", step=step, loss=loss)
    export_checkpoint(loaded, staging, dtype=dtype, overwrite=True)
    if final_dir.exists():
        # An earlier final/ of this output_dir (a rerun): replaced only once the new one is complete and verified.
        shutil.rmtree(final_dir)
    os.replace(staging, final_dir)
    return final_dir
