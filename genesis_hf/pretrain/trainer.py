"""The pretraining engine: builders, the training loop, resume, validation, metrics.

`run_pretraining(args)` is what `recipes/pretrain.py` calls. In order: build the Accelerator and check the batch
geometry, refuse bad input before anything trains (model/tokenizer vocab mismatch, an output directory holding another
model, no intact checkpoint), build the model (FSDP2/DDP via `distributed.wrap_model`), AdamW, the extensible LR
schedule and the packed loader, resume from the newest intact checkpoint (weights, AdamW state checked against the
model, schedule, every rank's loader and RNG state), then `train()`: one optimizer step per iteration, skipping
non-finite steps, logging every step to `metrics.jsonl`, evaluating every `eval_steps`, checkpointing every
`save_steps` and every `save_minutes`.

The loop announces what happens to the run's subscribers (`genesis_hf.events`): steps, checkpoints, the end of the
run. It imports no later stage: the final export (`final.FinalExport`, always subscribed: `final/` is written by
rank 0 from the last sharded checkpoint, no full-state gather across ranks), the Hub pusher and checkpoint
evaluations are subscribers the caller hands in.

Losses are reproducible bit for bit across a kill and resume: the model is initialised from `seed` identically on
every rank, the loader continues at the exact row, the AdamW moments and step counts come back exactly, each rank
gets its RNG state back, and the per-step reduction order is fixed.
"""

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from genesis_hf.args import ConfigError
from genesis_hf.events import Events, TrainingCallback
from genesis_hf.layout import FINAL_POINTER_FILE, METRICS_FILE, TENSORBOARD_DIR

