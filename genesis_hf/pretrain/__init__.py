"""Stage 4, pretraining: `run_pretraining(PretrainArguments, callbacks)` (what `recipes/pretrain.py` calls) and its
parts. The loop announces its events (`genesis_hf.events`) and imports no later stage.

- `config`: `PretrainArguments`, the batch geometry (`tokens_per_step` -> gradient accumulation).
- `distributed`: Accelerator setup, FSDP2/DDP wrapping, consumer-GPU environment.
- `checkpoint`: sharded DCP checkpoints, atomic publication, resume checks, `load_model_from_checkpoint`.
- `trainer`: builders, the training loop, validation, metrics.
- `final`: `FinalExport`, the subscriber that writes `final/` with the one model-folder writer.
- `reference`: the unigram line the held-out loss must go below, greedy samples, the end-of-run report.
- `schedules`, `flops`, `plan`: extensible LR schedules, FLOPs/MFU, memory and time planning.

Importing this package is cheap: the submodules load on first use.
"""

import importlib
from typing import Any

_EXPORTS = {
    "PretrainArguments": "config",
    "run_pretraining": "trainer",
    "list_checkpoints": "checkpoint",
    "load_model_from_checkpoint": "checkpoint",
    "CheckpointInfo": "checkpoint",
    "build_lr_scheduler": "schedules",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
