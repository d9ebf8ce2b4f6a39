"""What a post-training run leaves behind, like pretraining: `<output_dir>/final` (a verified HF folder with remote
code and the chat template), `<output_dir>/adapter` for LoRA runs, and `metrics.jsonl` (see `callbacks`).
"""

from pathlib import Path

import torch

from genesis_hf.layout import ADAPTER_DIR, CHECKPOINT_METADATA_FILE, FINAL_DIR
from genesis_hf.model.card import build_adapter_card
from genesis_hf.model.folder import LoadedCheckpoint, write_model_folder

from .model import merge_lora


def final_model(trainer, output_dir: str | Path):
    """The trained model as a plain fp32 model on the main process (`None` on the others).

    A LoRA adapter is saved to `<output_dir>/adapter` with the chat tokenizer, and merged in. Stock PEFT loads that
    folder alone (`AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True)`): it loads the base the
    adapter names, grows its embeddings to the tokenizer's size when the chat setup added tokens, and the adapter's
    saved embedding rows (`modules_to_save`) replace them. Under FSDP the parameters are shards spread over
    the ranks: every rank takes part in gathering a full copy, which only the main process keeps. Call it on every rank.
    """
    from peft import PeftModel

    accelerator = trainer.accelerator
    if getattr(trainer, "is_fsdp_enabled", False):
        return _gathered_model(trainer)
    # keep_fp32_wrapper=False: Accelerate patches `forward` on the instance, and a copy would keep calling the original.
    model = accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if isinstance(model, PeftModel):
        if accelerator.is_main_process:
            model.save_pretrained(Path(output_dir) / ADAPTER_DIR)
            trainer.processing_class.save_pretrained(Path(output_dir) / ADAPTER_DIR)
        model = merge_lora(model)
    return model.to(torch.float32).eval() if accelerator.is_main_process else None


def _gathered_model(trainer):
    from transformers import AutoModelForCausalLM

    accelerator = trainer.accelerator
    # A collective: the full state dict lands on the main process (on CPU), the other ranks get nothing.
    state_dict = accelerator.get_state_dict(trainer.model)
    if not accelerator.is_main_process:
        return None
    config = accelerator.unwrap_model(trainer.model).config
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({key: value.to(torch.float32) for key, value in state_dict.items()}, strict=True)
    model.generation_config = accelerator.unwrap_model(trainer.model).generation_config
    return model.eval()


def check_lora_topology(peft_config) -> None:
    """LoRA runs merge their adapter in one process; under FSDP the adapter is sharded, which this does not gather."""
    import os

    if peft_config is not None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "use_peft=true under an FSDP accelerate config is not supported (the adapter would stay sharded). LoRA "
            "needs little memory: launch with a DDP config (accelerate_configs/ddp-cpu.yaml or plain "
            "`accelerate launch --multi_gpu`), or train all weights with FSDP (--use_peft false)."
        )


def last_loss(trainer) -> float | None:
    for record in reversed(trainer.state.log_history):
        if "loss" in record:
            return float(record["loss"])
    return None


def write_final(
    model,
    tokenizer,
    output_dir: str | Path,
    *,
    step: int,
    loss: float | None,
    dtype: str = "fp32",
    lineage: dict | None = None,
) -> Path:
    """Write `model` and `tokenizer` to `<output_dir>/final` with the one model-folder writer
    (`genesis_hf.model.folder`: reloaded with `trust_remote_code` and its logits compared) and a model card built from
    `metrics.jsonl`.

    Args:
        model: a `GenesisForCausalLM` (merged, if it was trained with LoRA).
        tokenizer: its tokenizer, with the chat template.
        output_dir: the run's output folder.
        step: the optimizer step reached.
        loss: the last training loss.
        dtype: weights dtype of the export (`fp32`, `bf16`).
        lineage: the stage, recipe command, base model and data (`genesis_hf.model.lineage.finetune_lineage`), kept
            in `genesis_checkpoint.json` and told by the card.

    Raises:
        FileExistsError: `final/` exists and was not written by genesis_hf.
    """
    output_dir = Path(output_dir)
    final_dir = output_dir / FINAL_DIR
    if final_dir.exists() and not (final_dir / CHECKPOINT_METADATA_FILE).is_file():
        raise FileExistsError(
            f"{final_dir} exists and was not written by a genesis_hf export; move it away or pick another output_dir."
        )
    # `path` points at final/ so that the model card finds the run's metrics.jsonl next to it. An earlier final/ of
    # this output_dir (a rerun) is replaced only once the new one is complete and verified.
    source = LoadedCheckpoint(
        model=model, tokenizer=tokenizer, path=final_dir, kind="memory", step=step, loss=loss, lineage=lineage
    )
    write_model_folder(source, final_dir, dtype=dtype, repo_id=output_dir.name, overwrite=True)
    return final_dir


