"""GenesisForCausalLM against LlamaForCausalLM with the same config and weights, side by side in one run.

Measures one forward+backward step and greedy generation, alternating the two models round by round so that machine
noise hits both alike, and prints JSON with the median times and the Genesis/Llama ratios (target: <= 1.02).

    .venv/bin/python benchmarks/model.py [--preset genesis-tiny] [--rounds 15] [--device cpu|cuda] [--dtype fp32|bf16]
"""

import argparse
import json
import statistics
import time

import torch

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.model.convert import to_llama


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train_step(model, input_ids: torch.Tensor) -> float:
    synchronize(input_ids.device)
    start = time.perf_counter()
    model(input_ids, labels=input_ids).loss.backward()
    synchronize(input_ids.device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


@torch.no_grad()
def time_generation(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    synchronize(prompt.device)
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    synchronize(prompt.device)
    return time.perf_counter() - start, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="genesis-tiny")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--attn", default="sdpa", help="attention implementation for both models")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    config = GenesisConfig.from_preset(args.preset, dtype=dtype, attn_implementation=args.attn)
    genesis = GenesisForCausalLM(config).to(device=device, dtype=dtype)
    llama = to_llama(genesis)
    models = {"genesis": genesis, "llama": llama}

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
    prompt = input_ids[:1, :16]

    for model in models.values():  # warm-up: allocator, kernels, lazy inits
        model.train()
        time_train_step(model, input_ids)
        model.eval()
        time_generation(model, prompt, 4)

    train_times = {name: [] for name in models}
    generate_times = {name: [] for name in models}
    outputs = {}
    for round_index in range(args.rounds):
        # Alternate which model goes first so neither always runs on a warmer cache.
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for name in order:
            model = models[name].train()
            train_times[name].append(time_train_step(model, input_ids))
            model.eval()
            elapsed, outputs[name] = time_generation(model, prompt, args.new_tokens)
            generate_times[name].append(elapsed)

    median = {
        key: {name: statistics.median(times) for name, times in table.items()}
        for key, table in (("train_step_s", train_times), ("generate_s", generate_times))
    }
    tokens = args.batch * args.seq_len
    report = {
        "benchmark": "model",
        "preset": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "train_step_median_s": median["train_step_s"],
        "train_tokens_per_s": {name: tokens / seconds for name, seconds in median["train_step_s"].items()},
        "generate_median_s": median["generate_s"],
        "ratio_train_step_genesis_over_llama": median["train_step_s"]["genesis"] / median["train_step_s"]["llama"],
        "ratio_generate_genesis_over_llama": median["generate_s"]["genesis"] / median["generate_s"]["llama"],
        "same_greedy_tokens": bool(torch.equal(outputs["genesis"], outputs["llama"])),
        "target_ratio_max": 1.02,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
