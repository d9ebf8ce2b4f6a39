"""SFT throughput: `recipes/sft.py` against a plain `trl/scripts/sft.py`-style run, and packed against padded batches;
prints one JSON object.

    .venv/bin/python benchmarks/sft.py [--preset genesis-tiny] [--steps 20] [--rounds 2]

All runs start from the same chat-ready model (a `--preset` Genesis with `default_tokenizer(4096)`, or a 300-token
tokenizer for `debug`, ChatML tokens added once) and train `--steps` optimizer steps on the same embedded
conversations with the same `SFTConfig` (assistant-only loss, `max_length`, batch, LR, fp32 on CPU):

- `recipe`: `recipes/sft.py`'s `main` (mixture loading, schema checks, token statistics, chat setup, metrics.jsonl;
  `final/` export excluded from the timing, which is TRL's own `train_runtime`);
- `plain_trl`: what `trl/scripts/sft.py` does: `SFTTrainer(model=path, args=SFTConfig(...), train_dataset=...)`;
- `plain_trl_padded`: the same without packing (each conversation its own padded row).

Tokens are TRL's `num_tokens` (real tokens, padding excluded), timed around `SFTTrainer.train` in wall-clock seconds
and in CPU seconds of all threads (which a busy shared machine disturbs far less). Every run is a fresh process and
the kinds alternate `--rounds` times; medians per kind are reported with the ratios recipe/plain (our glue's cost in
the training loop: 1.0 means none) and packed/padded.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("recipe", "plain_trl", "plain_trl_padded")


def sft_settings(args: argparse.Namespace, output_dir: Path) -> dict:
    return {
        "output_dir": str(output_dir),
        "assistant_only_loss": True,
        "max_length": args.max_length,
        "packing": True,
        "packing_strategy": "bfd",
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": args.steps,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "seed": 0,
    }


def build_model(args: argparse.Namespace, folder: Path) -> None:
    """Save a chat-ready `--preset` model and its tokenizer to `folder` (the shared starting point)."""
    import torch

    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.posttrain.chat import prepare_chat_model
    from genesis_hf.tokenizer import default_tokenizer, train_tokenizer

    if args.preset == "debug":
        from genesis_hf import corpus

        tokenizer = train_tokenizer(list(corpus.iter_documents("stdlib-docs", max_documents=8)), 300)
    else:
        tokenizer = default_tokenizer(4096)
    torch.manual_seed(0)
    model = GenesisForCausalLM(GenesisConfig.from_preset(args.preset, vocab_size=len(tokenizer)))
    prepare_chat_model(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_worker(args: argparse.Namespace) -> dict:
    """One timed run of `args.worker`, in this process: wall and CPU seconds of `SFTTrainer.train` and its tokens."""
    import time

    import torch
    from trl import SFTTrainer

    torch.set_num_threads(args.threads)
    timing = {}
    train = SFTTrainer.train

    def timed_train(self, *train_args, **train_kwargs):
        # The CPU time of all threads; a busy machine slows the wall clock of a run far more than its CPU time.
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        output = train(self, *train_args, **train_kwargs)
        timing.update(cpu=time.process_time() - started_cpu, wall=time.perf_counter() - started_wall)
        timing["tokens"] = max(record.get("num_tokens", 0) for record in self.state.log_history)
        return output

    SFTTrainer.train = timed_train
    with tempfile.TemporaryDirectory(prefix=f"sft-bench-{args.worker}-") as output_dir:
        _run(args, Path(output_dir))
    return {
        "tokens": timing["tokens"],
        "seconds": round(timing["wall"], 3),
        "cpu_seconds": round(timing["cpu"], 3),
        "tokens_per_second": timing["tokens"] / timing["wall"],
        "tokens_per_cpu_second": timing["tokens"] / timing["cpu"],
    }


def _run(args: argparse.Namespace, output_dir: Path) -> None:
    settings = sft_settings(args, output_dir)
    if args.worker == "recipe":
        sys.path.insert(0, str(REPO / "recipes"))
        import sft as recipe

        flags = ["--model_name_or_path", args.model_dir]
        for key, value in settings.items():
            flags += [f"--{key}", str(value)]
        assert recipe.main(flags) == 0
        return

    from trl import SFTConfig, SFTTrainer

    from genesis_hf.posttrain.data import build_sft_dataset, load_sft_mixture

    settings["packing"] = args.worker == "plain_trl"
    # The recipe's conversations in the recipe's order (deduplicated, shuffled with the mixture's seed).
    dataset = build_sft_dataset(load_sft_mixture("default"))[0].remove_columns("source")
    SFTTrainer(model=args.model_dir, args=SFTConfig(**settings), train_dataset=dataset).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="genesis-tiny", help="GenesisConfig preset (genesis-tiny, debug).")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per run.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs per kind, alternating.")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="Sequences per step.")
    parser.add_argument("--max-length", dest="max_length", type=int, default=256, help="Tokens per sequence.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run.")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", dest="model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    with tempfile.TemporaryDirectory(prefix="sft-bench-model-") as model_dir:
        build_model(args, Path(model_dir))
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            for kind in KINDS:
                command = [sys.executable, __file__, "--worker", kind, "--model-dir", model_dir]
                for flag in ("preset", "steps", "batch_size", "max_length", "threads"):
                    command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise SystemExit(f"{kind} run failed:\n{result.stderr[-3000:]}")
                runs[kind].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"{kind}: {runs[kind][-1]}", file=sys.stderr, flush=True)
    report = {
        "settings": {key: getattr(args, key) for key in ("preset", "steps", "rounds", "batch_size", "max_length")}
    }
    for rate in ("tokens_per_second", "tokens_per_cpu_second"):
        median = {kind: statistics.median(run[rate] for run in runs[kind]) for kind in KINDS}
        report[rate] = {kind: round(value, 1) for kind, value in median.items()}
        report[f"ratio_recipe_over_plain_trl_{rate}"] = round(median["recipe"] / median["plain_trl"], 3)
        report[f"ratio_packed_over_padded_{rate}"] = round(median["plain_trl"] / median["plain_trl_padded"], 3)
    report["runs"] = runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