def run_callbacks(subscribers=()) -> list:
    """The callbacks every post-training recipe starts with: `metrics.jsonl`, and the run's events
    (`genesis_hf.events.TrainerEvents`) for `subscribers` such as the Hub pusher, which takes each `checkpoint-N` as
    a copy it owns (the Trainer may rotate the original) and the run's `final/` at the end, or the checkpoint
    evaluator, whose scores `train_and_write_final` logs through the trainer. `None` entries are skipped."""
    from genesis_hf.events import TrainerEvents

    from .callbacks import MetricsJsonlCallback

    return [MetricsJsonlCallback(), TrainerEvents([item for item in subscribers if item is not None])]


def write_adapter_card(output_dir: str | Path, lineage: dict, redact: tuple = ()) -> None:
    """Replace PEFT's placeholder card in a LoRA run's `adapter/` with one that names the base model and the run."""
    adapter_dir = Path(output_dir) / ADAPTER_DIR
    if (adapter_dir / "adapter_config.json").is_file():
        card = build_adapter_card(lineage, title=lineage.get("model_name") or Path(output_dir).name, redact=redact)
        (adapter_dir / "README.md").write_text(str(card), encoding="utf-8")


def train_and_write_final(
    trainer, tokenizer, training_args, what: str, logger, plan, lineage: dict | None = None
) -> None:
    """Train (from the checkpoint `plan` resumes, if any), then on the main process write `<output_dir>/final` and
    announce the end of the run (the pusher uploads `final/` then and waits for its uploads); every process then ends
    the run.

    Args:
        trainer: a TRL trainer built with `run_callbacks`.
        tokenizer: the chat tokenizer.
        training_args: the trainer's `SFTConfig`/`DPOConfig`.
        what: how the log names the result ("Chat model", "Aligned model").
        logger: the recipe's logger.
        plan: the launch's `resume.RunPlan` (`resume.plan_run`).
        lineage: what the cards of `final/` and `adapter/` say made the model (`genesis_hf.model.lineage`).
    """
    from transformers import Trainer

    from genesis_hf.events import TrainerEvents

    from .resume import start_run

    events = next(item for item in trainer.callback_handler.callbacks if isinstance(item, TrainerEvents))
    # What a checkpoint subscriber measures (evaluation scores) goes through transformers' own `Trainer.log`, to
    # `state.log_history`, `metrics.jsonl` and the trackers; TRL's override would fold its running training averages
    # (and clear them) into this record.
    events.events.metrics_sink = lambda step, metrics: Trainer.log(trainer, metrics)
    if trainer.accelerator.is_main_process:
        start_run(plan)
    trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint is not None else None)
    model = final_model(trainer, training_args.output_dir)
    is_main = trainer.accelerator.is_main_process
    final_dir = None
    try:
        if is_main:
            final_dir = write_final(
                model,
                tokenizer,
                training_args.output_dir,
                step=trainer.state.global_step,
                loss=last_loss(trainer),
                dtype="bf16" if training_args.bf16 else "fp32",
                lineage=lineage,
            )
            if lineage is not None:
                write_adapter_card(training_args.output_dir, lineage, redact=(training_args.hub_token,))
            logger.info("%s in %s.", what, final_dir)
    finally:
        events.finish(training_args.output_dir, final_dir, trainer.state.global_step, is_main_process=is_main)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
