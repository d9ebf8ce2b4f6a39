"""The playground's decoding loop against `model.generate`, side by side; prints one JSON object.

The playground decodes with its own token loop (`genesis_hf.playground.generation.decode_tokens`: a per-request seeded
generator, transformers' logits processors, a `DynamicCache`) instead of `generate(streamer=...)`. This measures what
that costs: the same model, prompts and settings through both, greedy and sampled (the playground's default
temperature, top-p, top-k and repetition penalty), alternating round by round. Every call generates exactly
`--new-tokens` tokens (no stop token). Printed: median tokens/s of each and the ratio loop/generate (target >= 0.9).

    .venv/bin/python benchmarks/generation.py [--rounds 7] [--new-tokens 128] [--sizes tiny,5m]
"""

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import GenerationConfig

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.playground.generation import SamplingSettings, decode_tokens

SIZES = {"tiny": {}, "5m": {"hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 704}}
PROMPT_LENGTHS = (8, 64, 200)


def playground_loop(model, prompt: list[int], settings: SamplingSettings, new_tokens: int) -> int:
    return len(list(decode_tokens(model, prompt, settings, new_tokens, frozenset())))


def transformers_generate(model, prompt: list[int], settings: SamplingSettings, new_tokens: int) -> int:
    sampled = {
        "do_sample": True,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
    }
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
        repetition_penalty=settings.repetition_penalty, **(sampled if not settings.greedy else {"do_sample": False}),
    )  # fmt: skip
    torch.manual_seed(settings.seed)
    output = model.generate(torch.tensor([prompt]), generation_config=config)
    return output.shape[1] - len(prompt)


def measure(size: str, args) -> dict:
    torch.manual_seed(0)
    config = GenesisConfig.from_preset("genesis-tiny", **SIZES[size])
    model = GenesisForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, config.vocab_size, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS
    ]
    ways = {"playground_loop": playground_loop, "generate": transformers_generate}
    result = {"overrides": SIZES[size]}
    for mode, settings in (("greedy", SamplingSettings(temperature=0.0, repetition_penalty=1.0)),
                           ("sampled", SamplingSettings())):  # fmt: skip
        for way in ways.values():  # warm-up
            way(model, prompts[0], settings, 8)
        times = {name: [] for name in ways}
        for round_index in range(args.rounds):
            order = list(ways) if round_index % 2 == 0 else list(reversed(ways))
            for name in order:
                started = time.perf_counter()
                tokens = sum(ways[name](model, prompt, settings, args.new_tokens) for prompt in prompts)
                times[name].append(time.perf_counter() - started)
                assert tokens == args.new_tokens * len(prompts), (name, tokens)
        rates = {name: args.new_tokens * len(prompts) / statistics.median(times[name]) for name in ways}
        result[mode] = {**{f"{name}_tokens_per_second": round(rate, 1) for name, rate in rates.items()},
                        "ratio_playground_loop_over_generate": round(rates["playground_loop"] / rates["generate"], 3)}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sizes", default=",".join(SIZES))
    args = parser.parse_args()
    report = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "prompt_lengths": PROMPT_LENGTHS,
              "command": " ".join(["python", "benchmarks/generation.py", *sys.argv[1:]])}  # fmt: skip
    report["sizes"] = {size: measure(size, args) for size in args.sizes.split(",")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