from . import checkpoint as ckpt
from . import distributed
from .config import PretrainArguments, resolve_gradient_accumulation
from .final import FinalExport
from .reference import end_of_run_report, greedy_samples, held_out_unigram_entropy
from .run_folder import check_run_folder, drop_partial_last_line

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stopped."""


@dataclass
class TrainerState:
    """Counters that make up the run's position (saved in `trainer_state.json`).

    Args:
        step: optimizer steps done, skipped ones included (the schedule and the data advance on every step).
        tokens_seen: training tokens consumed by all ranks.
        optimizer_steps: AdamW updates actually applied (`step` minus skipped steps); AdamW's own `step` must match.
        skipped_steps: steps skipped for a non-finite loss or gradient.
        consecutive_nonfinite: non-finite steps in a row, up to now.
        training_seconds: wall time spent in training steps, across launches.
        fresh_optimizer_steps: steps at which a resume started AdamW from zero (`allow_fresh_optimizer`).
    """

    step: int = 0
    tokens_seen: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    training_seconds: float = 0.0
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    eval_loss: float | None = None
    fresh_optimizer_steps: list[int] = field(default_factory=list)


@dataclass
class Run:
    """Everything the training loop touches, built by `setup_run`."""

    args: PretrainArguments
    accelerator: Any
    wrapped: distributed.WrappedModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    eval_batches: list[dict[str, torch.Tensor]]
    checkpoints: ckpt.CheckpointManager
    metrics: "MetricsLogger"
    events: Events
    state: TrainerState
    gradient_accumulation_steps: int
    flops_per_token: float
    peak_flops: float | None
    fresh_optimizer: bool = False
    # Entropy of the held-out text's word frequencies (nats/token), on the main process; see reference.py.
    unigram_entropy: float | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Builders


def build_model_config(args: PretrainArguments):
    """The `GenesisConfig` of the run: `model_preset` plus `model_overrides`, with the attention kernel."""
    from genesis_hf import GenesisConfig

    try:
        config = GenesisConfig.from_preset(args.model_preset, **args.model_overrides)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"Cannot build the model config: {error}") from None
    config._attn_implementation = args.attn_implementation
    if args.seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"seq_len={args.seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}; "
            f"lower seq_len or pass --model_overrides '{{\"max_position_embeddings\": {args.seq_len}}}'."
        )
    return config


def build_tokenizer(args: PretrainArguments, config, accelerator):
    """The tokenizer (`tokenizer_name_or_path`, or `default_tokenizer(config.vocab_size)`), checked against the model.

    Raises:
        ConfigError: the tokenizer has more tokens than the model has embedding rows.
    """
    from transformers import AutoTokenizer

    from genesis_hf.tokenizer import default_tokenizer

    # Rank 0 trains/caches the default tokenizer first; the others then load it instead of training it again.
    with accelerator.main_process_first():
        if args.tokenizer_name_or_path is None:
            tokenizer = default_tokenizer(config.vocab_size)
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
            except (OSError, ValueError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ConfigError(
                    f"Cannot load tokenizer_name_or_path={args.tokenizer_name_or_path!r}: it is not a local folder "
                    f"with a tokenizer, and loading it as a Hub repo id failed ({reason}). Pass the folder holding "
                    "tokenizer.json, or an existing Hub repo id."
                ) from None
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"The tokenizer ({args.tokenizer_name_or_path or 'default_tokenizer'}) has {len(tokenizer):,} tokens but "
            f"the model's vocab_size is {config.vocab_size:,}: ids >= {config.vocab_size:,} would index past the "
            f"embedding table. Use a tokenizer of at most {config.vocab_size:,} tokens, or grow the model with "
            f"--model_overrides '{{\"vocab_size\": {len(tokenizer)}}}' (a multiple of 64 runs faster on GPUs)."
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"The tokenizer {args.tokenizer_name_or_path} has no eos token to separate documents.")
    return tokenizer


def build_model(config, seed: int):
    """A float32 `GenesisForCausalLM`, initialised identically on every rank from `seed`."""
    from genesis_hf import GenesisForCausalLM

    torch.manual_seed(seed)
    model = GenesisForCausalLM(config).float()
    model.config.use_cache = False
    return model.train()


def build_optimizer(model: torch.nn.Module, args: PretrainArguments) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (projections, embeddings) and none on norm weights and biases.

    The groups are always `[decay, no_decay]`; `apply_optimizer_hyperparameters` relies on that order.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over all parameters, what transformers' Trainer picks) on plain tensors; sharded
    # (DTensor) parameters keep torch's default implementation. The optimizer state is the same either way.
    from torch.distributed.tensor import DTensor

    fused = not any(isinstance(parameter, DTensor) for parameter in decay + no_decay) or None
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=fused
    )


def apply_optimizer_hyperparameters(optimizer: torch.optim.Optimizer, args: PretrainArguments) -> None:
    """Set betas, eps and weight decay from `args` (a loaded optimizer state brings the saved run's values)."""
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = (args.adam_beta1, args.adam_beta2)
        group["eps"] = args.adam_epsilon
        group["weight_decay"] = args.weight_decay if index == 0 else 0.0


def build_data(args: PretrainArguments, tokenizer, rank: int, world_size: int):
    """The training loader of this rank and the held-out batches (the same on every rank)."""
    from genesis_hf.data import build_pretrain_loader, build_validation_batches

    loader = build_pretrain_loader(
        args.mixture,
        tokenizer,
        seq_len=args.seq_len,
        batch_size=args.per_device_train_batch_size,
        rank=rank,
        world_size=world_size,
        seed=args.seed,
        document_masking=args.document_masking,
        tokenized_dir=args.tokenized_dir,
    )
    eval_batches = build_validation_batches(
        args.mixture,
        tokenizer,
        seq_len=args.seq_len,
        batch_size=args.per_device_eval_batch_size,
        num_batches=args.eval_batches,
        seed=args.seed,
        document_masking=args.document_masking,
        tokenized_dir=args.tokenized_dir,
    )
    return loader, eval_batches


class MetricsLogger:
    """Appends one JSON object per step to `metrics.jsonl` (rank 0), feeds the trackers and the progress bar.

    Floats are written with `repr` precision (`json` does that), so two runs can be compared bit for bit. After a
    kill and resume the steps after the last checkpoint appear again; the last occurrence of a step is the one that
    the resumed run trained.
    """

    def __init__(
        self,
        path: Path,
        accelerator,
        *,
        max_steps: int,
        initial_step: int,
        logging_steps: int,
        disable_tqdm: bool,
        resumed_from: Path | None = None,
    ):
        from tqdm.auto import tqdm

        self.path = path
        self.accelerator = accelerator
        self.logging_steps = logging_steps
        self.is_main = accelerator.is_main_process
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            drop_partial_last_line(path)
            if path.is_file() and path.stat().st_size:
                # Records of an earlier launch are already here: say where this launch starts, so that a reader never
                # mistakes a resume (or a fresh start with --overwrite_output_dir) for one continuous run.
                restart = {"event": "restart", "step": initial_step, "time": time.time()}
                restart["resumed_from"] = str(resumed_from) if resumed_from is not None else None
                self._append(restart)
        self.progress = tqdm(
            total=max_steps,
            initial=initial_step,
            disable=not self.is_main or disable_tqdm,
            desc="pretrain",
            unit="step",
        )

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(json_safe_record(record), allow_nan=False) + "\n")

    def log_record(self, record: dict[str, Any]) -> None:
        """Append a record that is not a step (an event, a reference value) on the main process."""
        if self.is_main:
            self._append(record)

    def log_checkpoint_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Log what a checkpoint callback measured (e.g. `eval/<task>/<metric>` scores): an `"event": "eval"` record
        in `metrics.jsonl` and the trackers, at `step`. Called on the main process."""
        self.log_record({"event": "eval", "step": step, **metrics})
        self.accelerator.log({key: value for key, value in metrics.items() if _is_scalar(value)}, step=step)

    def log_step(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if self.is_main:
            self._append(record)
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix(
                loss=f"{record['loss'] or math.nan:.4f}", lr=f"{record['lr']:.2e}", refresh=False
            )
        if step % self.logging_steps == 0 or "eval_loss" in record:
            scalars = {f"train/{key}": value for key, value in record.items() if _is_scalar(value) and key != "step"}
            for source, tokens in (record.get("tokens_per_source") or {}).items():
                scalars[f"tokens/{source}"] = tokens
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        self.progress.close()


def json_safe_record(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with every non-finite float (top level) as `null` and `"nonfinite": [those keys]`: NaN and Infinity are
    not JSON, and a reader must be able to tell a missing value from a diverged one."""
    nonfinite = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if not nonfinite:
        return record
    return {**{key: None if key in nonfinite else value for key, value in record.items()}, "nonfinite": nonfinite}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------------
