"""Direct preference optimisation of a Genesis chat model with TRL's `DPOTrainer`.

The CPU default (a few minutes) on the embedded preference pairs, after `recipes/sft.py`, with
`recipes/configs/dpo/genesis-tiny.yaml` as defaults:

    .venv/bin/accelerate launch recipes/dpo.py --model_name_or_path outputs/sft-tiny/final

On the constitution pipeline's pairs (chosen = the revision, rejected = the original): add
`--dataset_name outputs/constitution/dpo.jsonl`. Genesis 1B on 2x RTX 4090:

    accelerate launch --config_file accelerate_configs/fsdp2-2x4090-pcie.yaml recipes/dpo.py \
        --config recipes/configs/dpo/genesis-1b.yaml

The reference model is the starting model after the chat setup (same resized vocabulary), or with `--use_peft true`
the LoRA adapter's disabled base. Every key is a field of TRL's `DPOConfig` or `ModelConfig` or of
`genesis_hf.posttrain.config.DPODataArguments`/`TrainingEvalArguments` (`--eval_tasks piqa --eval_limit 100` scores
every saved checkpoint with lm-eval). Outputs as `recipes/sft.py`: `final/`, `metrics.jsonl` (with
`rewards/margins` and `rewards/accuracies`), `adapter/` with LoRA, per-checkpoint Hub branches with `--push_to_hub`.
"""

import copy
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trl import DPOConfig, DPOTrainer, ModelConfig

from genesis_hf.evaluate.during_training import checkpoint_evaluator
from genesis_hf.model.lineage import finetune_lineage
from genesis_hf.posttrain.config import (
    DPODataArguments,
    RunFolderArguments,
    TrainingEvalArguments,
    hub_push_settings,
    parse_recipe_args,
)
from genesis_hf.posttrain.data import build_preference_dataset
from genesis_hf.posttrain.model import chat_model, lora_config
from genesis_hf.posttrain.outputs import check_lora_topology, run_callbacks, train_and_write_final
from genesis_hf.posttrain.resume import check_training_settings, plan_run, run_settings
from genesis_hf.publish.push import pusher_for_run
from genesis_hf.writer_lock import FolderLock, hold_folder

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "dpo" / "genesis-tiny.yaml"
logger = logging.getLogger("genesis_hf.dpo")


def main(argv: list[str] | None = None, callbacks: Sequence = ()) -> int:
    """Run the recipe; `callbacks` are extra subscribers to the run's events (`genesis_hf.events.TrainingCallback`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    lock = FolderLock(None)
    try:
        data_args, eval_args, run_args, training_args, model_args = parse_recipe_args(
            (DPODataArguments, TrainingEvalArguments, RunFolderArguments, DPOConfig, ModelConfig), argv, DEFAULT_CONFIG
        )
        push = hub_push_settings(training_args)
        check_training_settings(training_args)
        # One writer per folder, held until the run ends; a refused launch lets it go and leaves nothing behind.
        lock = hold_folder(training_args.output_dir, rank=training_args.process_index)
        # The output folder: resume the run it holds, or refuse to replace its results (nothing is loaded yet).
        settings = run_settings("dpo", data_args, training_args, model_args)
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
        # Data first: a bad pair stops the run before any model is loaded.
        dataset, skipped = build_preference_dataset(
            data_args.dataset_name,
            on_bad_example=data_args.on_bad_example,
            config=data_args.dataset_config,
            split=data_args.dataset_train_split,
        )
        model, tokenizer, setup, source = chat_model(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
        )
        lineage = finetune_lineage(
            "dpo",
            sys.argv[1:] if argv is None else argv,
            base_model=source,
            base_model_revision=model_args.model_revision,
            data=data_args.dataset_name,
            datasets=[data_args.dataset_name],
            hub_model_id=training_args.hub_model_id if training_args.push_to_hub else None,
        )
        peft_config = lora_config(model_args, setup, tied_embeddings=model.config.tie_word_embeddings)
        check_lora_topology(peft_config)
        # Checks the repo id and token before anything loads; uploads each checkpoint in the background.
        pusher = pusher_for_run(push, is_main_process=training_args.process_index == 0)
        if pusher is not None:
            pusher.lineage = lineage  # for the cards of the checkpoint-N branches
    # ConfigError and ConversationError are ValueErrors, as are TRL's own argument checks.
    except ValueError as error:
        lock.release()
        print(f"recipes/dpo.py: error: {error}", file=sys.stderr, flush=True)
        return 1
    with lock:
        logger.info("Starting from %s. %s", source, setup.describe())
        logger.info("%d preference pairs; skipped: %s.", len(dataset), skipped.describe())

        # TRL would reload the reference from model_name_or_path, without the chat tokens just added (an IndexError);
        # the reference is this model as it starts. With LoRA the adapter's disabled base is the reference.
        ref_model = None if peft_config is not None else copy.deepcopy(model).eval()
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=training_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=run_callbacks([*callbacks, pusher, evaluator]),
        )
        train_and_write_final(trainer, tokenizer, training_args, "Aligned model", logger, plan, lineage)
        return 0


if __name__ == "__main__":
    sys.exit(main())
