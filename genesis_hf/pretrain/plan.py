"""`genesis-hf plan`: will this model train on these GPUs? A per-GPU memory estimate before you rent or launch.

    genesis-hf plan --preset genesis-1b --gpus 2 --gpu "RTX 4090" --micro_batch 4 --seq_len 2048
    genesis-hf plan --config recipes/configs/pretrain/genesis-1b.yaml --gpus 2 --json

The estimate (`estimate_memory`) assumes the seed project's setup: FSDP2 full sharding across `gpus` with mixed
precision (bf16 compute, fp32 gradient reduction), AdamW, activation checkpointing per decoder block, and SDPA/flash
attention (no seq x seq score matrix is stored). Per GPU, with N parameters and G GPUs:

- parameters: the fp32 master shard (4N/G; FSDP2 keeps the sharded parameters in fp32 and casts the all-gathered
  copy to bf16) plus the bf16 gathered copies alive at once: the root module (embeddings, tied `lm_head`, final norm,
  unsharded from forward to the end of backward) and two decoder blocks (the current one and the prefetched one).
  On one GPU (no sharding, bf16 autocast) the parameters are fp32 (4N) and autocast caches a bf16 copy of every
  weight for the whole forward pass (2N).
- gradients: genesis_hf's trainer skips the reduce-scatter on all micro-batches but the last of each optimizer step
  (FSDP2 `set_requires_gradient_sync(False)`, far less PCIe traffic), and FSDP2 then accumulates an unsharded fp32
  gradient of the whole model on every GPU (4N, turned into the 4N/G shard block by block during the last backward)
  plus the bf16 gradients of the live modules. With `gradient_sync_every_micro_batch=True` (a trainer that
  reduce-scatters every micro-batch) it is the fp32 shard (4N/G) plus the live modules' bf16 gradients and their fp32
  reduce-scatter copies. On one GPU gradients simply accumulate in the fp32 `.grad` (4N).
- optimizer: AdamW's two fp32 moments, sharded (8N/G).
- activations: per decoder layer and token, the tensors autograd saves in bf16, counted the way Korthikanti et al.
  2022 (Sec. 4.1) do for GPT, adapted to a Llama block: each RMSNorm saves its fp32 upcast (4h), its normalised bf16
  value (2h) and its output that feeds the next matmul (2h); attention saves the rotated q (2h), k and v at the GQA
  width (2 x 2 h_kv) and the attention output (2h); the SwiGLU MLP saves gate, silu(gate), up and their product
  (4 x 2I); per-token fp32 scalars (the norms' rsqrt, the kernel's logsumexp per head) add `8 + 4 n_heads`. Total
  `20h + 4h_kv + 8I + 8 + 4 n_heads` bytes per token and layer, 70 KiB for genesis-1b (the tests check the formula
  against the tensors autograd really saves in a small bf16 model). Without checkpointing every layer keeps its
  activations; with checkpointing each layer keeps only its bf16 input (2h) and one layer at a time is recomputed in
  full during backward. The final norm adds 8h per token.
- logits and loss: transformers' causal-LM loss upcasts the bf16 logits to fp32 and `cross_entropy` keeps fp32
  log-probabilities for backward, so batch x seq x vocab x (2 + 4 + 4) bytes: 4 GB for genesis-1b at micro-batch 4.
- overhead: CUDA context and kernels (0.5 GiB), NCCL buffers (0.5 GiB with more than one GPU) and 10% of the tensors
  above for the caching allocator's slack (what `nvidia-smi` shows above `torch.cuda.max_memory_allocated`).

The peaks of the logits and of the recomputed layer do not coincide in time, so adding them errs on the safe side; a
setting "fits" when the total is at most 90% of the card, and is "tight" up to 100%. For the seed setting (genesis-1b,
2x RTX 4090, micro-batch 4, seq 2048, checkpointing) the estimate is 17.4 GiB (18.7 GB) per GPU against ~20 GB
measured by the seed project (16.0 GiB if gradients were reduce-scattered every micro-batch); without checkpointing
it is 35 GiB, which does not fit on a 24 GiB card.
"""

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from genesis_hf.args import ConfigError, add_command, load_yaml
from genesis_hf.model.configuration_genesis import GENESIS_PRESETS, GenesisConfig
from genesis_hf.model.sizes import attention_widths, parameter_counts
from genesis_hf.pretrain.flops import flops_per_token

