"""Learning-rate schedules that can be extended on resume: cosine with warmup, and warmup-stable-decay (WSD).

A long pretraining run is often planned for N steps and then extended (the seed project trained 20,000 steps, then
went on to 40,000). A schedule that is a fixed function of `max_steps` cannot do that without a jump in the learning
rate, so the schedule here is stored as a list of *segments* (start step, end step, start LR, end LR, shape) and
`set_max_steps` appends new segments instead of rewriting the function. Segments are plain Python values, so
`state_dict()` is JSON-serialisable and a resumed run reproduces the learning rates of the original one exactly.

Schedules (`step` counts optimizer steps, from 0):

- `cosine`: linear warmup from 0 to `learning_rate` over `warmup_steps` (the LR of step 0 is 0, as in transformers'
  `get_cosine_schedule_with_warmup`), then a half cosine from `learning_rate` down to `min_learning_rate` at
  `max_steps`, then `min_learning_rate` for any step after it.
- `wsd` (warmup-stable-decay): the same warmup, then `learning_rate` held constant, then a linear decay to
  `min_learning_rate` over the last `decay_steps` steps. `decay_steps` defaults to 20% of `max_steps` (and then stays
  20% of the new `max_steps` on extension); an explicit `decay_steps` keeps its length on extension.

Extension policy (`set_max_steps(new_max_steps)` at current step `s`, where the LR is `lr_s`):

- `cosine`: once the cosine has begun, the schedule continues from `lr_s` with a new half cosine from `lr_s` down to
  `min_learning_rate` at `new_max_steps`. The LR is continuous (no jump) and the new decay is slower than the old
  one. During warmup the warmup finishes as planned and the cosine simply ends at `new_max_steps`, exactly as if the
  run had been started with the new horizon. Extending after the cosine has ended keeps `min_learning_rate`: this
  policy never raises the learning rate (re-warming is a different decision, not an extension).
- `wsd`: the decay moves to the new end. If the decay had not begun, the LR stays at `learning_rate` until
  `new_max_steps - decay_steps`. If it had begun, it restarts from the current LR: `lr_s` is held until the new decay
  start and then decays linearly to `min_learning_rate` at `new_max_steps` (again, no jump and never upwards).
- Shrinking `max_steps` is allowed down to the current step (the same rules apply over the shorter horizon); below
  the current step, or before the end of warmup, it is a `ValueError`.

After `load_state_dict` the schedule is the saved one (including its `max_steps`), whatever the constructor was given;
a trainer that resumes with a larger `max_steps` then calls `set_max_steps(max_steps)`, which is a no-op when the value
is unchanged.
"""

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("cosine", "wsd")
# WSD's decay length when `decay_steps` is not given, as a fraction of `max_steps` (Hägele et al. 2024 find 10-20%
# of the run enough to match a cosine schedule).
DEFAULT_WSD_DECAY_FRACTION = 0.2
_SHAPES = ("linear", "cosine")
_STATE_KEYS = (
    "schedule",
    "learning_rate",
    "min_learning_rate",
    "warmup_steps",
    "max_steps",
    "decay_steps",
    "decay_fraction",
    "segments",
    "last_epoch",
    "step_count",
)


def _segment(start: int, end: int, start_lr: float, end_lr: float, shape: str) -> dict[str, Any]:
    return {"start": int(start), "end": int(end), "start_lr": float(start_lr), "end_lr": float(end_lr), "shape": shape}


def _segment_lr(segment: dict[str, Any], step: int) -> float:
    # The endpoints are returned as stored, not recomputed, so that a segment appended at step s starts at exactly
    # the LR the previous segment gave at s (floating point would otherwise drift by an ulp).
    if step >= segment["end"]:
        return segment["end_lr"]
    if step <= segment["start"]:
        return segment["start_lr"]
    progress = (step - segment["start"]) / (segment["end"] - segment["start"])
    if segment["shape"] == "cosine":
        weight = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        weight = 1.0 - progress
    return segment["end_lr"] + (segment["start_lr"] - segment["end_lr"]) * weight


