"""Process setup and model wrapping for pretraining: one code path for CPU tests and GPU runs.

Accelerate launches the processes, initialises the process group (gloo on CPU, NCCL on GPU), picks the device, and
runs the trackers. The model is wrapped here, not by `accelerator.prepare`:

- **FSDP2** (`torch.distributed.fsdp.fully_shard`) when the Accelerate config says `distributed_type: FSDP` (read
  from Accelerate's own plugin, or from the `FSDP_*` variables its launcher exports) or when `--fsdp true`: each
  decoder layer (`LlamaDecoderLayer`) is one FSDP unit, then the root (embeddings, tied LM head, final norm).
  Accelerate 1.15 only turns on FSDP for GPU-like devices, so on a CPU box its FSDP config would silently give plain
  data parallelism; wrapping here makes the 2-process CPU test run exactly the sharding, activation checkpointing and sharded
  checkpoint code that the 2x RTX 4090 run uses.
- **DDP** for any other multi-process run; nothing for a single process.

Activation checkpointing wraps each decoder layer in torch's non-reentrant `checkpoint_wrapper` before sharding (the
wrapper's prefix is stripped from state-dict keys, so checkpoints do not depend on it).

Consumer GPUs: GeForce cards without NVLink deadlock or crawl with NCCL peer-to-peer over PCIe, and fragment memory
under FSDP's all-gathers. `configure_consumer_gpu_env` sets `NCCL_P2P_DISABLE=1` and
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` for them before CUDA or NCCL start (values already in the
environment win), so nobody has to remember them.
"""

import contextlib
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from genesis_hf.args import ConfigError
from genesis_hf.events import TrainingCallback

logger = logging.getLogger(__name__)

CONSUMER_GPU_ENV = {"NCCL_P2P_DISABLE": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# transformers names the block of every Llama-architecture model so, Genesis included (see modeling_genesis.py).
DECODER_LAYER_CLASS = "LlamaDecoderLayer"


# ---------------------------------------------------------------------------------------------------------------------
# Environment for consumer GPUs


def _nvidia_smi(*arguments: str) -> str | None:
    # nvidia-smi talks to the driver through NVML: unlike torch.cuda, it does not create a CUDA context in this
    # process, so the variables set afterwards still take effect.
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        return subprocess.run([executable, *arguments], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_names() -> list[str]:
    """Names of the visible NVIDIA GPUs per `nvidia-smi` (empty without a driver), without initialising CUDA."""
    output = _nvidia_smi("--query-gpu=name", "--format=csv,noheader")
    return [line.strip() for line in (output or "").splitlines() if line.strip()]


def has_active_nvlink() -> bool:
    """Whether `nvidia-smi nvlink --status` reports any active link (a bandwidth such as `25 GB/s`)."""
    output = _nvidia_smi("nvlink", "--status") or ""
    return "GB/s" in output


def is_consumer_gpu(name: str) -> bool:
    """GeForce and TITAN cards: no NVLink on current generations and PCIe peer-to-peer that NCCL cannot rely on."""
    return "geforce" in name.lower() or "titan" in name.lower()


def configure_consumer_gpu_env(policy: str = "auto") -> dict[str, str]:
    """Set `NCCL_P2P_DISABLE=1` and `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` for consumer GPUs over PCIe.

    Call before anything initialises CUDA or NCCL (importing torch does not). Variables the user already set are
    left alone.

    Args:
        policy: `"auto"` sets them when every visible GPU is a GeForce/TITAN card and no NVLink is active; `"on"`
            always; `"off"` never.

    Returns:
        The variables this call set (empty when it set none).
    """
    if policy == "off":
        return {}
    if policy == "auto":
        names = gpu_names()
        if not names or not all(is_consumer_gpu(name) for name in names) or has_active_nvlink():
            return {}
    applied = {}
    for key, value in CONSUMER_GPU_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


# ---------------------------------------------------------------------------------------------------------------------
# Accelerator and strategy


def build_accelerator(*, mixed_precision: str | None, log_with: list[str], project_dir: str):
    """An `Accelerator` that also starts the gloo process group on CPU-only machines (under `accelerate launch` or
    plain `torchrun`), which Accelerate 1.15 only does when told the run is on CPU.

    Args:
        mixed_precision: `"bf16"`, `"no"`, or `None` to take the launcher's setting.
        log_with: tracker names for `Accelerator(log_with=...)`.
        project_dir: where trackers write (tensorboard: `project_dir/<run name>`).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir),
    )
    if accelerator.device.type == "cpu":
        _use_all_cpu_cores(local_processes(accelerator))
    if accelerator.mixed_precision not in ("no", "bf16"):
        raise ConfigError(
            f"mixed_precision={accelerator.mixed_precision!r} is not supported for pretraining (fp16 needs loss "
            "scaling and overflows at this scale); use bf16 (--bf16 true or mixed_precision: bf16 in the Accelerate "
            "config) or no."
        )
    return accelerator


CPU_THREADS_ENV = "GENESIS_HF_CPU_THREADS"


def local_processes(accelerator) -> int:
    """How many processes of this run share this machine (`LOCAL_WORLD_SIZE` under a launcher, else all of them)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))