GIB = 1024**3

# Nominal memory per card, in GiB (the usable amount is a few hundred MiB less; the overhead allowance covers it).
GPU_MEMORY_BYTES: dict[str, int] = {
    "RTX 3090": 24 * GIB,
    "RTX 4090": 24 * GIB,
    "L40S": 48 * GIB,
    "A100 40GB": 40 * GIB,
    "A100 80GB": 80 * GIB,
    "H100 PCIe": 80 * GIB,
    "H100 SXM": 80 * GIB,
    "H200": 141 * GIB,
}
_GPU_ALIASES = {"H100": "H100 SXM"}

CUDA_CONTEXT_BYTES = GIB // 2
NCCL_BUFFER_BYTES = GIB // 2
ALLOCATOR_SLACK_FRACTION = 0.10
# A plan fits when it leaves this fraction of the card free: the estimate is a model, not a measurement.
FIT_FRACTION = 0.90

# Bytes per element.
BF16 = 2
FP32 = 4
# Decoder blocks unsharded at once under FSDP: the one computing and the one being prefetched.
LIVE_BLOCKS = 2
# Post-training stages: SFT costs what pretraining costs at its own batch; DPO runs chosen and rejected through the
# policy in one forward (twice the sequences) and holds a frozen reference model.
STAGES = ("pretrain", "sft", "dpo")


@dataclass
class MemoryPlan:
    """Per-GPU memory estimate of one training setting; every `*_bytes` field is bytes on one GPU.

    Args:
        gpus: number of GPUs sharding the model (FSDP full shard).
        micro_batch: sequences per GPU per forward/backward.
        seq_len: tokens per sequence.
        activation_checkpointing: whether `activations_bytes` is the checkpointed figure.
        gradient_sync_every_micro_batch: whether gradients are reduce-scattered after every micro-batch.
        gpu: canonical GPU name (a key of `GPU_MEMORY_BYTES`), or `None` when not given.
        num_parameters: parameters of the model (tied weights once).
        parameters_bytes: fp32 master shard plus the bf16 gathered copies alive at once.
        gradients_bytes: unsharded fp32 accumulation (or the fp32 shard) plus the live modules' unsharded gradients.
        optimizer_bytes: AdamW moments (2 fp32 states), sharded.
        activations_bytes: activations of the chosen setting.
        activations_with_checkpointing_bytes: activations with checkpointing per decoder block.
        activations_without_checkpointing_bytes: activations without checkpointing.
        logits_bytes: logits (bf16), their fp32 upcast and the fp32 log-probabilities of the loss.
        overhead_bytes: CUDA context, NCCL buffers and caching-allocator slack.
        total_bytes: the sum of the above.
        gpu_memory_bytes: nominal memory of `gpu`, or `None`.
        fits: whether `total_bytes <= FIT_FRACTION * gpu_memory_bytes`; `None` without a GPU.
        stage: `pretrain`, `sft` or `dpo`.
        reference_model_bytes: DPO's frozen reference model (bf16, sharded like the policy; no gradients).
    """

    gpus: int
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    gradient_sync_every_micro_batch: bool
    gpu: str | None
    num_parameters: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_with_checkpointing_bytes: int
    activations_without_checkpointing_bytes: int
    logits_bytes: int
    overhead_bytes: int
    total_bytes: int
    gpu_memory_bytes: int | None
    fits: bool | None
    stage: str = "pretrain"
    reference_model_bytes: int = 0

    def utilization(self, gpu: str) -> float:
        """Fraction of `gpu`'s memory this plan needs (1.0 = full)."""
        return self.total_bytes / GPU_MEMORY_BYTES[resolve_gpu(gpu)]

    def verdict(self, gpu: str) -> str:
        """`"fits"` (at most 90% of the card), `"tight"` (90-100%) or `"does not fit"` on `gpu`."""
        used = self.utilization(gpu)
        return "fits" if used <= FIT_FRACTION else "tight" if used <= 1.0 else "does not fit"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_gpu(name: str) -> str:
    """Canonical GPU name for `name` (case, spaces and dashes ignored), or `ConfigError` listing the valid ones.

    Args:
        name: e.g. `"RTX 4090"`, `"rtx4090"`, `"A100 80GB"`.
    """

    def normalize(text: str) -> str:
        return re.sub(r"[\s_-]", "", text).lower()

    candidates = {normalize(key): key for key in GPU_MEMORY_BYTES}
    candidates.update({normalize(alias): key for alias, key in _GPU_ALIASES.items()})
    if isinstance(name, str) and normalize(name) in candidates:
        return candidates[normalize(name)]
    raise ConfigError(
        f"Unknown GPU {name!r}. Valid GPUs are: {', '.join(repr(key) for key in GPU_MEMORY_BYTES)} "
        "(pass one with --gpu, or leave it out to see every GPU)."
    )