class GenesisLRScheduler(LRScheduler):
    """An extensible LR schedule: `cosine` (the seed's 1e-4 -> 1e-5, 1,000 warmup steps) or `wsd`, stored as segments
    (see the module docstring) and extended with `set_max_steps`.

    Call `scheduler.step()` after each `optimizer.step()`. On resume, call `load_state_dict` and then
    `set_max_steps(max_steps)` to extend; see the module docstring for the extension policy. Every parameter group gets
    the schedule's LR: the schedule's `learning_rate` is authoritative, whatever `lr` the optimizer was created with.

    Args:
        optimizer: the optimizer to drive (it sets `param_groups[*]["lr"]`).
        schedule: `"cosine"` (warmup, then cosine to `min_learning_rate` at `max_steps`) or `"wsd"` (warmup, constant
            `learning_rate`, then linear decay over the last `decay_steps`).
        learning_rate: peak LR, reached at the end of warmup.
        min_learning_rate: final LR, reached at `max_steps` and kept afterwards.
        warmup_steps: steps of linear warmup from 0 (the LR of step 0 is 0).
        max_steps: total optimizer steps planned.
        decay_steps: `wsd` only; length of the final decay, default 20% of `max_steps` (and 20% of the new
            `max_steps` after an extension). Passing it with `cosine` is an error.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: str,
        learning_rate: float,
        min_learning_rate: float,
        warmup_steps: int,
        max_steps: int,
        decay_steps: int | None = None,
    ) -> None:
        _check_arguments(schedule, learning_rate, min_learning_rate, warmup_steps, max_steps, decay_steps)
        self.schedule = schedule
        self.learning_rate = float(learning_rate)
        self.min_learning_rate = float(min_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.decay_fraction = DEFAULT_WSD_DECAY_FRACTION if schedule == "wsd" and decay_steps is None else None
        self.decay_steps = self._decay_length(self.max_steps, decay_steps) if schedule == "wsd" else None
        self.segments = self._initial_segments()
        # The base class runs step() once, which sets every group to the LR of step 0.
        super().__init__(optimizer)

    def _decay_length(self, max_steps: int, decay_steps: int | None) -> int:
        length = decay_steps if decay_steps is not None else round(self.decay_fraction * max_steps)
        if not 0 < length <= max_steps - self.warmup_steps:
            source = "decay_steps" if self.decay_fraction is None else f"{self.decay_fraction:.0%} of max_steps"
            raise ValueError(
                f"The WSD decay length ({source} = {length}) must be between 1 and max_steps - warmup_steps = "
                f"{max_steps - self.warmup_steps}; pass a decay_steps in that range or change warmup_steps/max_steps."
            )
        return length

    def _initial_segments(self) -> list[dict[str, Any]]:
        segments = []
        if self.warmup_steps > 0:
            segments.append(_segment(0, self.warmup_steps, 0.0, self.learning_rate, "linear"))
        if self.schedule == "cosine":
            segments.append(
                _segment(self.warmup_steps, self.max_steps, self.learning_rate, self.min_learning_rate, "cosine")
            )
        else:
            decay_start = self.max_steps - self.decay_steps
            segments.append(_segment(self.warmup_steps, decay_start, self.learning_rate, self.learning_rate, "linear"))
            segments.append(
                _segment(decay_start, self.max_steps, self.learning_rate, self.min_learning_rate, "linear")
            )
        return segments

    def lr_at_step(self, step: int) -> float:
        """The learning rate of optimizer step `step` under the current schedule (a pure function of `step`).

        Args:
            step: optimizer step, counted from 0.
        """
        # Later segments override earlier ones from their start on: extensions append, history stays intact.
        current = self.segments[0]
        for segment in self.segments[1:]:
            if segment["start"] <= step:
                current = segment
        return _segment_lr(current, step)

    def get_lr(self) -> list[float]:
        return [self.lr_at_step(self.last_epoch)] * len(self.optimizer.param_groups)

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def set_max_steps(self, new_max_steps: int) -> None:
        """Extend (or shorten) the schedule on resume without a jump in the learning rate.

        At the current step `s` (the number of `step()` calls so far) with LR `lr_s`: a cosine schedule continues
        from `lr_s` with a new half cosine down to `min_learning_rate` at `new_max_steps` (during warmup, the warmup
        finishes and the cosine ends at `new_max_steps`); a WSD schedule moves its decay to the new end, holding
        `lr_s` until the decay starts if it had already begun. The new segments are stored in `state_dict()`, so a
        later resume reproduces the same LRs, and extending twice works the same way. Calling it with the current
        `max_steps` does nothing.

        Args:
            new_max_steps: the new total number of optimizer steps.

        Raises:
            ValueError: `new_max_steps` is below the current step or ends before warmup does.
        """
        if isinstance(new_max_steps, bool) or not isinstance(new_max_steps, int):
            raise ValueError(f"new_max_steps must be an integer, got {new_max_steps!r}.")
        if new_max_steps == self.max_steps:
            return
        current_step = max(self.last_epoch, 0)
        if new_max_steps < current_step:
            raise ValueError(
                f"Cannot set max_steps to {new_max_steps}: training is already at step {current_step}. "
                f"Pass a max_steps of at least {current_step} (the previous max_steps was {self.max_steps})."
            )
        if new_max_steps < self.warmup_steps:
            raise ValueError(
                f"Cannot set max_steps to {new_max_steps}: it ends before warmup does (warmup_steps="
                f"{self.warmup_steps}, current step {current_step}). Pass a max_steps of at least {self.warmup_steps}."
            )
        # Never rewrite warmup: a change made during warmup only takes effect where the post-warmup phase starts.
        start = max(current_step, self.warmup_steps)
        start_lr = self.lr_at_step(start)
        if self.schedule == "cosine":
            self.segments.append(_segment(start, new_max_steps, start_lr, self.min_learning_rate, "cosine"))
        else:
            if self.decay_fraction is not None:
                self.decay_steps = max(1, round(self.decay_fraction * new_max_steps))
            decay_start = min(max(start, new_max_steps - self.decay_steps), new_max_steps)
            self.segments.append(_segment(start, decay_start, start_lr, start_lr, "linear"))
            self.segments.append(_segment(decay_start, new_max_steps, start_lr, self.min_learning_rate, "linear"))
        self.max_steps = new_max_steps
        self._apply(current_step)

    def _apply(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(self.lr_at_step(step))
            else:
                group["lr"] = self.lr_at_step(step)
        self._last_lr = [self.lr_at_step(step)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """The schedule and position as plain Python values (JSON-serialisable; no optimizer, no callables)."""
        return {
            "schedule": self.schedule,
            "learning_rate": self.learning_rate,
            "min_learning_rate": self.min_learning_rate,
            "warmup_steps": self.warmup_steps,
            "max_steps": self.max_steps,
            "decay_steps": self.decay_steps,
            "decay_fraction": self.decay_fraction,
            "segments": [dict(segment) for segment in self.segments],
            "last_epoch": self.last_epoch,
            "step_count": self._step_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`: the saved schedule replaces the constructor's, and every param group's LR is set
        to the LR of the saved step (so the order of this call and `optimizer.load_state_dict` does not matter).

        Args:
            state_dict: a dict returned by `state_dict()`, possibly after a JSON round trip.
        """
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(
                f"Scheduler state is missing {missing}; it was not written by GenesisLRScheduler.state_dict() "
                f"(keys found: {sorted(state_dict)})."
            )
        try:
            segments = [_segment(**segment) for segment in state_dict["segments"]]
        except TypeError as error:
            raise ValueError(
                f"Scheduler state has malformed segments ({error}): {state_dict['segments']!r}."
            ) from None
        if not segments or any(segment["shape"] not in _SHAPES for segment in segments):
            raise ValueError(f"Scheduler state has invalid segments: {state_dict['segments']!r}.")
        self.schedule = state_dict["schedule"]
        self.learning_rate = float(state_dict["learning_rate"])
        self.min_learning_rate = float(state_dict["min_learning_rate"])
        self.warmup_steps = int(state_dict["warmup_steps"])
        self.max_steps = int(state_dict["max_steps"])
        self.decay_steps = state_dict["decay_steps"]
        self.decay_fraction = state_dict["decay_fraction"]
        self.segments = segments
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["step_count"])
        self._apply(self.last_epoch)