def _allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _use_all_cpu_cores(processes: int) -> int:
    # Every core this process may use, split between the run's processes on this machine; the data loader's
    # tokenizing thread gets no core of its own (it encodes the embedded corpus in a second or two per run). Measured
    # side by side on an idle 2-core machine (benchmarks/pretrain.py, `recipe_cores_less_one`), keeping a core for it
    # trained genesis-tiny at 0.6x the speed. `CpuThreadGovernor` lowers the count while other programs use the cores.
    # GENESIS_HF_CPU_THREADS fixes it.
    threads = int(os.environ.get(CPU_THREADS_ENV) or max(1, len(_allowed_cores()) // processes))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def _busy_cpu_seconds(cores: list[int]) -> float | None:
    """CPU seconds spent on `cores` by every program since boot (Linux /proc/stat), or None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    names = {f"cpu{core}" for core in cores}
    ticks = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in names:
            values = [int(value) for value in fields[1:8]]  # user nice system idle iowait irq softirq
            ticks += sum(values) - values[3] - values[4]
    return ticks / os.sysconf("SC_CLK_TCK") if ticks else None


class CpuThreadGovernor(TrainingCallback):
    """Torch's thread count on a CPU run, lowered while other programs use this process's cores.

    OpenMP threads spin-wait for each other: when another program takes a core from one of them, every matmul waits
    for it. Measured on 2 cores with genesis-tiny: 0.17 s a step on two threads alone, 4 s on two threads next to
    another training process, 0.27 s on one. So every `interval` seconds (at a step's end) this compares the cores'
    busy time (/proc/stat) with this process's own CPU time: what the other programs used, less this run's other ranks'
    share, is taken from torch's threads (at least one is kept), and given back when they stop. The thread count does
    not change the numbers a step computes (the same losses and gradients on one and two threads; exact-resume
    tests run under it), only their speed. Not used when `GENESIS_HF_CPU_THREADS` fixes the count, or off Linux.
    """

    def __init__(self, share: int, processes: int = 1, interval: float = 2.0) -> None:
        self.share, self.processes, self.interval = share, processes, interval
        self.cores = _allowed_cores()
        self.threads = share
        self.load: float | None = None  # the other programs' cores at the last check
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_cpu_seconds(self.cores), time.process_time()

    def others_load(self) -> float | None:
        """Cores used by other programs since the last call (this run's other ranks on this machine excluded)."""
        (wall, busy, own), self._mark = self._mark, self._sample()
        if busy is None or self._mark[1] is None or self._mark[0] <= wall:
            return None
        others = (self._mark[1] - busy - (self._mark[2] - own)) / (self._mark[0] - wall)
        return max(0.0, others - (self.processes - 1) * self.share)

    def on_step_end(self, step: int, record: dict[str, Any]) -> None:
        if time.monotonic() - self._mark[0] < self.interval:
            return
        load = self.load = self.others_load()
        if load is None:
            return
        threads = max(1, min(self.share, self.share - math.ceil(load - 0.25)))
        if threads != self.threads:
            logger.info(
                "Other programs use %.1f of this run's cores: torch threads %d -> %d", load, self.threads, threads
            )
            torch.set_num_threads(threads)
            self.threads = threads


def cpu_thread_governor(accelerator) -> CpuThreadGovernor | None:
    """The governor of a CPU run whose thread count is not fixed by `GENESIS_HF_CPU_THREADS`, else None."""
    if (
        accelerator.device.type != "cpu"
        or os.environ.get(CPU_THREADS_ENV)
        or _busy_cpu_seconds(_allowed_cores()) is None
    ):
        return None
    return CpuThreadGovernor(torch.get_num_threads(), local_processes(accelerator))


@dataclass
class FsdpSettings:
    """The FSDP2 knobs genesis_hf honours, from the Accelerate config or `--fsdp`.

    Args:
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3); `False` keeps them
            until backward (ZeRO-2-like, more memory, fewer all-gathers).
        activation_checkpointing: recompute each decoder layer in backward.
        offload_policy: torch's `CPUOffloadPolicy` when parameters are offloaded, else `None`.
    """

    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    offload_policy: Any = None


def fsdp_settings(accelerator, force: bool = False) -> FsdpSettings | None:
    """The FSDP2 settings of this run, or `None` when it is not sharded.

    Reads Accelerate's FSDP plugin (GPU) or rebuilds it from the `FSDP_*` variables that `accelerate launch` exports
    for an FSDP config (CPU, where Accelerate leaves the plugin unset). Rejects what genesis_hf does not run: FSDP1,
    full-state-dict checkpoints and another wrapping unit.

    Args:
        accelerator: the run's `Accelerator`.
        force: shard even without an FSDP config (`--fsdp true`), with FSDP2 defaults.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = None
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()
    if plugin is None:
        return FsdpSettings() if force else None
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"The Accelerate config asks for fsdp_version {plugin.fsdp_version}; genesis_hf shards with FSDP2 only. "
            "Set `fsdp_version: 2` under fsdp_config (see accelerate_configs/fsdp2-2x4090-pcie.yaml)."
        )
    state_dict_type = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type))
    if state_dict_type != "SHARDED_STATE_DICT":
        raise ConfigError(
            f"The Accelerate config sets fsdp_state_dict_type: {state_dict_type}. Checkpoints are sharded (every rank "
            "writes its own shard); gathering the full state at each save is what deadlocked the seed run over PCIe. "
            "Set `fsdp_state_dict_type: SHARDED_STATE_DICT`."
        )
    names = plugin.transformer_cls_names_to_wrap or [DECODER_LAYER_CLASS]
    if list(names) != [DECODER_LAYER_CLASS]:
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap is {names}; Genesis shards one {DECODER_LAYER_CLASS} per FSDP unit. "
            f"Set `fsdp_transformer_layer_cls_to_wrap: {DECODER_LAYER_CLASS}`."
        )
    return FsdpSettings(
        reshard_after_forward=bool(plugin.reshard_after_forward),
        activation_checkpointing=bool(plugin.activation_checkpointing),
        offload_policy=plugin.cpu_offload if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy" else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Wrapping


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of decoder layers of a `GenesisForCausalLM`."""
    return model.get_decoder().layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every decoder layer in a non-reentrant `checkpoint_wrapper` (its activations are recomputed in backward).

    Args:
        model: a `GenesisForCausalLM`, before FSDP or DDP wrapping.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fsdp2(model: nn.Module, settings: FsdpSettings, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard `model` in place with FSDP2: one unit per decoder layer, then the root.

    Args:
        model: a `GenesisForCausalLM` with float32 parameters (the sharded master weights stay float32).
        settings: from `fsdp_settings`.
        param_dtype: compute dtype of the gathered weights (`torch.bfloat16` for bf16 runs); gradients are reduced
            in float32 either way.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed_precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mixed_precision}
    if settings.offload_policy is not None:
        kwargs["offload_policy"] = settings.offload_policy
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        # The last layer's weights are needed again at the start of backward; resharding them would be wasted work.
        reshard = settings.reshard_after_forward and index < len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    # The root holds embed_tokens and the tied lm_head (one parameter, so one unit), the final norm and the rotary
    # buffers; it is used at both ends of the forward pass, so it is never resharded between forward and backward.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


@dataclass
class WrappedModel:
    """The model to train and how it is parallelised.

    Args:
        model: the module to call (`FSDPModule`, `DistributedDataParallel` or the plain model).
        strategy: `"fsdp2"`, `"ddp"` or `"single"`.
        autocast_dtype: dtype for `torch.autocast` around the forward (bf16 without FSDP), else `None`: FSDP2 casts
            through its mixed-precision policy instead.
    """

    model: nn.Module
    strategy: str
    autocast_dtype: torch.dtype | None = None

    @property
    def unwrapped(self) -> nn.Module:
        """The `GenesisForCausalLM` itself (under FSDP2 it is the same object, with sharded parameters)."""
        return self.model.module if self.strategy == "ddp" else self.model

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient reduction on micro-batches that are not the last of an optimizer step."""
        if self.strategy == "ddp" and not enabled:
            with self.model.no_sync():
                yield
        elif self.strategy == "fsdp2":
            self.model.set_requires_gradient_sync(enabled)
            yield
        else:
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def wrap_model(
    model: nn.Module, accelerator, *, fsdp: FsdpSettings | None, activation_checkpointing: bool
) -> WrappedModel:
    """Move `model` to the run's device and parallelise it (FSDP2, DDP or nothing), with activation checkpointing.

    Args:
        model: a float32 `GenesisForCausalLM`, identically initialised on every rank.
        accelerator: the run's `Accelerator` (device, world size, mixed precision).
        fsdp: `fsdp_settings(...)`; `None` means data parallel.
        activation_checkpointing: recompute decoder layers in backward (also on when the FSDP config asks for it).
    """
    bf16 = accelerator.mixed_precision == "bf16"
    if activation_checkpointing or (fsdp is not None and fsdp.activation_checkpointing):
        apply_activation_checkpointing(model)
    if fsdp is not None:
        if not dist.is_initialized():
            raise ConfigError(
                "FSDP2 needs a process group: launch with `accelerate launch --config_file "
                "accelerate_configs/fsdp2-1gpu.yaml recipes/pretrain.py` (or torchrun), not plain python."
            )
        if fsdp.offload_policy is None:  # offloaded parameters stay in CPU memory; FSDP moves them per use
            model.to(accelerator.device)
        apply_fsdp2(model, fsdp, torch.bfloat16 if bf16 else None)
        return WrappedModel(model, "fsdp2")
    model.to(accelerator.device)
    autocast_dtype = torch.bfloat16 if bf16 else None
    if accelerator.num_processes > 1:
        device_ids = [accelerator.local_process_index] if accelerator.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return WrappedModel(ddp, "ddp", autocast_dtype)
    return WrappedModel(model, "single", autocast_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Collectives that also work in a single process


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` over ranks in place (identity in a single process) and return it.

    Args:
        tensor: on the device of `group`'s backend (CUDA for NCCL, CPU for gloo).
        group: the process group; the default one when `None`.
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_object(value: Any, src: int = 0, group=None) -> Any:
    """Rank `src`'s `value` on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_object(value: Any, group=None) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def barrier(group=None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm over all ranks (float32 scalar on the parameters' device), clipped to `max_norm` if > 0.

    Under FSDP2 each rank holds gradient shards (DTensors); the norm of the shards is reduced to the full norm
    before clipping, so every rank sees the same value. Non-finite norms are returned as they are (the caller skips
    the step), never raised.
    """
    from torch.distributed.tensor import DTensor

    parameters = [parameter for parameter in parameters if parameter.grad is not None]
    grads = [parameter.grad for parameter in parameters]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm.float()


__all__ = [
    "CONSUMER_GPU_ENV",
    "FsdpSettings",
    "WrappedModel",
    "all_gather_object",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_fsdp2",
    "barrier",
    "broadcast_object",
    "build_accelerator",
    "clip_grad_norm_",
    "configure_consumer_gpu_env",
    "fsdp_settings",
    "wrap_model",
]