def resolve_preset(name: str, overrides: dict[str, Any] | None = None) -> GenesisConfig:
    """`GenesisConfig.from_preset(name, **overrides)`, raising `ConfigError` (listing the presets for an unknown name).

    Args:
        name: a key of `GENESIS_PRESETS`.
        overrides: GenesisConfig fields over the preset (the pretrain YAML's `model_overrides`).
    """
    if name not in GENESIS_PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}. Valid presets are: {', '.join(sorted(GENESIS_PRESETS))}.")
    try:
        return GenesisConfig.from_preset(name, **(overrides or {}))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"Invalid model_overrides {overrides!r} for preset {name!r}: {error}") from None


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def activation_bytes_per_token_per_layer(config: GenesisConfig) -> int:
    """Bytes autograd saves per token in one decoder layer: `20h + 4h_kv + 8I + 8 + 4 n_heads` (see the module).

    Args:
        config: a `GenesisConfig`.
    """
    hidden = config.hidden_size
    query_width, key_value_width = attention_widths(config)
    # fp32 upcast + normalised bf16 + bf16 output feeding the next matmul
    rms_norm = FP32 * hidden + BF16 * hidden + BF16 * hidden
    # rotated q, k, v at their own widths, and the attention output that o_proj reads
    attention = BF16 * (query_width + 2 * key_value_width + query_width)
    # gate (read by silu), silu(gate) and up (read by the product), the product (read by down_proj)
    mlp = BF16 * 4 * config.intermediate_size
    # per-token scalars: each norm's fp32 rsqrt, and the attention kernel's fp32 logsumexp per head
    scalars = 2 * FP32 + FP32 * config.num_attention_heads
    return 2 * rms_norm + attention + mlp + scalars


def estimate_memory(
    config: GenesisConfig,
    *,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    activation_checkpointing: bool,
    gpu: str | None = None,
    gradient_sync_every_micro_batch: bool = False,
    stage: str = "pretrain",
) -> MemoryPlan:
    """Estimate the peak memory per GPU of training `config` with FSDP2 (see the module docstring for the model).

    Args:
        config: the model's `GenesisConfig`.
        gpus: number of GPUs sharding parameters, gradients and optimizer states (1 = a single GPU).
        micro_batch: sequences per GPU per forward/backward.
        seq_len: tokens per sequence.
        activation_checkpointing: checkpoint every decoder block (recompute it in backward).
        gpu: a key of `GPU_MEMORY_BYTES` (case-insensitive) to decide `fits`; `None` leaves `fits` unset.
        gradient_sync_every_micro_batch: the trainer reduce-scatters gradients after every micro-batch instead of
            accumulating unsharded gradients until the last one (genesis_hf's trainer does the latter).
        stage: `pretrain`, `sft` (the same estimate at the SFT batch) or `dpo` (chosen and rejected sequences of each
            pair in one forward, so twice the activations and logits, plus a bf16 reference model sharded like the
            policy; its forward runs without gradients, so it keeps no activations).

    Raises:
        ConfigError: a non-positive size or an unknown GPU.
    """
    gpus = _check_positive("gpus", gpus)
    micro_batch = _check_positive("micro_batch", micro_batch)
    seq_len = _check_positive("seq_len", seq_len)
    gpu = resolve_gpu(gpu) if gpu is not None else None
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r}; use one of {', '.join(STAGES)}.")

    model_state = _model_state_bytes(config, gpus, gradient_sync_every_micro_batch, dpo=stage == "dpo")
    activations = _activation_bytes(config, tokens=micro_batch * seq_len * (2 if stage == "dpo" else 1))
    if activation_checkpointing:
        activations_bytes = activations["activations_with_checkpointing_bytes"]
    else:
        activations_bytes = activations["activations_without_checkpointing_bytes"]
    tensors = activations_bytes + activations["logits_bytes"]
    tensors += model_state["parameters_bytes"] + model_state["gradients_bytes"] + model_state["optimizer_bytes"]
    tensors += model_state["reference_model_bytes"]
    overhead_bytes = (
        CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if gpus > 1 else 0) + round(ALLOCATOR_SLACK_FRACTION * tensors)
    )
    total_bytes = tensors + overhead_bytes
    gpu_memory_bytes = GPU_MEMORY_BYTES[gpu] if gpu is not None else None
    return MemoryPlan(
        gpus=gpus,
        micro_batch=micro_batch,
        seq_len=seq_len,
        activation_checkpointing=bool(activation_checkpointing),
        gradient_sync_every_micro_batch=bool(gradient_sync_every_micro_batch),
        gpu=gpu,
        **model_state,
        activations_bytes=activations_bytes,
        **activations,
        overhead_bytes=overhead_bytes,
        total_bytes=total_bytes,
        gpu_memory_bytes=gpu_memory_bytes,
        fits=None if gpu_memory_bytes is None else total_bytes <= FIT_FRACTION * gpu_memory_bytes,
        stage=stage,
    )


