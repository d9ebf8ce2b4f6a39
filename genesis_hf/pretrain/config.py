"""`PretrainArguments`: every knob of a pretraining run, with `transformers.TrainingArguments`' names where one exists.

Parsed with `genesis_hf.args.parse_args((PretrainArguments,), argv)`: `--config recipes/configs/pretrain/X.yaml` gives
defaults, CLI flags override, unknown keys are an error. The defaults train `genesis-tiny` on the embedded corpus on
a CPU in a few minutes; `recipes/configs/pretrain/genesis-1b.yaml` carries the seed project's Run 2.

The global batch is fixed in tokens (`tokens_per_step`), not in micro-batches: gradient accumulation is derived from
it and the world size, so 1, 2 or 8 GPUs train on the same number of tokens per optimizer step
(`resolve_gradient_accumulation`).
"""

import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any

from genesis_hf.args import ConfigError

SCHEDULE_TYPES = ("cosine", "wsd")
CONSUMER_GPU_ENV_POLICIES = ("auto", "on", "off")
TRACKERS = ("tensorboard", "wandb", "trackio", "none")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass
class PretrainArguments:
    """Arguments of `recipes/pretrain.py` (see the module docstring; each field's help says what it does)."""

    # Model and tokenizer
    model_preset: str = dataclasses.field(default="genesis-tiny", metadata=_help("GenesisConfig preset."))
    model_overrides: str | None = dataclasses.field(
        default=None,
        metadata=_help(
            'GenesisConfig fields over the preset: a YAML mapping, or JSON on the CLI ({"num_hidden_layers": 2}).'
        ),
    )
    attn_implementation: str = dataclasses.field(default="sdpa", metadata=_help("eager, sdpa, flash_attention_2, ..."))
    tokenizer_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata=_help("Tokenizer folder or Hub id; null trains/loads default_tokenizer(vocab_size of the model)."),
    )

    # Data
    mixture: str = dataclasses.field(
        default="default", metadata=_help("Mixture name (default, genesis-1b) or YAML path.")
    )
    tokenized_dir: str | None = dataclasses.field(default=None, metadata=_help("Pre-tokenized shards, if any."))
    seq_len: int = dataclasses.field(default=128, metadata=_help("Tokens per training sequence."))
    document_masking: bool = dataclasses.field(default=False, metadata=_help("Restart positions at each document."))
    per_device_train_batch_size: int = dataclasses.field(
        default=16, metadata=_help("Micro-batch (sequences) per rank.")
    )
    tokens_per_step: int | None = dataclasses.field(
        default=2048,
        metadata=_help("Global batch in tokens per optimizer step; gradient accumulation is derived from it."),
    )
    gradient_accumulation_steps: int | None = dataclasses.field(
        default=None, metadata=_help("Only to state it explicitly: must agree with tokens_per_step.")
    )

    # Optimisation
    max_steps: int = dataclasses.field(default=1300, metadata=_help("Optimizer steps; raise it on resume to extend."))
    learning_rate: float = dataclasses.field(default=1e-2, metadata=_help("Peak LR after warmup."))
    min_learning_rate: float = dataclasses.field(default=5e-4, metadata=_help("LR at max_steps."))
    lr_scheduler_type: str = dataclasses.field(default="cosine", metadata=_help("cosine or wsd."))
    warmup_steps: int = dataclasses.field(default=30, metadata=_help("Linear warmup from 0."))
    decay_steps: int | None = dataclasses.field(default=None, metadata=_help("wsd only: length of the final decay."))
    weight_decay: float = dataclasses.field(default=0.1, metadata=_help("AdamW decay of matrices (not norms)."))
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = dataclasses.field(default=1.0, metadata=_help("Gradient clipping; 0 disables it."))
    max_consecutive_nonfinite: int = dataclasses.field(
        default=5, metadata=_help("Stop after this many non-finite steps in a row (each is skipped).")
    )
    seed: int = 42

    # Precision, memory and parallelism
    bf16: bool = dataclasses.field(
        default=False, metadata=_help("bf16 mixed precision (else the launcher's setting).")
    )
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata=_help("Recompute each decoder layer."))
    fsdp: bool = dataclasses.field(
        default=False, metadata=_help("Shard with FSDP2 even when the Accelerate config does not ask for it.")
    )
    consumer_gpu_env: str = dataclasses.field(
        default="auto",
        metadata=_help("auto|on|off: set NCCL_P2P_DISABLE=1 and expandable segments for GeForce GPUs without NVLink."),
    )

    # Checkpoints
    output_dir: str = dataclasses.field(
        default="outputs/genesis-tiny", metadata=_help("Checkpoints, metrics, final/.")
    )
    save_steps: int = dataclasses.field(
        default=130, metadata=_help("Checkpoint every N steps (ten in the default run).")
    )
    save_minutes: float = dataclasses.field(
        default=10.0, metadata=_help("And every N minutes of wall clock (0: off).")
    )
    save_total_limit: int | None = dataclasses.field(
        default=10, metadata=_help("Keep the newest N checkpoints (milestones are kept on top); null keeps all.")
    )
    milestone_steps: int | None = dataclasses.field(
        default=None, metadata=_help("Checkpoints at multiples of N are saved and never deleted.")
    )
    async_save: bool = dataclasses.field(default=False, metadata=_help("Write checkpoints in the background."))
    resume_from_checkpoint: str | None = dataclasses.field(
        default=None, metadata=_help("A checkpoint folder; null resumes from the newest complete one in output_dir.")
    )
    allow_fresh_optimizer: bool = dataclasses.field(
        default=False, metadata=_help("Resume even if the checkpoint's AdamW state is missing (loud warning).")
    )
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata=_help(
            "Start from step 0 in an output_dir that holds a previous run's results (final/, metrics.jsonl) but no "
            "checkpoint; without it such a launch is refused."
        ),
    )

    # Validation and logging
    eval_steps: int = dataclasses.field(
        default=50, metadata=_help("Held-out loss every N steps (0: only at the end).")
    )
    eval_batches: int = dataclasses.field(default=8, metadata=_help("Held-out batches per evaluation."))
    per_device_eval_batch_size: int = 8
    logging_steps: int = dataclasses.field(
        default=10,
        metadata=_help("Tracker logging and per-source token counts every N steps (metrics.jsonl: every step)."),
    )
    eval_tasks: str | None = dataclasses.field(
        default=None,
        metadata=_help(
            "lm-eval tasks (comma-separated) to evaluate at every checkpoint with eval_limit documents each."
        ),
    )
    eval_limit: int = dataclasses.field(default=100, metadata=_help("Documents per task in those evaluations."))
    eval_include_path: str | None = dataclasses.field(
        default=None, metadata=_help("Extra lm-eval task folder(s) for eval_tasks, comma-separated.")
    )
    report_to: str = dataclasses.field(
        default="tensorboard", metadata=_help("tensorboard, wandb, trackio or none; comma-separated.")
    )
    run_name: str | None = None
    disable_tqdm: bool = False

    # Hub
    push_to_hub: bool = dataclasses.field(
        default=False,
        metadata=_help("Push every checkpoint to hub_model_id (a branch per step, main = newest), in the background."),
    )
    hub_model_id: str | None = None
    hub_private_repo: bool | None = dataclasses.field(default=None, metadata=_help("Create the Hub repo private."))
    hub_backup_repo_id: str | None = dataclasses.field(
        default=None, metadata=_help("A private repo that also receives the raw DCP training state.")
    )

    def __post_init__(self) -> None:
        self.model_overrides = parse_model_overrides(self.model_overrides)
        check_model_overrides(self.model_overrides)
        self._check_floats()
        self._check_tokenizer_path()
        positive = [
            "seq_len",
            "per_device_train_batch_size",
            "max_steps",
            "save_steps",
            "eval_batches",
            "per_device_eval_batch_size",
            "logging_steps",
            "max_consecutive_nonfinite",
            "eval_limit",
        ]
        optional_positive = [
            "tokens_per_step",
            "gradient_accumulation_steps",
            "save_total_limit",
            "milestone_steps",
            "decay_steps",
        ]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.lr_scheduler_type not in SCHEDULE_TYPES:
            raise ConfigError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is not supported; use one of {', '.join(SCHEDULE_TYPES)}."
            )
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}; lower warmup_steps."
            )
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"min_learning_rate={self.min_learning_rate} must lie in [0, learning_rate={self.learning_rate}]."
            )
        if self.consumer_gpu_env not in CONSUMER_GPU_ENV_POLICIES:
            raise ConfigError(
                f"consumer_gpu_env={self.consumer_gpu_env!r}; use one of {', '.join(CONSUMER_GPU_ENV_POLICIES)}."
            )
        for tracker in self.trackers:
            if tracker not in TRACKERS:
                raise ConfigError(f"report_to contains {tracker!r}; valid trackers are {', '.join(TRACKERS)}.")
            # Accelerate would drop a missing tracker with a warning; a run you cannot watch should not start.
            if importlib.util.find_spec(tracker) is None:
                raise ConfigError(
                    f"report_to asks for {tracker}, which is not installed: `pip install {tracker}`, or pass "
                    "--report_to tensorboard (or none)."
                )
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub=true needs hub_model_id (e.g. --hub_model_id your-name/genesis-tiny).")

    def _check_floats(self) -> None:
        # (name, lowest allowed, lowest is allowed itself, highest allowed or None, fix)
        ranges = [
            ("learning_rate", 0.0, False, None, "e.g. --learning_rate 6e-3"),
            ("min_learning_rate", 0.0, True, None, "e.g. --min_learning_rate 3e-4"),
            ("weight_decay", 0.0, True, None, "e.g. --weight_decay 0.1"),
            ("max_grad_norm", 0.0, True, None, "0 disables clipping"),
            ("save_minutes", 0.0, True, None, "0 disables wall-clock saves"),
            ("adam_beta1", 0.0, True, 1.0, "AdamW needs 0 <= beta < 1, e.g. 0.9"),
            ("adam_beta2", 0.0, True, 1.0, "AdamW needs 0 <= beta < 1, e.g. 0.95"),
            ("adam_epsilon", 0.0, False, None, "e.g. --adam_epsilon 1e-8"),
        ]
        for name, lowest, inclusive, highest, fix in ranges:
            value = getattr(self, name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={value!r} is not a number; {fix}.") from None
            below = number < lowest or (number == lowest and not inclusive)
            if isinstance(value, bool) or not math.isfinite(number) or below or (highest and number >= highest):
                bound = f"{'>=' if inclusive else '>'} {lowest:g}" + (f" and < {highest:g}" if highest else "")
                raise ConfigError(f"{name}={value!r} must be a finite number {bound}; {fix}.")
            setattr(self, name, number)

    def _check_tokenizer_path(self) -> None:
        value = self.tokenizer_name_or_path
        # A Hub id is `name` or `org/name`; anything else is a local path, and a missing one is a typo, not a repo.
        looks_local = value is not None and (
            value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value
        )
        if looks_local and not Path(value).expanduser().exists():
            raise ConfigError(
                f"tokenizer_name_or_path={value!r} does not exist; pass the folder holding tokenizer.json (e.g. "
                "outputs/tokenizer from `genesis-hf tokenizer train`), a Hub repo id, or null for the default."
            )

    @property
    def trackers(self) -> list[str]:
        """`report_to` as a list; empty for `none`."""
        names = [name.strip() for name in str(self.report_to).split(",") if name.strip()]
        return [] if names in ([], ["none"]) else names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_model_overrides(value: str | dict | None) -> dict[str, Any]:
    """`model_overrides` from YAML (a mapping) or the CLI (a JSON object) as a dict; `{}` for null."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"model_overrides={value!r} is not valid JSON ({error.msg}); write e.g. "
            "--model_overrides '{\"num_hidden_layers\": 2}'."
        ) from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"model_overrides must be a JSON object of GenesisConfig fields, got {value!r}.")
    return parsed


def model_override_keys() -> list[str]:
    """The `GenesisConfig` fields `model_overrides` may set (its constructor's arguments and saved fields)."""
    from genesis_hf import GenesisConfig
    from genesis_hf.model.configuration_genesis import GENESIS_PRESETS

    parameters = inspect.signature(GenesisConfig.__init__).parameters
    keys = {name for name, parameter in parameters.items() if parameter.kind is not inspect.Parameter.VAR_KEYWORD}
    keys |= set(GenesisConfig.from_preset("debug").to_dict()) | {
        key for preset in GENESIS_PRESETS.values() for key in preset
    }
    return sorted(keys - {"self", "model_type", "transformers_version", "architectures", "_name_or_path"})


def check_model_overrides(overrides: dict[str, Any]) -> None:
    """Raise `ConfigError` for `model_overrides` keys that are no `GenesisConfig` field, with the closest match: a
    misspelled key would otherwise be ignored by the model and written into config.json."""
    if not overrides:
        return
    known = model_override_keys()
    unknown = [key for key in overrides if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"Unknown model_overrides key(s): {', '.join(hints)}. Valid GenesisConfig fields are: {', '.join(known)}."
        )


def resolve_gradient_accumulation(args: PretrainArguments, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank, so that the global batch is `tokens_per_step` tokens.

    `tokens_per_step = per_device_train_batch_size * seq_len * world_size * gradient_accumulation_steps`. With
    `tokens_per_step` null, `gradient_accumulation_steps` (default 1) decides and `tokens_per_step` follows.

    Args:
        args: the run's arguments; `tokens_per_step` is filled in when it was null.
        world_size: number of training processes.

    Raises:
        ConfigError: `tokens_per_step` is not a multiple of the tokens of one micro-batch on all ranks, or an explicit
            `gradient_accumulation_steps` disagrees with it.
    """
    tokens_per_micro_batch = args.per_device_train_batch_size * args.seq_len * world_size
    if args.tokens_per_step is None:
        accumulation = args.gradient_accumulation_steps or 1
        args.tokens_per_step = tokens_per_micro_batch * accumulation
        return accumulation
    accumulation, remainder = divmod(args.tokens_per_step, tokens_per_micro_batch)
    if remainder or accumulation == 0:
        nearest = max(accumulation, 1) * tokens_per_micro_batch
        fitting = [
            batch
            for batch in range(args.per_device_train_batch_size, 0, -1)
            if args.tokens_per_step % (batch * args.seq_len * world_size) == 0
        ]
        batch_fix = f"--per_device_train_batch_size {fitting[0]}" if fitting else "another per_device_train_batch_size"
        raise ConfigError(
            f"tokens_per_step={args.tokens_per_step:,} is not a multiple of per_device_train_batch_size "
            f"({args.per_device_train_batch_size}) x seq_len ({args.seq_len}) x world_size ({world_size}) = "
            f"{tokens_per_micro_batch:,} tokens per micro-batch across ranks. Use {batch_fix}, or set "
            f"tokens_per_step to a multiple of {tokens_per_micro_batch:,} (e.g. {nearest:,}), or change the number "
            "of processes."
        )
    if args.gradient_accumulation_steps is not None and args.gradient_accumulation_steps != accumulation:
        raise ConfigError(
            f"gradient_accumulation_steps={args.gradient_accumulation_steps} disagrees with tokens_per_step="
            f"{args.tokens_per_step:,}, which needs {accumulation} with per_device_train_batch_size="
            f"{args.per_device_train_batch_size}, seq_len={args.seq_len} and world_size={world_size}. Remove "
            "gradient_accumulation_steps (it is derived), or set tokens_per_step to "
            f"{tokens_per_micro_batch * args.gradient_accumulation_steps:,}."
        )
    return accumulation


__all__ = [
    "PretrainArguments",
    "check_model_overrides",
    "model_override_keys",
    "parse_model_overrides",
    "resolve_gradient_accumulation",
]
