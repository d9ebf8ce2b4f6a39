"""Small lm-eval runs during training (`--eval_tasks`, `--eval_limit`), as subscribers to the training stages' events.

Pretraining and post-training never import this stage; the recipes build a subscriber here and hand it in:

- `CheckpointEvaluator`: checks the task names when it is built (before training starts). Called as
  `evaluator(checkpoint_dir, step)`, it evaluates that checkpoint the way `genesis-hf eval CHECKPOINT --limit N
  --no_sanity_gate` does and returns `{"eval/<task>/<metric>": value}`. It subscribes to `on_checkpoint_saved`
  (`genesis_hf.events`), pretraining's and, through `TrainerEvents`, TRL's: pretraining logs the dict to
  `metrics.jsonl` (an `"event": "eval"` record with the step) and its trackers, post-training through `Trainer.log`
  (`state.log_history`, `metrics.jsonl`, the `report_to` trackers).

The evaluation runs on the training device in a single-process run and on the CPU of rank 0 otherwise (the other
ranks wait for it at their next collective, so keep `--eval_limit` small). lm-eval seeds python, numpy and torch;
the generators are restored afterwards, so training draws the same random numbers with or without these evals.
"""

import logging
import tempfile
import time
from pathlib import Path

from genesis_hf.evaluate import harness
from genesis_hf.evaluate.harness import EvalError

logger = logging.getLogger(__name__)

METRIC_PREFIX = "eval"


def split_tasks(value: str | list[str] | None) -> list[str]:
    """`--eval_tasks` (comma-separated, or a YAML list) as a list of names."""
    items = value if isinstance(value, list) else str(value or "").split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's `results` block as `{"eval/<task>/<metric>": value}`; a filter other than `none` stays in the name
    (`eval/gsm8k/exact_match,strict-match`). Non-numbers (`alias`, stderr `N/A`) are left out."""
    metrics = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else key
            metrics[f"{METRIC_PREFIX}/{task}/{name}"] = value
    return metrics


def _default_device() -> str:
    import torch

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return "cpu"  # the GPUs hold the sharded training state; rank 0's CPU evaluates a full copy
    return "cuda" if torch.cuda.is_available() else "cpu"


class CheckpointEvaluator:
    """Evaluate a checkpoint on a few lm-eval tasks with `limit` documents each; returns the flattened scores.

    Args:
        tasks: lm-eval task, group or tag names (local ones under `include_path`).
        limit: documents per task (the first `limit`).
        include_path: extra task folders (e.g. from `genesis-hf eval_tasks`).
        batch_size: lm-eval's batch size (`auto` as in `genesis-hf eval`).
        device: where the evaluation runs; by default the training device in a single process, else the CPU.

    Raises:
        EvalError: a task name that neither lm-eval nor `include_path` knows (checked here, before training).
    """

    def __init__(
        self,
        tasks: list[str],
        *,
        limit: int,
        include_path: list[str] = (),
        batch_size: str = "auto",
        device: str | None = None,
    ) -> None:
        if not tasks:
            raise EvalError("--eval_tasks is empty; pass lm-eval task names, e.g. --eval_tasks hellaswag,piqa.")
        for folder in include_path:
            if not Path(folder).is_dir():
                raise EvalError(
                    f"--eval_include_path {folder!r} is not a folder; write one with `genesis-hf eval_tasks`."
                )
        self.tasks, self.limit, self.batch_size, self.device = list(tasks), limit, batch_size, device
        self.task_manager = harness.load_task_manager(self.tasks, list(include_path))

    def __call__(self, checkpoint_dir: str | Path, step: int) -> dict[str, float]:
        from genesis_hf.pretrain.checkpoint import capture_rng_state, restore_rng_state

        device = self.device or _default_device()
        on_gpu = device.startswith("cuda")
        started = time.perf_counter()
        rng_state = capture_rng_state()
        try:
            with tempfile.TemporaryDirectory(prefix="genesis-eval-") as workdir:
                target = harness.resolve_target(str(checkpoint_dir), Path(workdir), log=logger.info)
                export_dtype = "bf16" if on_gpu else "fp32"
                harness.export_for_evaluation(target, Path(workdir), export_dtype=export_dtype, log=logger.info)
                results = harness.evaluate_target(
                    target,
                    self.tasks,
                    task_manager=self.task_manager,
                    num_fewshot=None,
                    limit=self.limit,
                    batch_size=self.batch_size,
                    device=device,
                    dtype="bfloat16" if on_gpu else "float32",
                    log_samples=False,
                )
        finally:
            restore_rng_state(rng_state)
        metrics = flatten_results(results)
        logger.info(
            "Evaluated %s (step %d) on %s, %d documents each, in %.1fs: %s",
            checkpoint_dir,
            step,
            ",".join(self.tasks),
            self.limit,
            time.perf_counter() - started,
            ", ".join(f"{name} {value:.4g}" for name, value in metrics.items() if "_stderr" not in name),
        )
        return metrics


def checkpoint_evaluator(
    eval_tasks: str | list[str] | None, *, eval_limit: int, eval_include_path: str | list[str] | None = None
) -> CheckpointEvaluator | None:
    """The evaluator the `--eval_tasks/--eval_limit/--eval_include_path` flags ask for; `None` without tasks."""
    tasks = split_tasks(eval_tasks)
    if not tasks:
        return None
    return CheckpointEvaluator(tasks, limit=eval_limit, include_path=split_tasks(eval_include_path))


__all__ = [
    "CheckpointEvaluator",
    "checkpoint_evaluator",
    "flatten_results",
    "split_tasks",
]