# Setup and resume


def check_output_dir(args: PretrainArguments) -> None:
    """Refuse, before any setup, an `output_dir` whose contents this run would destroy (`run_folder.check_run_folder`:
    a file, a `final/` that `export_final` did not write, earlier results and no checkpoint to resume from).

    Raises:
        ConfigError: naming the path, what is there, and the fix.
    """
    check_run_folder(
        args.output_dir,
        final_marker=FINAL_POINTER_FILE,
        # resumed (or refused by select_checkpoint when none is intact)
        resumable=args.resume_from_checkpoint is not None or ckpt.has_checkpoint_folders(args.output_dir),
        overwrite_output_dir=args.overwrite_output_dir,
    )


def setup_run(args: PretrainArguments, accelerator, events: Events, lineage: dict | None = None) -> Run:
    """Check the inputs, build everything, and resume from the newest intact checkpoint of `output_dir`; `lineage`
    (the recipe command and data, `genesis_hf.model.lineage`) goes into every checkpoint's run config for the card."""
    from .flops import detect_peak_flops, flops_per_token
    from .schedules import build_lr_scheduler

    gradient_accumulation_steps = resolve_gradient_accumulation(args, accelerator.num_processes)
    config = build_model_config(args)
    output_dir = Path(args.output_dir)
    ckpt.check_model_config_compatible(output_dir, config)
    tokenizer = build_tokenizer(args, config, accelerator)
    resume_from = _choose_checkpoint(args, accelerator)

    fsdp = distributed.fsdp_settings(accelerator, force=args.fsdp)
    wrapped = distributed.wrap_model(
        build_model(config, args.seed), accelerator, fsdp=fsdp, activation_checkpointing=args.gradient_checkpointing
    )
    optimizer = build_optimizer(wrapped.model, args)
    scheduler = build_lr_scheduler(
        optimizer,
        schedule=args.lr_scheduler_type,
        learning_rate=args.learning_rate,
        min_learning_rate=args.min_learning_rate,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        decay_steps=args.decay_steps,
    )
    loader, eval_batches = build_data(args, tokenizer, accelerator.process_index, accelerator.num_processes)
    run_config = dict(
        args.to_dict(), gradient_accumulation_steps=gradient_accumulation_steps, world_size=accelerator.num_processes
    )
    if lineage is not None:
        run_config["lineage"] = lineage
    checkpoints = ckpt.CheckpointManager(
        output_dir,
        save_total_limit=args.save_total_limit,
        milestone_steps=args.milestone_steps,
        async_save=args.async_save,
        events=events,
        run_config=run_config,
        model_config=config,
        tokenizer=tokenizer,
    )
    run = Run(
        args=args,
        accelerator=accelerator,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        eval_batches=eval_batches,
        checkpoints=checkpoints,
        metrics=None,
        events=events,
        state=TrainerState(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        flops_per_token=flops_per_token(config, args.seq_len),
        peak_flops=detect_peak_flops(accelerator.device),
    )
    if resume_from is not None:
        resume(run, resume_from)
    checkpoints.remove_stale_staging_dirs()
    run.metrics = MetricsLogger(
        output_dir / METRICS_FILE,
        accelerator,
        max_steps=args.max_steps,
        initial_step=run.state.step,
        logging_steps=args.logging_steps,
        disable_tqdm=args.disable_tqdm,
        resumed_from=resume_from.path if resume_from is not None else None,
    )
    events.metrics_sink = run.metrics.log_checkpoint_metrics  # what checkpoint subscribers measure (evals)
    _log_summary(run, config, fsdp, resume_from)
    if accelerator.is_main_process:
        _unigram_reference(run, tokenizer, log=resume_from is None)
    return run


def _unigram_reference(run: Run, tokenizer, log: bool) -> None:
    """What a model that learned only word frequencies scores on the held-out text: the line the held-out loss has to
    go below. Logged once, at the start of the run; a resumed run computes it again for its final report."""
    args = run.args
    run.unigram_entropy = held_out_unigram_entropy(
        args.mixture, tokenizer, seq_len=args.seq_len, tokenized_dir=args.tokenized_dir
    )
    if log:
        run.metrics.log_record({"event": "reference", "step": run.state.step, "unigram_entropy": run.unigram_entropy})


def _choose_checkpoint(args: PretrainArguments, accelerator) -> ckpt.CheckpointInfo | None:
    """Rank 0 picks the checkpoint to resume (explicit, or the newest intact one) and every rank follows."""
    choice, error = None, None
    if accelerator.is_main_process:
        try:
            if args.resume_from_checkpoint is not None:
                path = Path(args.resume_from_checkpoint)
                problem = ckpt.validate_checkpoint(path, checksums=True, resumable=True)
                if problem is not None:
                    raise ckpt.CheckpointError(f"--resume_from_checkpoint {path} is not usable: {problem}.")
                state = ckpt.read_trainer_state(path)
                choice = ckpt.CheckpointInfo(path, state["step"], state.get("tokens_seen"), state.get("loss"))
            else:
                choice, warnings = ckpt.select_checkpoint(args.output_dir)
                for warning in warnings:
                    logger.warning(warning)
        except (ckpt.CheckpointError, OSError, ValueError) as exception:
            error = str(exception)
    choice, error = distributed.broadcast_object((choice, error))
    if error is not None:
        raise ckpt.CheckpointError(error)
    return choice


FRESH_OPTIMIZER_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  RESUMING STEP {step} WITH A FRESH ADAMW STATE (--allow_fresh_optimizer true)
!!  The checkpoint's optimizer state was not restored: {problems}
!!  AdamW's moments restart from zero. The seed run did this by accident: the loss looked fine for ~50 steps, then
!!  diverged. Watch the loss closely; metrics.jsonl marks these steps with "fresh_optimizer": true.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def resume(run: Run, info: ckpt.CheckpointInfo) -> None:
    """Restore the run from a checkpoint: weights, checked AdamW state, schedule (extended if `max_steps` grew), every
    rank's loader and RNG state, and the counters."""
    args, accelerator = run.args, run.accelerator
    older = [other for other in ckpt.list_checkpoints(args.output_dir) if other.step < info.step]
    result = ckpt.load_training_checkpoint(
        info.path,
        run.wrapped.model,
        run.optimizer,
        allow_fresh_optimizer=args.allow_fresh_optimizer,
        group=run.checkpoints.group,
        older_checkpoints=older,
    )
    saved = result.trainer_state
    _warn_about_changed_arguments(info.path, run.checkpoints.run_config)
    apply_optimizer_hyperparameters(run.optimizer, args)
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.scheduler.max_steps != args.max_steps:
        _extend_schedule(run, saved_max_steps=run.scheduler.max_steps, step=saved["step"])

    loader_states = saved["data_loader_states"]
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if len(loader_states) == world_size:
        run.loader.load_state_dict(loader_states[rank])
        ckpt.restore_rng_state(ckpt.read_rng_states(info.path)[rank])
    elif all(state == loader_states[0] for state in loader_states):
        # The loader's position is global (rows handed out to all ranks), so it resumes on any number of ranks;
        # RNG streams are per rank and cannot be mapped, so they restart from the seed (training draws none).
        logger.warning(
            "Resuming on %d processes a checkpoint written by %d: the data continues at the same global row; "
            "per-rank RNG states are not restored.",
            world_size,
            len(loader_states),
        )
        run.loader.load_state_dict(loader_states[0])
    else:
        raise ckpt.CheckpointError(
            f"{info.path} was written by {len(loader_states)} processes whose loader states differ, and this run has "
            f"{world_size}. Resume with {len(loader_states)} processes (accelerate launch --num_processes "
            f"{len(loader_states)}) or start a new --output_dir."
        )

    known = {name for name in asdict(TrainerState())}
    run.state = TrainerState(**{key: value for key, value in saved.items() if key in known})
    run.state.consecutive_nonfinite = 0
    run.fresh_optimizer = result.fresh_optimizer
    if result.fresh_optimizer:
        run.state.fresh_optimizer_steps.append(run.state.step)
        # The new AdamW starts counting from zero; later checks compare against updates done since this resume.
        run.state.optimizer_steps = 0
        if accelerator.is_main_process:
            logger.warning(FRESH_OPTIMIZER_BANNER.format(step=run.state.step, problems="; ".join(result.problems[:3])))
    logger.info("Resumed from %s (step %d, %d tokens seen).", info.path, run.state.step, run.state.tokens_seen)


# Arguments that may differ between launches without changing the run itself.
_LAUNCH_ONLY_ARGUMENTS = {
    "output_dir", "resume_from_checkpoint", "allow_fresh_optimizer", "overwrite_output_dir", "max_steps", "disable_tqdm", "report_to",
    "run_name", "save_steps", "save_minutes", "save_total_limit", "milestone_steps", "async_save", "logging_steps",
    "push_to_hub", "hub_model_id", "consumer_gpu_env", "eval_steps", "eval_tasks", "eval_limit", "eval_include_path",
    "lineage",
}  # fmt: skip


def _warn_about_changed_arguments(checkpoint_path: Path, run_config: dict[str, Any]) -> None:
    try:
        saved = yaml.safe_load((checkpoint_path / ckpt.RUN_CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    changed = [
        f"{key}: {saved[key]!r} -> {value!r}"
        for key, value in run_config.items()
        if key in saved and key not in _LAUNCH_ONLY_ARGUMENTS and saved[key] != value
    ]
    if changed:
        logger.warning(
            "Arguments changed since %s: %s. The learning-rate schedule stays the checkpoint's (only max_steps "
            "extends it); AdamW's betas, eps and weight decay take the new values.",
            checkpoint_path.name,
            "; ".join(changed),
        )


def _extend_schedule(run: Run, *, saved_max_steps: int, step: int) -> None:
    args = run.args
    lr_before = run.scheduler.get_last_lr()[0]
    try:
        run.scheduler.set_max_steps(args.max_steps)
    except ValueError as error:
        raise ConfigError(f"Cannot change max_steps from {saved_max_steps} to {args.max_steps}: {error}") from None
    policy = (
        f"the {args.lr_scheduler_type} decay continues from the current LR {lr_before:.3e} to min_learning_rate "
        f"{run.scheduler.min_learning_rate:.1e} over the new horizon (no jump, never upwards)"
    )
    logger.warning(
        "max_steps changed on resume: %d -> %d at step %d; %s.", saved_max_steps, args.max_steps, step, policy
    )


def _log_summary(run: Run, config, fsdp, resume_from) -> None:
    args, accelerator = run.args, run.accelerator
    parameters = sum(parameter.numel() for parameter in run.wrapped.unwrapped.parameters())
    logger.info(
        "Pretraining %s (%s parameters) | %s on %d process(es), device %s, mixed precision %s | "
        "%d tokens/step = %d per device x %d seq x %d processes x %d accumulation | max_steps %d | %s",
        args.model_preset,
        f"{parameters:,}",
        run.wrapped.strategy
        + (
            " + activation checkpointing"
            if fsdp and fsdp.activation_checkpointing or args.gradient_checkpointing
            else ""
        ),
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        args.tokens_per_step,
        args.per_device_train_batch_size,
        args.seq_len,
        accelerator.num_processes,
        run.gradient_accumulation_steps,
        args.max_steps,
        f"resuming {resume_from.path}" if resume_from else f"fresh start, output in {args.output_dir}",
    )


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def train(run: Run) -> None:
    """Train until `max_steps`: one optimizer step per iteration (see the module docstring)."""
    args, state, wrapped = run.args, run.state, run.wrapped
    accumulation, device = run.gradient_accumulation_steps, run.accelerator.device
    parameters = [parameter for parameter in wrapped.model.parameters() if parameter.requires_grad]
    batches = iter(run.loader)
    run.events.on_train_begin(Path(args.output_dir), wrapped.model)
    last_save = time.monotonic()
    while state.step < args.max_steps:
        run.events.on_step_begin(state.step + 1)
        started = time.perf_counter()
        micro_losses = []
        for micro_step in range(accumulation):
            batch = {key: value.to(device) for key, value in next(batches).items()}
            with wrapped.gradient_sync(micro_step == accumulation - 1):
                with wrapped.autocast():
                    loss = wrapped.model(**batch).loss
                (loss / accumulation).backward()
            micro_losses.append(loss.detach().double())
        grad_norm = distributed.clip_grad_norm_(parameters, args.max_grad_norm).double()
        clock_due = run.accelerator.is_main_process and 0 < args.save_minutes * 60 <= time.monotonic() - last_save
        loss_value, skip, clock_due = agree_on_step(torch.stack(micro_losses).mean(), grad_norm, clock_due)
        lr = run.scheduler.get_last_lr()[0]
        if skip:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
        else:
            run.optimizer.step()
            state.optimizer_steps += 1
            state.consecutive_nonfinite = 0
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        state.step += 1
        state.tokens_seen += args.tokens_per_step
        elapsed = time.perf_counter() - started
        state.training_seconds += elapsed
        state.loss, state.lr, state.grad_norm = loss_value, lr, grad_norm.item()
        record = step_record(run, elapsed)
        if args.eval_steps and state.step % args.eval_steps == 0 or state.step == args.max_steps:
            record["eval_loss"] = state.eval_loss = evaluate(run)
        run.metrics.log_step(record)
        run.events.on_step_end(state.step, record)
        if state.consecutive_nonfinite >= args.max_consecutive_nonfinite:
            raise NonFiniteLossError(nonfinite_report(run))
        run.checkpoints.poll()
        save_due = state.step % args.save_steps == 0 or clock_due or state.step == args.max_steps
        if save_due or run.checkpoints.is_milestone(state.step):
            if state.consecutive_nonfinite == 0:  # never checkpoint right after a skipped step
                save_checkpoint(run)
                last_save = time.monotonic()


def agree_on_step(local_loss: torch.Tensor, grad_norm: torch.Tensor, clock_due: bool) -> tuple[float, bool, bool]:
    """One collective per step that makes every rank take the same decisions.

    Sums (loss, "this rank saw a non-finite loss or gradient", "rank 0's clock says save") over ranks (only rank 0
    passes `clock_due=True`), and returns the mean loss, whether to skip the step, and whether to save.
    """
    grad_norm = grad_norm.to(local_loss.device)  # on CPU when FSDP offloads parameters; NCCL needs the GPU copy
    nonfinite = ~(torch.isfinite(local_loss) & torch.isfinite(grad_norm))
    flags = torch.stack([local_loss, nonfinite.double(), grad_norm.new_tensor(float(clock_due))])
    total, nonfinite_ranks, clock_votes = distributed.all_reduce_sum(flags).tolist()
    world_size = torch.distributed.get_world_size() if distributed.is_distributed() else 1
    return total / world_size, nonfinite_ranks > 0, clock_votes > 0


def step_record(run: Run, elapsed: float) -> dict[str, Any]:
    """The `metrics.jsonl` line of the step that just finished."""
    from .flops import mfu

    state, args = run.state, run.args
    tokens_per_second = args.tokens_per_step / elapsed
    record = {
        "step": state.step,
        "loss": state.loss,
        "lr": state.lr,
        "grad_norm": state.grad_norm,
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(tokens_per_second, run.flops_per_token, run.peak_flops, run.accelerator.num_processes),
        "step_time": elapsed,
        "skipped_steps": state.skipped_steps,
    }
    if run.fresh_optimizer:
        record["fresh_optimizer"] = True
    if state.step % args.logging_steps == 0:
        record["tokens_per_source"] = run.loader.tokens_per_source
    return record


def nonfinite_report(run: Run) -> str:
    state, args = run.state, run.args
    # The newest checkpoint whose shards still match their checksums (checked newest first, stopping at the first).
    good = next(
        (
            info
            for info in reversed(ckpt.list_checkpoints(args.output_dir))
            if ckpt.checksum_problem(info.path) is None
        ),
        None,
    )
    return (
        f"Stopping: {state.consecutive_nonfinite} consecutive steps (up to step {state.step}) had a non-finite loss "
        f"or gradient norm (max_consecutive_nonfinite={args.max_consecutive_nonfinite}); each was skipped without "
        f"updating the weights ({state.skipped_steps} skipped in total). Last loss {state.loss!r}, grad norm "
        f"{state.grad_norm!r}, lr {state.lr:.3e}. No checkpoint was written after a skipped step; the last good one is "
        f"{good.path if good else 'none'}. Lower learning_rate or max_grad_norm, or check the data, then relaunch "
        "the same command to resume from it."
    )


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the held-out batches, split across ranks (every rank runs the same number of forwards, which
    FSDP needs; padding batches count with weight 0)."""
    wrapped, batches = run.wrapped, run.eval_batches
    rank, world_size = run.accelerator.process_index, run.accelerator.num_processes
    per_rank = math.ceil(len(batches) / world_size)
    total = torch.zeros(2, dtype=torch.float64, device=run.accelerator.device)  # (loss sum, batch count)
    wrapped.model.eval()
    for index in range(rank, per_rank * world_size, world_size):
        batch = {key: value.to(run.accelerator.device) for key, value in batches[index % len(batches)].items()}
        with wrapped.autocast():
            loss = wrapped.model(**batch).loss.double()
        if index < len(batches):
            total += torch.stack([loss, loss.new_tensor(1.0)])
    wrapped.model.train()
    distributed.all_reduce_sum(total)
    return (total[0] / total[1]).item()


def save_checkpoint(run: Run) -> None:
    state = run.state
    trainer_state = dict(
        asdict(state),
        scheduler=run.scheduler.state_dict(),
        max_steps=run.args.max_steps,
        tokens_per_source=run.loader.tokens_per_source,
        timestamp=time.time(),
    )
    rank_state = {"data_loader": run.loader.state_dict(), "rng": ckpt.capture_rng_state()}
    run.checkpoints.save(state.step, run.wrapped.model, run.optimizer, trainer_state, rank_state)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def _final_report(run: Run, final_dir: Path) -> str:
    """Held-out loss against the unigram reference, greedy samples from `final/`, and how to watch the run."""
    from transformers import AutoTokenizer

    from genesis_hf.model.modeling_genesis import GenesisForCausalLM

    model = GenesisForCausalLM.from_pretrained(final_dir).to(run.accelerator.device).eval()
    samples = greedy_samples(model, AutoTokenizer.from_pretrained(final_dir))
    return end_of_run_report(run.state.eval_loss, run.unigram_entropy, samples, run.args.output_dir)


def run_pretraining(
    args: PretrainArguments,
    callbacks: Sequence[TrainingCallback | Callable[[Path, int], Any]] = (),
    lineage: dict | None = None,
) -> Path | None:
    """Pretrain as `args` says, resuming from `output_dir` when it holds checkpoints; returns `final/` (rank 0).

    Args:
        args: the parsed arguments.
        callbacks: the run's subscribers (`genesis_hf.events.TrainingCallback`s, e.g. the Hub pusher of
            `genesis_hf.publish.push.pusher_for_run`), or functions called on rank 0 as `fn(checkpoint_dir, step)`
            once each checkpoint is visible; a dict they return (e.g. `genesis_hf.evaluate.during_training`'s scores)
            is logged to `metrics.jsonl` and the trackers at that step. `final.FinalExport` is always subscribed last.
        lineage: the recipe's command and data (`genesis_hf.model.lineage.pretraining_lineage`), for the cards.

    Raises:
        ConfigError: bad arguments, tokenizer or output directory (before anything trains).
        CheckpointError: no intact checkpoint to resume, or a missing optimizer state (`OptimizerStateError`).
        NonFiniteLossError: `max_consecutive_nonfinite` skipped steps in a row.
    """
    check_output_dir(args)
    accelerator = distributed.build_accelerator(
        mixed_precision="bf16" if args.bf16 else None,
        log_with=args.trackers,
        project_dir=str(Path(args.output_dir) / TENSORBOARD_DIR),
    )
    final_export = FinalExport()
    governor = distributed.cpu_thread_governor(accelerator)
    events = Events([*callbacks, *([governor] if governor else []), final_export])
    run = setup_run(args, accelerator, events, lineage)
    if args.trackers:
        hyperparameters = {
            key: value
            for key, value in run.checkpoints.run_config.items()
            if _is_scalar(value) or isinstance(value, (str, bool))
        }
        accelerator.init_trackers(args.run_name or Path(args.output_dir).name, config=hyperparameters)
    try:
        train(run)
        run.checkpoints.wait()
        distributed.barrier()
        if accelerator.is_main_process and ckpt.has_checkpoint_folders(args.output_dir):
            # The newest checkpoint that validates with its checksums; a stub or corrupted newer one is skipped.
            newest, warnings = ckpt.select_checkpoint(args.output_dir)
            for warning in warnings:
                logger.warning(warning)
            events.on_train_end(Path(args.output_dir), newest.path, newest.step)
    finally:
        run.checkpoints.close()
        try:
            events.close()  # the pusher waits for its uploads; what is left pending is uploaded when the run resumes
        finally:
            run.checkpoints.rotate()  # checkpoints kept until their upload was confirmed may go now
            run.metrics.close()
            run.loader.close()
    final_dir = final_export.final_dir
    if final_dir is not None:
        logger.info("Done at step %d (loss %s); model and tokenizer in %s.", run.state.step, run.state.loss, final_dir)
        print(_final_report(run, final_dir), flush=True)
    distributed.barrier()
    accelerator.end_training()
    return final_dir


__all__ = [
    "NonFiniteLossError",
    "TrainerState",
    "build_model",
    "build_model_config",
    "build_optimizer",
    "build_tokenizer",
    "check_output_dir",
    "run_pretraining",
    "train",
]
