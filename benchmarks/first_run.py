"""The README's main job, measured: does the default run learn more than word frequencies in a few minutes?

Runs `accelerate launch recipes/pretrain.py` exactly as the README does (into a temporary or given output folder),
then prints JSON: the final held-out loss, the unigram entropy of the held-out text under the run's tokenizer (what a
model that learned only word frequencies reaches), the margin between them, training seconds, the wall time of the
whole command, and greedy samples from `final/`. With `--plot PNG` it also draws the loss curve with the unigram
reference line (the figure in docs/pretraining.md).

    .venv/bin/python benchmarks/first_run.py [--output_dir DIR] [--plot docs/first_run_loss.png] [-- recipe flags]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(output_dir: Path, recipe_flags: list[str]) -> float:
    """Launch the README's main job into `output_dir`; returns its wall time in seconds."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", str(ROOT / "recipes" / "pretrain.py"), "--output_dir", str(output_dir)]
    started = time.perf_counter()
    subprocess.run(command + recipe_flags, check=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return time.perf_counter() - started


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def summarize(output_dir: Path, wall_seconds: float | None) -> dict:
    """The benchmark's JSON from a finished run folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genesis_hf.pretrain.reference import greedy_samples

    records = read_metrics(output_dir)
    unigram = next(record["unigram_entropy"] for record in records if "unigram_entropy" in record)
    steps = [record for record in records if "loss" in record]
    evals = [record for record in steps if record.get("eval_loss") is not None]
    final = output_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    samples = greedy_samples(model, AutoTokenizer.from_pretrained(final, trust_remote_code=True))
    return {
        "benchmark": "first_run",
        "steps": steps[-1]["step"],
        "tokens_seen": steps[-1]["tokens_seen"],
        "final_eval_loss": evals[-1]["eval_loss"],
        "unigram_entropy": unigram,
        "nats_below_unigram": unigram - evals[-1]["eval_loss"],
        "target_nats_below_unigram": 1.0,
        "training_seconds": sum(record.get("step_time", 0.0) for record in steps),
        "wall_seconds": wall_seconds,
        "eval_curve": [[record["step"], record["eval_loss"]] for record in evals],
        "samples": samples,
    }


def plot(output_dir: Path, png: Path) -> None:
    """Training and held-out loss against the unigram reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    unigram = next(record["unigram_entropy"] for record in records if "unigram_entropy" in record)
    steps = [record for record in records if "loss" in record and record["loss"] is not None]
    evals = [record for record in steps if record.get("eval_loss") is not None]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="#93c5fd", label="training loss")
    axes.plot(
        [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#1d4ed8", label="held-out loss"
    )
    axes.axhline(unigram, color="#f97316", linestyle="--", label=f"unigram entropy {unigram:.2f}")
    axes.axhline(unigram - 1.0, color="#f97316", linestyle=":", label="1 nat below it (the target)")
    axes.set(xlabel="optimizer step", ylabel="nats per token", title="The default run (genesis-tiny, 2 CPU cores)")
    axes.legend()
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=None, help="Run folder (default: a temporary one).")
    parser.add_argument("--plot", type=Path, default=None, help="Also write the loss curve PNG here.")
    parser.add_argument("--summarize_only", action="store_true", help="Read an existing run in --output_dir.")
    args, recipe_flags = parser.parse_known_args()
    recipe_flags = [flag for flag in recipe_flags if flag != "--"]
    with tempfile.TemporaryDirectory(prefix="genesis-first-run-") as scratch:
        output_dir = args.output_dir or Path(scratch) / "run"
        wall = None if args.summarize_only else run_recipe(output_dir, recipe_flags)
        report = summarize(output_dir, wall)
        if args.plot:
            plot(output_dir, args.plot)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
