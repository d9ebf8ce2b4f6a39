"""Pretrain a Genesis model from scratch with Accelerate (FSDP2 or DDP), resumable from sharded checkpoints.

The README's first command trains `genesis-tiny` on the embedded corpus on a CPU in a few minutes:

    .venv/bin/accelerate launch recipes/pretrain.py

Genesis 1B on 2x RTX 4090 over PCIe (the seed project's Run 2):

    accelerate launch --config_file accelerate_configs/fsdp2-2x4090-pcie.yaml recipes/pretrain.py \
        --config recipes/configs/pretrain/genesis-1b.yaml

Plain torchrun works too (`torchrun --nproc_per_node 2 recipes/pretrain.py ...`). Relaunching the same command resumes
from the newest complete checkpoint in `--output_dir`; launching it with a larger `--max_steps` extends the run (the
LR schedule continues its decay over the new horizon). `--config file.yaml` gives defaults, flags override, and every
key is a field of `genesis_hf.pretrain.config.PretrainArguments`. `--eval_tasks piqa,arc_easy --eval_limit 100` scores
every checkpoint on a few lm-eval documents (logged to metrics.jsonl and the trackers); `--push_to_hub true
--hub_model_id you/name` uploads every checkpoint to its own Hub branch (`main` = newest). See docs/pretraining.md.
"""

import logging
import os
import sys
from collections.abc import Sequence

from genesis_hf.args import ConfigError, parse_args
from genesis_hf.data.mixture import load_mixture
from genesis_hf.evaluate.during_training import EvalError, checkpoint_evaluator
from genesis_hf.model.lineage import pretraining_lineage
from genesis_hf.pretrain.checkpoint import CheckpointError
from genesis_hf.pretrain.config import PretrainArguments
from genesis_hf.pretrain.distributed import configure_consumer_gpu_env
from genesis_hf.pretrain.trainer import NonFiniteLossError, run_pretraining
from genesis_hf.publish.push import pusher_for_run
from genesis_hf.writer_lock import hold_folder

logger = logging.getLogger("genesis_hf.pretrain")


def main(argv: list[str] | None = None, callbacks: Sequence = ()) -> int:
    """Run the recipe; `callbacks` are extra subscribers to the run's events (`genesis_hf.events.TrainingCallback`)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        (args,) = parse_args((PretrainArguments,), argv)
        # One writer per folder: a second launch into this --output_dir is refused while this one runs.
        with hold_folder(args.output_dir):
            # Before anything starts CUDA or NCCL: GeForce GPUs over PCIe need peer-to-peer off, expandable segments.
            applied = configure_consumer_gpu_env(args.consumer_gpu_env)
            if applied:
                logger.info("Consumer GPUs without NVLink: set %s", " ".join(f"{k}={v}" for k, v in applied.items()))
            # Optional small lm-eval runs at every checkpoint (--eval_tasks); task names are checked before training.
            evaluator = checkpoint_evaluator(
                args.eval_tasks, eval_limit=args.eval_limit, eval_include_path=args.eval_include_path
            )
            # Checks the repo id and token before training; the pusher uploads each checkpoint in the background.
            pusher = pusher_for_run(args, is_main_process=rank == 0)
            subscribers = [*callbacks, *(item for item in (evaluator, pusher) if item is not None)]
            # What the model cards say made it: this command and the mixture's Hub datasets.
            sources = [source.location for source in load_mixture(args.mixture).sources]
            lineage = pretraining_lineage(sys.argv[1:] if argv is None else argv, data=args.mixture, datasets=sources)
            run_pretraining(args, callbacks=subscribers, lineage=lineage)
    except (ConfigError, EvalError, CheckpointError, NonFiniteLossError) as error:
        print(f"[rank {rank}] {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