def _model_state_bytes(
    config: GenesisConfig, gpus: int, gradient_sync_every_micro_batch: bool, *, dpo: bool
) -> dict[str, int]:
    """Per-GPU parameters, gradients, AdamW moments and DPO's reference model (the `MemoryPlan` fields
    `num_parameters`, `parameters_bytes`, `gradients_bytes`, `optimizer_bytes`, `reference_model_bytes`)."""
    counts = parameter_counts(config)
    num_parameters = counts.total
    shard = -(-num_parameters // gpus)
    live_blocks = min(LIVE_BLOCKS, config.num_hidden_layers)
    live_parameters = counts.embedding + counts.lm_head + counts.final_norm + live_blocks * counts.per_layer

    if gpus == 1:
        parameters_bytes = (FP32 + BF16) * num_parameters
    else:
        parameters_bytes = FP32 * shard + BF16 * live_parameters
    if gpus == 1:
        gradients_bytes = FP32 * num_parameters
    elif gradient_sync_every_micro_batch:
        gradients_bytes = FP32 * shard + (BF16 + FP32) * live_parameters
    else:
        # The whole model's unsharded fp32 gradient accumulates on every GPU until the step's last micro-batch, whose
        # backward turns it into the sharded gradient block by block; the two never coexist in full.
        gradients_bytes = FP32 * num_parameters + BF16 * live_parameters
    reference_model_bytes = 0
    if dpo:
        reference_model_bytes = BF16 * num_parameters if gpus == 1 else BF16 * (shard + live_parameters)
    return {
        "num_parameters": num_parameters,
        "parameters_bytes": parameters_bytes,
        "gradients_bytes": gradients_bytes,
        "optimizer_bytes": 2 * FP32 * shard,
        "reference_model_bytes": reference_model_bytes,
    }


def _activation_bytes(config: GenesisConfig, tokens: int) -> dict[str, int]:
    """Activations of `tokens` tokens per GPU with and without checkpointing, and the logits of the loss (the
    `MemoryPlan` fields `activations_with_checkpointing_bytes`, `activations_without_checkpointing_bytes`,
    `logits_bytes`)."""
    per_layer = activation_bytes_per_token_per_layer(config) * tokens
    final_norm = (FP32 + 2 * BF16) * config.hidden_size * tokens
    layer_inputs = BF16 * config.hidden_size * tokens * config.num_hidden_layers
    return {
        "activations_with_checkpointing_bytes": layer_inputs + per_layer + final_norm,
        "activations_without_checkpointing_bytes": config.num_hidden_layers * per_layer + final_norm,
        "logits_bytes": (BF16 + FP32 + FP32) * config.vocab_size * tokens,
    }


def _settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge `--config` (pretrain YAML, only the keys the plan needs) under the command-line flags."""
    from_file: dict[str, Any] = {}
    if args.config is not None:
        values = load_yaml(args.config)
        # The pretrain YAML holds many more keys (optimizer, data, logging); only these matter for memory.
        for yaml_key, setting in (
            ("model_preset", "preset"),
            ("per_device_train_batch_size", "micro_batch"),
            ("seq_len", "seq_len"),
            ("max_length", "seq_len"),  # SFT/DPO YAMLs (TRL's name)
            ("gradient_checkpointing", "activation_checkpointing"),
            ("model_overrides", "model_overrides"),
        ):
            if values.get(yaml_key) is not None:
                from_file[setting] = values[yaml_key]
        checkpointing = from_file.get("activation_checkpointing")
        if checkpointing is not None and not isinstance(checkpointing, bool):
            raise ConfigError(
                f"gradient_checkpointing in {args.config!r} must be true or false, got {checkpointing!r}."
            )
        overrides = from_file.get("model_overrides")
        if isinstance(overrides, str):
            try:
                overrides = json.loads(overrides)
            except json.JSONDecodeError:
                overrides = None
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(
                f"model_overrides in {args.config!r} must be a mapping of GenesisConfig fields, got "
                f"{from_file['model_overrides']!r}."
            )
        from_file["model_overrides"] = overrides or {}
    settings = {
        "preset": "genesis-1b",
        "micro_batch": 4,
        "seq_len": None,
        "activation_checkpointing": True,
        "model_overrides": {},
    }
    settings.update(from_file)
    for name in ("preset", "micro_batch", "seq_len", "activation_checkpointing"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if not isinstance(settings["preset"], str):
        raise ConfigError(f"model_preset must be a preset name, got {settings['preset']!r}.")
    return settings


def _format_count(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count:,}"


def format_plan(plan: MemoryPlan, config: GenesisConfig, preset: str) -> str:
    """The human-readable report of `genesis-hf plan`.

    Args:
        plan: the estimate to print.
        config: the config it was estimated for.
        preset: the preset name to show.
    """
    other = estimate_memory(
        config,
        gpus=plan.gpus,
        micro_batch=plan.micro_batch,
        seq_len=plan.seq_len,
        activation_checkpointing=not plan.activation_checkpointing,
        gpu=plan.gpu,
        gradient_sync_every_micro_batch=plan.gradient_sync_every_micro_batch,
        stage=plan.stage,
    )
    parameters_label = "parameters (fp32 shard + bf16 gathered copies)"
    if plan.gpus == 1:
        parameters_label = "parameters (fp32 + autocast bf16 copies)"
        gradients_label = "gradients (fp32)"
    elif plan.gradient_sync_every_micro_batch:
        gradients_label = "gradients (fp32 shard + reduce-scatter buffers)"
    else:
        gradients_label = "gradients (unsharded fp32 accumulation)"
    checkpointing = "checkpointed" if plan.activation_checkpointing else "not checkpointed"
    rows = [
        (parameters_label, plan.parameters_bytes),
        (gradients_label, plan.gradients_bytes),
        ("optimizer (AdamW, 2 fp32 states, sharded)", plan.optimizer_bytes),
        (f"activations ({checkpointing})", plan.activations_bytes),
        (f"logits and loss (vocab {config.vocab_size}, fp32)", plan.logits_bytes),
        ("CUDA context, NCCL, allocator slack", plan.overhead_bytes),
        ("total", plan.total_bytes),
    ]
    if plan.stage == "dpo":
        rows.insert(5, ("reference model (bf16, no gradients)", plan.reference_model_bytes))
    lines = [
        (f"{plan.stage.upper()} " if plan.stage != "pretrain" else "")
        + f"{preset}: {_format_count(plan.num_parameters)} parameters, "
        + ("1 GPU, " if plan.gpus == 1 else f"{plan.gpus} GPUs with FSDP full sharding, ")
        + f"micro-batch {plan.micro_batch}{' pairs' if plan.stage == 'dpo' else ''} x {plan.seq_len} tokens, "
        + "activation checkpointing "
        + ("on" if plan.activation_checkpointing else "off"),
        "",
        f"{'memory per GPU':<52}{'GiB':>7}",
        *(f"  {label:<50}{num_bytes / GIB:7.2f}" for label, num_bytes in rows),
        f"  ({'without' if plan.activation_checkpointing else 'with'} activation checkpointing: activations "
        f"{other.activations_bytes / GIB:.2f} GiB, total {other.total_bytes / GIB:.2f} GiB)",
        "",
        f"{'GPU':<12}{'memory':>8}{'needs':>8}   verdict",
    ]
    for name, capacity in GPU_MEMORY_BYTES.items():
        marker = "   <- --gpu" if name == plan.gpu else ""
        lines.append(
            f"{name:<12}{capacity / GIB:>4.0f} GiB{plan.utilization(name):>8.0%}   {plan.verdict(name)}{marker}"
        )
    lines += [
        "",
        f"'fits' leaves at least {1 - FIT_FRACTION:.0%} of the card free. Assumes FSDP2 with fp32 master weights, bf16 "
        "compute and SDPA/flash attention; see `genesis_hf/pretrain/plan.py` for the formulas.",
    ]
    return "\n".join(lines)


def _run_plan(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from_args(args)
        overrides = dict(settings["model_overrides"])
        if args.stage != "pretrain" and "vocab_size" not in overrides:
            # SFT adds the four ChatML tokens to the vocabulary (49152 -> 49156 for the 1B).
            overrides["vocab_size"] = resolve_preset(settings["preset"]).vocab_size + 4
        config = resolve_preset(settings["preset"], overrides)
        seq_len = settings["seq_len"] if settings["seq_len"] is not None else config.max_position_embeddings
        plan = estimate_memory(
            config,
            gpus=args.gpus,
            micro_batch=settings["micro_batch"],
            seq_len=seq_len,
            activation_checkpointing=settings["activation_checkpointing"],
            gpu=args.gpu,
            gradient_sync_every_micro_batch=args.sync_every_micro_batch,
            stage=args.stage,
        )
    except ConfigError as error:
        print(f"genesis-hf plan: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        report = {
            "preset": settings["preset"],
            "config_file": args.config,
            "model_overrides": settings["model_overrides"],
            **plan.to_dict(),
            "flops_per_token": flops_per_token(config, plan.seq_len),
            "gpu_table": {
                name: {
                    "memory_bytes": capacity,
                    "utilization": round(plan.utilization(name), 4),
                    "verdict": plan.verdict(name),
                }
                for name, capacity in GPU_MEMORY_BYTES.items()
            },
        }
        print(json.dumps(report, indent=2))
    else:
        print(format_plan(plan, config, settings["preset"]))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf plan` to the top-level `subparsers`."""
    help = "Estimate per-GPU memory of a pretraining setting and whether it fits."
    parser = add_command(subparsers, "plan", help=help, description=__doc__.split("\n\n")[0], func=_run_plan)
    parser.add_argument(
        "--preset", default=None, help=f"Model preset: {', '.join(sorted(GENESIS_PRESETS))} (default genesis-1b)."
    )
    parser.add_argument(
        "--config",
        default=None,
        help="Pretrain YAML; reads model_preset, model_overrides, per_device_train_batch_size, seq_len and "
        "gradient_checkpointing, ignores the rest. Flags given on the command line win; keys it lacks take the "
        "seed setting's values.",
    )
    parser.add_argument("--gpus", type=int, default=2, help="GPUs sharding the model with FSDP (default 2).")
    parser.add_argument(
        "--gpu", default=None, help=f"GPU kind for the verdict: {', '.join(GPU_MEMORY_BYTES)} (default: show all)."
    )
    parser.add_argument("--micro_batch", dest="micro_batch", type=int, default=None, help="Sequences per GPU (4).")
    parser.add_argument(
        "--seq_len", dest="seq_len", type=int, default=None, help="Tokens per sequence (the model's context)."
    )
    parser.add_argument(
        "--activation_checkpointing",
        dest="activation_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Checkpoint every decoder block (default on); --no-activation-checkpointing turns it off.",
    )
    parser.add_argument(
        "--sync_every_micro_batch",
        dest="sync_every_micro_batch",
        action="store_true",
        help="Estimate for a trainer that reduce-scatters gradients after every micro-batch (less memory, more "
        "traffic); the default matches genesis_hf's trainer, which accumulates unsharded gradients.",
    )
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="pretrain",
        help="pretrain, sft (ChatML tokens added) or dpo (pairs in one forward, plus a reference model).",
    )
    parser.add_argument("--json", action="store_true", help="Print the estimate as JSON (sizes in bytes).")


__all__ = [
    "GPU_MEMORY_BYTES",
    "MemoryPlan",
    "activation_bytes_per_token_per_layer",
    "estimate_memory",
    "format_plan",
    "register_cli",
    "resolve_gpu",
    "resolve_preset",
]
