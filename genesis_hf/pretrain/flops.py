"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token (`flops_per_token`) follow the PaLM paper's appendix B (Chowdhery et al. 2022), the convention of
nanoGPT and torchtitan:

    flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

- `6 * N_matmul`: a forward multiply-add costs 2 FLOPs per weight and the backward pass twice that. `N_matmul` counts
  every weight that takes part in a matmul: the q/k/v/o and gate/up/down projections of every layer, *and* the
  `lm_head` (vocab x hidden), which is counted even when tied to the input embedding because the output projection
  is a real matmul. The embedding lookup and the RMSNorm weights do no matmul and are left out. For genesis-1b
  N_matmul = 1.0003e9, so this term is 6.00e9.
- `12 * L * H * Q * T`: the attention scores `q @ k^T` and the weighted sum `p @ v` (2 * 2 * T * H * Q forward per
  token and layer, x3 for forward + backward). The causal mask is not credited: half of those scores are masked,
  but the convention counts them all. For genesis-1b at 2048 tokens this is 1.21e9 (+20%).
- Activation recomputation is excluded: MFU credits the FLOPs the model needs, not the extra forward pass that
  activation checkpointing spends (that would be hardware FLOPs utilisation, HFU).

The seed project reported ~35% MFU for 19,000 tok/s on 2x RTX 4090; that figure is the `6 * N` part alone
(19,000 * 6.00e9 / (2 * 165.2e12) = 34.5%). With the attention term, the same throughput is 41.5% MFU. Pass
`include_attention=False` to compare with numbers quoted that way.

Peak FLOPs (`PEAK_FLOPS`) are dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendor datasheets, with fp32
accumulation, which is what bf16 training uses. GeForce cards run fp32-accumulate at half the fp16-accumulate rate,
and their datasheets quote both: the RTX 4090's 165.2 TFLOPS is the "Peak FP16/BF16 Tensor TFLOPS with FP32
Accumulate" line of NVIDIA's Ada Lovelace whitepaper (330.3 with fp16 accumulate, twice that again with sparsity).
"""

import os
import re

import torch

from genesis_hf.args import ConfigError
from genesis_hf.model.sizes import attention_widths, parameter_counts

PEAK_FLOPS_ENV = "GENESIS_HF_PEAK_FLOPS"

# Dense bf16 tensor-core peak per device, fp32 accumulate, no sparsity (vendor datasheets; sparsity figures are 2x).
PEAK_FLOPS: dict[str, float] = {
    "RTX 3090": 71e12,  # NVIDIA Ampere GA102 whitepaper, BF16 tensor with FP32 accumulate
    "RTX 4090": 165.2e12,  # NVIDIA Ada Lovelace whitepaper, FP16/BF16 tensor with FP32 accumulate
    "L40S": 362.05e12,  # NVIDIA L40S datasheet (733 with sparsity)
    "A100": 312e12,  # NVIDIA A100 datasheet, SXM and PCIe, 40 GB and 80 GB (624 with sparsity)
    "H100 PCIe": 756e12,  # NVIDIA H100 datasheet, PCIe (1,513 with sparsity)
    "H100 SXM": 989e12,  # NVIDIA H100 datasheet, SXM5 (1,979 with sparsity)
    "H200": 989e12,  # NVIDIA H200 datasheet, SXM (same tensor cores as H100 SXM, more and faster memory)
}

# How `torch.cuda.get_device_name()` spells each device ("NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB",
# "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200"). Checked in order: PCIe before the plain H100 (SXM).
_DEVICE_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"RTX\s*3090", "RTX 3090"),
    (r"RTX\s*4090", "RTX 4090"),
    (r"\bL40S\b", "L40S"),
    (r"\bA100\b", "A100"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH200\b", "H200"),
)


def peak_flops_for_name(device_name: str) -> float | None:
    """Dense bf16 peak FLOPs of a device from its name as CUDA reports it, or `None` if it is not in `PEAK_FLOPS`.

    Args:
        device_name: e.g. `"NVIDIA GeForce RTX 4090"` (what `torch.cuda.get_device_name()` returns).
    """
    for pattern, key in _DEVICE_NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return PEAK_FLOPS[key]
    return None


def _peak_flops_from_env() -> float | None:
    value = os.environ.get(PEAK_FLOPS_ENV)
    if value is None or value.strip() == "":
        return None
    try:
        peak = float(value)
    except ValueError:
        peak = float("nan")
    if not peak > 0 or peak == float("inf"):
        raise ConfigError(
            f"{PEAK_FLOPS_ENV}={value!r} is not a positive number of FLOP/s; set it to the dense bf16 peak of one "
            "device, e.g. 165.2e12 for an RTX 4090, or unset it."
        )
    return peak


def detect_peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, for MFU; `None` on CPU or for a GPU not in `PEAK_FLOPS`.

    The environment variable `GENESIS_HF_PEAK_FLOPS` (e.g. `165.2e12`) overrides detection on any device, for GPUs
    missing from the table or to report MFU against a different peak.

    Args:
        device: the device to look up; `None` means the current CUDA device if there is one.
    """
    override = _peak_flops_from_env()
    if override is not None:
        return override
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def flops_per_token(config, seq_len: int, *, include_attention: bool = True) -> float:
    """Training FLOPs (forward + backward) per token: `6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len`.

    See the module docstring for what is counted; activation recomputation is excluded (the MFU convention).
    genesis-1b at 2048 tokens: 6.00e9 + 1.21e9 = 7.21e9.

    Args:
        config: a `GenesisConfig`.
        seq_len: training sequence length (the attention term grows with it).
        include_attention: add the attention-score term; `False` gives the plain `6 * N` estimate.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    flops = 6.0 * parameter_counts(config).matmul
    if include_attention:
        query_width, _ = attention_widths(config)  # n_heads * head_dim
        flops += 12.0 * config.num_hidden_layers * query_width * seq_len
    return flops


def mfu(
    tokens_per_second: float, flops_per_token: float, peak_flops: float | None, world_size: int = 1
) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices, as a fraction (0.35 = 35%).

    Args:
        tokens_per_second: training throughput of the whole job, summed over all ranks.
        flops_per_token: from `flops_per_token`.
        peak_flops: dense peak of one device (`detect_peak_flops`); `None` gives `None` (report MFU as null).
        world_size: number of devices sharing `tokens_per_second`.
    """
    if peak_flops is None:
        return None
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be positive or None, got {peak_flops!r}.")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}.")
    return tokens_per_second * flops_per_token / (peak_flops * world_size)


__all__ = [
    "PEAK_FLOPS",
    "PEAK_FLOPS_ENV",
    "detect_peak_flops",
    "flops_per_token",
    "mfu",
    "peak_flops_for_name",
]
