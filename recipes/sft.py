"""Supervised fine-tuning of a Genesis base into a chat model with TRL's `SFTTrainer` (loss on assistant tokens only).

The CPU default (a few minutes): the main job's model `outputs/genesis-tiny/final` on the embedded conversations,
with `recipes/configs/sft/genesis-tiny.yaml` as defaults:

    .venv/bin/accelerate launch recipes/sft.py

The seed project's SFT run on 2x RTX 4090:

    accelerate launch --config_file accelerate_configs/fsdp2-2x4090-pcie.yaml recipes/sft.py \
        --config recipes/configs/sft/genesis-1b.yaml

LoRA on every linear projection: add `--use_peft true`. Every key is a field of TRL's `SFTConfig` or `ModelConfig`
or of `genesis_hf.posttrain.config.SFTDataArguments`/`TrainingEvalArguments` (`--eval_tasks piqa --eval_limit 100`
scores every saved checkpoint with lm-eval); unknown keys are an error. Outputs: `<output_dir>/final` (HF
folder, loads with `trust_remote_code`), `<output_dir>/metrics.jsonl`, `<output_dir>/adapter` with LoRA, and with
`--push_to_hub true --hub_model_id you/name` one Hub branch per checkpoint (`main` = newest).
"""

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trl import ModelConfig, SFTConfig, SFTTrainer

from genesis_hf.evaluate.during_training import checkpoint_evaluator
from genesis_hf.model.lineage import finetune_lineage
from genesis_hf.posttrain.chat import check_generation_markers
from genesis_hf.posttrain.config import (
    RunFolderArguments,
    SFTDataArguments,
    TrainingEvalArguments,
    hub_push_settings,
    parse_recipe_args,
)
from genesis_hf.posttrain.data import (
    SFTMixture,
    SFTSource,
    apply_length_policy,
    build_sft_dataset,
    format_statistics,
    load_sft_mixture,
    mixture_statistics,
)
from genesis_hf.posttrain.model import chat_model, lora_config
from genesis_hf.posttrain.outputs import check_lora_topology, run_callbacks, train_and_write_final
from genesis_hf.posttrain.resume import check_training_settings, plan_run, run_settings
from genesis_hf.publish.push import pusher_for_run
from genesis_hf.writer_lock import FolderLock, hold_folder

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft" / "genesis-tiny.yaml"
logger = logging.getLogger("genesis_hf.sft")


def load_mixture(data_args: SFTDataArguments) -> SFTMixture:
    if data_args.dataset_name is None:
        return load_sft_mixture(data_args.mixture)
    source = SFTSource(
        name=Path(data_args.dataset_name).stem or "dataset",
        location=data_args.dataset_name,
        config=data_args.dataset_config,
        split=data_args.dataset_train_split,
    )
    return SFTMixture(name=source.name, sources=[source])


def main(argv: list[str] | None = None, callbacks: Sequence = ()) -> int:
    """Run the recipe; `callbacks` are extra subscribers to the run's events (`genesis_hf.events.TrainingCallback`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    lock = FolderLock(None)
    try:
        data_args, eval_args, run_args, training_args, model_args = parse_recipe_args(
            (SFTDataArguments, TrainingEvalArguments, RunFolderArguments, SFTConfig, ModelConfig), argv, DEFAULT_CONFIG
        )
        push = hub_push_settings(training_args)
        check_training_settings(training_args)
        # One writer per folder, held until the run ends; a refused launch lets it go and leaves nothing behind.
        lock = hold_folder(training_args.output_dir, rank=training_args.process_index)
        # The output folder: resume the run it holds, or refuse to replace its results (nothing is loaded yet).
        settings = run_settings("sft", data_args, training_args, model_args)
        plan = plan_run(training_args, settings, overwrite_output_dir=run_args.overwrite_output_dir)
        if eval_args.eval_tasks and model_args.use_peft:
            raise ValueError(
                f"--eval_tasks {eval_args.eval_tasks} with --use_peft true: LoRA checkpoints hold only the adapter, "
                "which lm-eval cannot load; drop --eval_tasks (and run `genesis-hf eval OUTPUT_DIR/final`)."
            )
        # Optional small lm-eval runs at every checkpoint; the task names are checked here, before anything loads.
        evaluator = checkpoint_evaluator(
            eval_args.eval_tasks, eval_limit=eval_args.eval_limit, eval_include_path=eval_args.eval_include_path
        )
        # Data first: a bad row or schema stops the run before any model is loaded.
        mixture = load_mixture(data_args)
        dataset, skipped = build_sft_dataset(mixture, on_bad_example=data_args.on_bad_example)
        model, tokenizer, setup, source = chat_model(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
        )
        lineage = finetune_lineage(
            "sft",
            sys.argv[1:] if argv is None else argv,
            base_model=source,
            base_model_revision=model_args.model_revision,
            data=data_args.dataset_name or mixture.name,
            datasets=[item.location for item in mixture.sources],
            hub_model_id=training_args.hub_model_id if training_args.push_to_hub else None,
        )
        check_generation_markers(tokenizer.chat_template, training_args.assistant_only_loss)
        peft_config = lora_config(model_args, setup, tied_embeddings=model.config.tie_word_embeddings)
        check_lora_topology(peft_config)
        # Checks the repo id and token before anything loads; uploads each checkpoint in the background.
        pusher = pusher_for_run(push, is_main_process=training_args.process_index == 0)
        if pusher is not None:
            pusher.lineage = lineage  # for the cards of the checkpoint-N branches
    # ConfigError, ConversationError and ChatSetupError are ValueErrors, as are TRL's own argument checks.
    except ValueError as error:
        lock.release()
        print(f"recipes/sft.py: error: {error}", file=sys.stderr, flush=True)
        return 1
    with lock:
        logger.info("Starting from %s. %s", source, setup.describe())
        stats = mixture_statistics(dataset, tokenizer, max_length=training_args.max_length)
        dataset, overlong = apply_length_policy(
            dataset, stats["lengths"], training_args.max_length, data_args.overlong
        )
        logger.info("SFT data (assistant tokens are trainable):\n%s", format_statistics(stats))
        logger.info(
            "Skipped rows: %s. Longer than max_length: %d (%s).", skipped.describe(), overlong, data_args.overlong
        )

        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset.remove_columns("source"),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=run_callbacks([*callbacks, pusher, evaluator]),
        )
        train_and_write_final(trainer, tokenizer, training_args, "Chat model", logger, plan, lineage)
        return 0


if __name__ == "__main__":
    sys.exit(main())
