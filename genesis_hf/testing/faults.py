"""A fault injector for the test suite: a training-run subscriber (genesis_hf.events) that breaks a run on purpose.

The faults are read from the environment variable `GENESIS_HF_FAULT` (comma-separated `kind:STEP` or
`kind:FIRST-LAST`):

- `kill_during_save:STEP`: every rank SIGKILLs itself while saving step `STEP`, after all shards are written and
  before the rename (`on_checkpoint_staged`), to prove an interrupted save is never mistaken for a checkpoint.
- `kill_after_save:STEP`: the main process SIGKILLs itself once the checkpoint of step `STEP` is complete and visible
  (`on_checkpoint_saved`; TRL's `checkpoint-N` in SFT/DPO runs), as a crash between two saves would.
- `nonfinite_loss:STEPS`: rank 0's loss becomes NaN at those steps (a forward hook on the model), to test skipping
  and stopping.
- `slow_step:STEPS`: sleep 0.5 s after those steps (`on_step_end`), so a test can SIGKILL the run mid-way.

Production code never reads the variable. A test runs a recipe through this module instead, which hands the injector
to the recipe's `main(argv, callbacks=[...])`:

    python -m genesis_hf.testing.faults recipes/pretrain.py --config run.yaml
    accelerate launch -m genesis_hf.testing.faults recipes/pretrain.py --config run.yaml
"""

import importlib.util
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from genesis_hf.events import TrainingCallback

FAULT_ENV = "GENESIS_HF_FAULT"
FAULT_KINDS = ("kill_during_save", "kill_after_save", "nonfinite_loss", "slow_step")
logger = logging.getLogger(__name__)


def parse_faults(spec: str) -> dict[str, set[int]]:
    """`"nonfinite_loss:3,nonfinite_loss:6-8"` -> `{"nonfinite_loss": {3, 6, 7, 8}}`."""
    faults: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, value = item.partition(":")
        if kind not in FAULT_KINDS or not value:
            raise ValueError(
                f"{FAULT_ENV} item {item!r} is not KIND:STEP or KIND:FIRST-LAST with KIND in {FAULT_KINDS}."
            )
        first, _, last = value.partition("-")
        faults.setdefault(kind, set()).update(range(int(first), int(last or first) + 1))
    return faults


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class FaultInjector(TrainingCallback):
    """Injects the faults of `spec` (see the module docstring) into the run it subscribes to."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.faults = parse_faults(spec)
        self.step = 0

    @classmethod
    def from_env(cls) -> "FaultInjector":
        return cls(os.environ.get(FAULT_ENV, ""))

    def steps(self, kind: str) -> set[int]:
        return self.faults.get(kind, set())

    def on_train_begin(self, run_dir: Path, model: Any) -> None:
        if self.steps("nonfinite_loss") and _rank() == 0:
            model.register_forward_hook(self._poison_loss)

    def _poison_loss(self, module, inputs, output):
        # Training forwards only: the held-out evaluation at the same step stays finite, as a real bad batch would.
        if module.training and self.step in self.steps("nonfinite_loss") and getattr(output, "loss", None) is not None:
            output.loss = output.loss * float("nan")
        return output

    def on_step_begin(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step: int, record: dict[str, Any]) -> None:
        if step in self.steps("slow_step"):
            time.sleep(0.5)

    def on_checkpoint_staged(self, staging_dir: Path, step: int) -> None:
        if step in self.steps("kill_during_save"):
            self._kill(step)

    def on_checkpoint_saved(self, checkpoint_dir: Path, step: int) -> None:
        if step in self.steps("kill_after_save"):
            self._kill(step)

    def _kill(self, step: int) -> None:
        logger.error("%s=%s: killing this process at step %d (test hook).", FAULT_ENV, self.spec, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def run_recipe(recipe: str | Path, argv: list[str]) -> int:
    """Run `recipe`'s `main(argv, callbacks=[FaultInjector.from_env()])`."""
    spec = importlib.util.spec_from_file_location("recipe_under_test", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv, callbacks=[FaultInjector.from_env()])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m genesis_hf.testing.faults RECIPE.py [recipe flags...]")
    sys.exit(run_recipe(sys.argv[1], sys.argv[2:]))
