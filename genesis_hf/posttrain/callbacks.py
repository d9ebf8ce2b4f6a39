"""Events out of TRL's trainers: `metrics.jsonl` lines and checkpoint announcements, as `TrainerCallback`s.

TRL's `SFTTrainer` and `DPOTrainer` call transformers' callbacks, so publishing subscribes to a saved checkpoint the
same way for pretraining, SFT and DPO: `CheckpointEventsCallback([pusher.submit_copy])` (the Trainer deletes old
`checkpoint-N` folders beyond `save_total_limit` on its own, so the pusher uploads from a copy it owns).
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from genesis_hf.layout import METRICS_FILE


class MetricsJsonlCallback(TrainerCallback):
    """Append every dict the trainer logs (TRL's loss, `mean_token_accuracy`, `rewards/margins`, ...) to
    `<output_dir>/metrics.jsonl`, one JSON object per line with its `step`, on the main process only.

    Args:
        path: the file; `<args.output_dir>/metrics.jsonl` when `None`.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = self.path or Path(args.output_dir) / METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            # JSON has no NaN/inf; a non-finite loss is written as null rather than breaking the file.
            record[key] = None if isinstance(value, float) and not math.isfinite(value) else value
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class CheckpointEventsCallback(TrainerCallback):
    """Call each subscriber with `(checkpoint_dir, step)` once the trainer has saved a checkpoint (main process).

    Args:
        subscribers: callables such as `CheckpointPusher.submit_copy`.
    """

    def __init__(self, subscribers: list[Callable[[Path, int], None]]) -> None:
        self.subscribers = list(subscribers)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint_dir.is_dir():
            for subscriber in self.subscribers:
                subscriber(checkpoint_dir, state.global_step)


__all__ = ["METRICS_FILE", "CheckpointEventsCallback", "MetricsJsonlCallback"]
