"""Rows per second of the critique-revise pipeline: batched in-process generation against one prompt at a time.

Same model (a randomly initialised genesis-tiny, context raised to 2,048 for the critique conversations), same
prompts, same settings; every reply is exactly `--new-tokens` long (`min_new_tokens`), so both runs do the same work.
The two runs alternate `--repeats` times in one process; prints JSON with the median rows/s and their ratio.

    .venv/bin/python benchmarks/constitution.py [--prompts 16] [--batch-size 16] [--new-tokens 32] [--threads 1]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.constitution.backends import BackendArguments, GenerationSettings, TransformersBackend
from genesis_hf.constitution.cli import GenerateArguments, generate_dataset
from genesis_hf.tokenizer import add_chat_tokens, default_tokenizer


def build_model_folder(folder: Path, preset: str, vocab_size: int) -> None:
    tokenizer = default_tokenizer(vocab_size)
    add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    config = GenesisConfig.from_preset(preset, vocab_size=len(tokenizer), max_position_embeddings=2048)
    GenesisForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def rows_per_second(backend, batch_size: int, args, work_dir: Path) -> float:
    backend.batch_size = batch_size
    output_dir = Path(tempfile.mkdtemp(dir=work_dir))
    generate_args = GenerateArguments(
        output_dir=str(output_dir), max_prompts=args.prompts, num_few_shot=args.num_few_shot, seed=0
    )
    backend_args = BackendArguments(model=backend.name, max_new_tokens=args.new_tokens, batch_size=batch_size)
    start = time.perf_counter()
    summary = generate_dataset(generate_args, backend_args, backend=backend)
    elapsed = time.perf_counter() - start
    assert summary["generated_now"] == args.prompts
    return args.prompts / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="genesis-tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-few-shot", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # One intra-op thread by default: on a small shared CPU, OpenMP threads waiting for each other made every tiny
    # matmul ~40x slower (2 cores at load 8), which drowns what batching changes. Both runs use the same setting.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        build_model_folder(work_dir / "model", args.preset, args.vocab_size)
        settings = GenerationSettings(
            max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95, min_new_tokens=args.new_tokens
        )
        backend = TransformersBackend(str(work_dir / "model"), settings, dtype="float32", device=args.device)
        batched, single = [], []
        for _ in range(args.repeats):
            batched.append(rows_per_second(backend, args.batch_size, args, work_dir))
            single.append(rows_per_second(backend, 1, args, work_dir))
    report = {
        "preset": args.preset,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "new_tokens_per_reply": args.new_tokens,
        "generations_per_row": 3,
        "batch_size": args.batch_size,
        "rows_per_second_batched": round(statistics.median(batched), 3),
        "rows_per_second_one_at_a_time": round(statistics.median(single), 3),
    }
    report["ratio_batched_over_one_at_a_time"] = round(
        report["rows_per_second_batched"] / report["rows_per_second_one_at_a_time"], 2
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
