"""`metrics.jsonl` out of TRL's trainers, as a `TrainerCallback`, in the format pretraining writes.

The run's other events (checkpoints saved, the end of the run) reach their subscribers, such as the Hub pusher,
through `genesis_hf.events.TrainerEvents`, the same interface the pretraining loop calls.
"""

import json
import math
from pathlib import Path

from transformers import TrainerCallback

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


__all__ = ["MetricsJsonlCallback"]
