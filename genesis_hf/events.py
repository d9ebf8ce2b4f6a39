"""One event interface for training runs: what happened (a step was logged, a checkpoint saved, the run finished),
announced by the training loop to subscribers that act on it (the Hub pusher, the final export, checkpoint
evaluations, the test suite's fault injector).

The pretraining loop (`genesis_hf.pretrain.trainer`) calls `TrainingCallback`s directly. TRL's SFT/DPO trainers call
transformers' `TrainerCallback`s; `TrainerEvents` turns those calls into the same events, so one subscriber serves
pretraining, SFT and DPO. A stage that produces events never imports a stage that consumes them: the recipe (or the
caller of `run_pretraining`) hands the subscribers in.

Where each event fires:

| event                  | pretraining loop                           | TRL trainers (through `TrainerEvents`)      |
|------------------------|--------------------------------------------|---------------------------------------------|
| `on_train_begin`       | every rank, before the first step          | every process, `on_train_begin`             |
| `on_step_begin`        | every rank, before each optimizer step     | every process, `on_step_begin`              |
| `on_step_end`          | every rank, with the step's metrics record | every process, `on_log` (the logged dict)   |
| `on_checkpoint_staged` | every rank, shards written, not yet visible| -                                           |
| `on_checkpoint_saved`  | main process, the checkpoint is visible    | main process, `on_save` (`checkpoint-N`)    |
| `on_train_end`         | main process, after the last checkpoint    | main process, after `final/` is written     |
| `close`                | every rank, always (also after an error)   | every process, after `on_train_end`         |
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class TrainingCallback:
    """A subscriber to a training run's events; every method does nothing unless overridden.

    Subscribers are called in the order they were given. `on_checkpoint_saved` may return a dict of metrics about the
    checkpoint (an evaluation's scores), which the loop logs at that step.
    """

    def on_train_begin(self, run_dir: Path, model: Any) -> None:
        """Training is about to start (`model` is the module being trained, wrapped as the loop runs it)."""

    def on_step_begin(self, step: int) -> None:
        """Optimizer step number `step` (1-based) is about to run."""

    def on_step_end(self, step: int, record: dict[str, Any]) -> None:
        """Step `step` is done; `record` is what was logged for it (loss, lr, ...)."""

    def on_checkpoint_staged(self, staging_dir: Path, step: int) -> None:
        """The checkpoint of `step` is fully written to `staging_dir` and about to be made visible (renamed)."""

    def on_checkpoint_saved(self, checkpoint_dir: Path, step: int) -> dict[str, Any] | None:
        """The checkpoint of `step` is complete and visible at `checkpoint_dir`."""
        return None

    def may_delete(self, checkpoint_dir: Path) -> bool:
        """Whether rotation may delete `checkpoint_dir` now (the Hub pusher keeps one until its upload is confirmed)."""
        return True

    def on_train_end(self, run_dir: Path, checkpoint_dir: Path | None, step: int) -> None:
        """The run finished; `checkpoint_dir` is its last good checkpoint (pretraining) or its `final/` (SFT/DPO), and
        `step` the step that folder holds."""

    def close(self) -> None:
        """The run is over, normally or not: finish or hand over background work."""


class CheckpointFunction(TrainingCallback):
    """A plain `function(checkpoint_dir, step) -> dict | None` as a subscriber to `on_checkpoint_saved`."""

    def __init__(self, function: Callable[[Path, int], dict[str, Any] | None]) -> None:
        self.function = function

    def on_checkpoint_saved(self, checkpoint_dir: Path, step: int) -> dict[str, Any] | None:
        return self.function(checkpoint_dir, step)


def as_callback(subscriber: "TrainingCallback | Callable[[Path, int], Any]") -> TrainingCallback:
    """A `TrainingCallback` as it is; a function of `(checkpoint_dir, step)` wrapped in `CheckpointFunction`."""
    if isinstance(subscriber, TrainingCallback):
        return subscriber
    if callable(subscriber):
        return CheckpointFunction(subscriber)
    raise TypeError(
        f"{subscriber!r} is not a TrainingCallback nor a function of (checkpoint_dir, step); subclass "
        "genesis_hf.events.TrainingCallback."
    )


class Events(TrainingCallback):
    """Many subscribers behind one: each event goes to every subscriber, in order.

    Args:
        subscribers: `TrainingCallback`s, or functions of `(checkpoint_dir, step)` (see `as_callback`).
        metrics_sink: where the metrics that `on_checkpoint_saved` subscribers return go, as `sink(step, metrics)`.
    """

    def __init__(
        self,
        subscribers: Sequence["TrainingCallback | Callable[[Path, int], Any]"] = (),
        metrics_sink: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.subscribers = [as_callback(subscriber) for subscriber in subscribers]
        self.metrics_sink = metrics_sink

    def add(self, subscriber: "TrainingCallback | Callable[[Path, int], Any]") -> None:
        self.subscribers.append(as_callback(subscriber))

    def on_train_begin(self, run_dir: Path, model: Any) -> None:
        for subscriber in self.subscribers:
            subscriber.on_train_begin(run_dir, model)

    def on_step_begin(self, step: int) -> None:
        for subscriber in self.subscribers:
            subscriber.on_step_begin(step)

    def on_step_end(self, step: int, record: dict[str, Any]) -> None:
        for subscriber in self.subscribers:
            subscriber.on_step_end(step, record)

    def on_checkpoint_staged(self, staging_dir: Path, step: int) -> None:
        for subscriber in self.subscribers:
            subscriber.on_checkpoint_staged(staging_dir, step)

    def on_checkpoint_saved(self, checkpoint_dir: Path, step: int) -> dict[str, Any] | None:
        collected: dict[str, Any] = {}
        for subscriber in self.subscribers:
            metrics = subscriber.on_checkpoint_saved(checkpoint_dir, step)
            if isinstance(metrics, dict):
                collected.update(metrics)
        if collected and self.metrics_sink is not None:
            self.metrics_sink(step, collected)
        return collected or None

    def may_delete(self, checkpoint_dir: Path) -> bool:
        return all(subscriber.may_delete(checkpoint_dir) for subscriber in self.subscribers)

    def on_train_end(self, run_dir: Path, checkpoint_dir: Path | None, step: int) -> None:
        for subscriber in self.subscribers:
            subscriber.on_train_end(run_dir, checkpoint_dir, step)

    def close(self) -> None:
        errors = []
        for subscriber in self.subscribers:
            try:
                subscriber.close()
            except Exception as error:  # every subscriber gets closed; the first failure is raised after
                errors.append(error)
        if errors:
            raise errors[0]


class TrainerEvents(TrainerCallback):
    """transformers' `TrainerCallback` calls (TRL's SFT/DPO trainers) as genesis_hf training events.

    `on_train_end` is not forwarded from the Trainer: a post-training run ends when its `final/` folder is written,
    after `trainer.train()` returns, so the recipe calls `finish(run_dir, final_dir, step)` then.

    Args:
        subscribers: as for `Events`.
        metrics_sink: receives `(step, metrics)` from `on_checkpoint_saved` subscribers (post-training sets it to log
            through the trainer).
    """

    def __init__(
        self,
        subscribers: Sequence["TrainingCallback | Callable[[Path, int], Any]"] = (),
        metrics_sink: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.events = Events(subscribers, metrics_sink)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.events.on_train_begin(Path(args.output_dir), model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.on_step_begin(state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.events.on_step_end(state.global_step, dict(logs))

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint_dir.is_dir():
            self.events.on_checkpoint_saved(checkpoint_dir, state.global_step)

    def finish(self, run_dir: str | Path, final_dir: Path | None, step: int, *, is_main_process: bool) -> None:
        """The run is over: `on_train_end` on the main process (with its `final/`), then `close` everywhere."""
        try:
            if is_main_process:
                self.events.on_train_end(Path(run_dir), final_dir, step)
        finally:
            self.events.close()


__all__ = ["CheckpointFunction", "Events", "TrainerEvents", "TrainingCallback", "as_callback"]
