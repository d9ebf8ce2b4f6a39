"""Pretraining speed: a full optimizer step of GenesisForCausalLM vs LlamaForCausalLM, and the checkpoint stall.

1. Train step (forward, backward, clip, AdamW) of the same config and weights, Genesis and Llama alternating round by
   round so that machine noise hits both alike: median seconds, tokens/s, MFU and the Genesis/Llama ratio. MFU uses
   `flops.detect_peak_flops` on a GPU; on a CPU (no datasheet peak) it is measured against this machine's own dense
   float32 matmul throughput, reported as `peak_flops_source: "measured_matmul"`.
2. Checkpoint stall: seconds the training loop is blocked by `CheckpointManager.save` for a synchronous save (the
   whole write) and an asynchronous one (gather + copy to CPU memory; the write continues in the background, and its
   duration is reported too). Uses a bigger model than the step benchmark, so that the write is not trivial.

    .venv/bin/python benchmarks/pretrain.py [--preset genesis-tiny] [--rounds 7] [--device cpu|cuda] [--dtype fp32|bf16]

Prints one JSON object.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.model.convert import to_llama
from genesis_hf.pretrain.checkpoint import CheckpointManager, capture_rng_state
from genesis_hf.pretrain.distributed import clip_grad_norm_
from genesis_hf.pretrain.flops import detect_peak_flops, flops_per_token, mfu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """Dense matmul FLOP/s of this device, a stand-in for the datasheet peak where there is none (CPUs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def train_step(model, optimizer, input_ids: torch.Tensor, dtype: torch.dtype) -> float:
    synchronize(input_ids.device)
    start = time.perf_counter()
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(input_ids.device)
    return time.perf_counter() - start


def benchmark_steps(args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    config = GenesisConfig.from_preset(args.preset, attn_implementation=args.attn)
    genesis = GenesisForCausalLM(config).float().to(device).train()
    models = {"genesis": genesis, "llama": to_llama(genesis).train()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
    for name, model in models.items():  # warm-up: allocator, kernels, AdamW state
        train_step(model, optimizers[name], input_ids, dtype)
    times = {name: [] for name in models}
    for round_index in range(args.rounds):
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(train_step(models[name], optimizers[name], input_ids, dtype))

    peak, peak_source = detect_peak_flops(device), "datasheet"
    if peak is None:
        peak, peak_source = measured_matmul_flops(device, dtype), "measured_matmul"
    tokens = args.batch * args.seq_len
    per_token = flops_per_token(config, args.seq_len)
    result = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "flops_per_token": per_token,
              "peak_flops": peak, "peak_flops_source": peak_source}  # fmt: skip
    for name, samples in times.items():
        median = statistics.median(samples)
        result[name] = {
            "step_seconds": median,
            "tokens_per_second": tokens / median,
            "mfu": mfu(tokens / median, per_token, peak, 1),
        }
    result["genesis_over_llama_step_time"] = result["genesis"]["step_seconds"] / result["llama"]["step_seconds"]
    return result


def benchmark_checkpoint_stall(args, device: torch.device) -> dict:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    overrides = json.loads(args.checkpoint_overrides)
    config = GenesisConfig.from_preset(args.preset, **overrides)
    model = GenesisForCausalLM(config).float().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, config.vocab_size, (1, 16), device=device)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()  # AdamW state exists, as in a real checkpoint
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|endoftext|>")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    result = {"parameters": parameters, "overrides": overrides}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("sync", "async"):
            manager = CheckpointManager(
                Path(folder) / mode, save_total_limit=1, milestone_steps=None, async_save=mode == "async",
                run_config={}, model_config=config, tokenizer=tokenizer,
            )  # fmt: skip
            stalls, writes = [], []
            for step in range(1, args.checkpoint_rounds + 1):
                state = {"step": step, "tokens_seen": 0, "loss": 0.0}
                rank_state = {"data_loader": {}, "rng": capture_rng_state()}
                start = time.perf_counter()
                manager.save(step, model, optimizer, state, rank_state)
                stalls.append(time.perf_counter() - start)
                manager.wait()  # the background write, if any, finishes here (timed separately)
                writes.append(time.perf_counter() - start)
            manager.close()
            size = sum(path.stat().st_size for path in (Path(folder) / mode).rglob("*") if path.is_file())
            result[mode] = {
                "loop_stall_seconds": statistics.median(stalls),
                "save_to_visible_seconds": statistics.median(writes),
                "checkpoint_bytes": size,
            }
    result["async_stall_over_sync_stall"] = (
        result["async"]["loop_stall_seconds"] / result["sync"]["loop_stall_seconds"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="genesis-tiny")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the step")
    parser.add_argument("--attn", default="sdpa", help="attention implementation for both models")
    parser.add_argument(
        "--checkpoint-overrides",
        default='{"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12, '
        '"num_key_value_heads": 4}',
        help="GenesisConfig overrides of --preset for the checkpoint benchmark (default ~60M parameters)",
    )
    parser.add_argument("--checkpoint-rounds", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "train_step": benchmark_steps(args, device, dtype),
        "checkpoint": benchmark_checkpoint_stall(args, device),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