def _check_arguments(
    schedule: str,
    learning_rate: float,
    min_learning_rate: float,
    warmup_steps: int,
    max_steps: int,
    decay_steps: int | None,
) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown LR schedule {schedule!r}. Valid schedules are: {', '.join(SCHEDULES)}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
    if not 0 <= min_learning_rate <= learning_rate:
        raise ValueError(
            f"min_learning_rate must be between 0 and learning_rate={learning_rate!r}, got {min_learning_rate!r}."
        )
    for name, value in (("warmup_steps", warmup_steps), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if max_steps < 1 or warmup_steps > max_steps:
        raise ValueError(
            f"Need 1 <= max_steps and warmup_steps <= max_steps, got warmup_steps={warmup_steps}, "
            f"max_steps={max_steps}."
        )
    if decay_steps is not None:
        if schedule != "wsd":
            raise ValueError(
                f"decay_steps={decay_steps} only applies to schedule='wsd' (the {schedule!r} schedule decays from the "
                "end of warmup to max_steps); remove it or use schedule='wsd'."
            )
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int):
            raise ValueError(f"decay_steps must be an integer or None, got {decay_steps!r}.")


# The name the trainer and `genesis_hf.pretrain` export; the class builds the scheduler from the same arguments.
build_lr_scheduler = GenesisLRScheduler


__all__ = ["DEFAULT_WSD_DECAY_FRACTION", "SCHEDULES", "GenesisLRScheduler", "build_lr_scheduler"]
