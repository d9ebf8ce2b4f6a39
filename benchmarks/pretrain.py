"""Pretraining speed against what a user would run instead, side by side; prints one JSON object.

Three ways to train the same model (a `--preset`, optionally with `--overrides`) on the same embedded corpus, tokenizer
(`default_tokenizer(vocab_size)`), sequence length, batch and optimizer (AdamW, cosine, the recipe's defaults):

- `recipe`: `recipes/pretrain.py` with its defaults (streaming loader, evaluation, checkpoints, metrics), only
  `--max_steps` and `--output_dir` changed; the run a user starts with `accelerate launch recipes/pretrain.py`;
- `trainer`: transformers' `Trainer` in the shape of its `run_clm.py` example: the corpus tokenized and cut into
  `seq_len` blocks with `datasets.map` before training, then `Trainer.train`;
- `recipe_cores_less_one`: the same with one core left out of torch's threads (`GENESIS_HF_CPU_THREADS`), the rule
  the recipe followed before, which kept a core for the data loader's tokenizing thread;
- `torch_loop`: a bare loop over batches made beforehand (forward, backward, clip, AdamW): the ceiling on this machine,
  so that each loop's overhead is a number.

Every run is a fresh process with the thread settings its tool chooses by itself; the kinds alternate order round by
round so that machine noise hits them alike. A run's speed is its median step: the wall time between consecutive
step ends (data waiting included), after `--skip` steps of warm-up. Printed per kind and size: the median over rounds
of tokens/s, and the ratios recipe/trainer (target >= 1.0) and recipe/torch_loop (the loop's overhead).

    .venv/bin/python benchmarks/pretrain.py [--rounds 3] [--steps 120] [--sizes tiny,5m]
    .venv/bin/python benchmarks/pretrain.py --busy    # the same while another program spins on one core
    .venv/bin/python benchmarks/pretrain.py --only checkpoint     # the checkpoint stall below

`--only checkpoint`: seconds the training loop is blocked by `CheckpointManager.save`, synchronous (the whole write)
and asynchronous (gather + copy to CPU memory; the background write is timed too), on a ~60M-parameter model.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("recipe", "recipe_cores_less_one", "trainer", "torch_loop")
# The sizes of issue 24's measurements: the default preset, and a ~5M-parameter override of it.
SIZES = {"tiny": {}, "5m": {"hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 704}}


# ---------------------------------------------------------------------------------------------------------------------
# One run (in its own process)


def _recipe_defaults():
    from genesis_hf.pretrain.config import PretrainArguments

    return PretrainArguments()


def _config(args):
    from genesis_hf import GenesisConfig

    defaults = _recipe_defaults()
    return GenesisConfig.from_preset(defaults.model_preset, **SIZES[args.size])


def _warmup(args) -> int:
    """The recipe's warmup, shortened for runs shorter than it (the recipe refuses warmup_steps > max_steps)."""
    return min(_recipe_defaults().warmup_steps, args.steps // 2)


def _blocks(config, seq_len: int):
    """The run_clm.py data: every document tokenized with an eos after it, concatenated, cut into `seq_len` blocks."""
    import datasets

    from genesis_hf.corpus import EMBEDDED_SOURCES, iter_documents
    from genesis_hf.tokenizer import default_tokenizer

    tokenizer = default_tokenizer(config.vocab_size)
    texts = [document for source in EMBEDDED_SOURCES for document in iter_documents(source)]
    dataset = datasets.Dataset.from_dict({"text": texts})

    def tokenize(examples):
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(examples["text"])["input_ids"]]}

    def group(examples):
        ids = [token for row in examples["input_ids"] for token in row]
        usable = len(ids) // seq_len * seq_len
        blocks = [ids[start : start + seq_len] for start in range(0, usable, seq_len)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"])
    return tokenized.map(group, batched=True, remove_columns=tokenized.column_names).with_format("torch")


def run_recipe(args, clock: list) -> None:
    sys.path.insert(0, str(REPO / "recipes"))
    import pretrain

    from genesis_hf.events import TrainingCallback

    class Clock(TrainingCallback):
        def on_step_end(self, step, record):
            clock.append(time.perf_counter())

    overrides = ["--model_overrides", json.dumps(SIZES[args.size])] if SIZES[args.size] else []
    with tempfile.TemporaryDirectory() as folder:
        argv = ["--output_dir", f"{folder}/run", "--max_steps", str(args.steps), "--disable_tqdm", "true", *overrides,
                "--warmup_steps", str(_warmup(args))]  # fmt: skip
        if pretrain.main(argv, callbacks=[Clock()]) != 0:
            raise SystemExit("recipes/pretrain.py failed")


def run_trainer(args, clock: list) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from genesis_hf import GenesisForCausalLM

    defaults = _recipe_defaults()
    config = _config(args)
    blocks = _blocks(config, defaults.seq_len)
    torch.manual_seed(defaults.seed)
    model = GenesisForCausalLM(config)

    class Clock(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            clock.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            output_dir=folder, max_steps=args.steps, per_device_train_batch_size=defaults.per_device_train_batch_size,
            learning_rate=defaults.learning_rate, lr_scheduler_type="cosine", warmup_steps=_warmup(args),
            weight_decay=defaults.weight_decay, adam_beta1=defaults.adam_beta1, adam_beta2=defaults.adam_beta2,
            max_grad_norm=defaults.max_grad_norm, logging_steps=defaults.logging_steps, save_strategy="no",
            report_to="none", disable_tqdm=True, seed=defaults.seed, use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        Trainer(model=model, args=training_args, train_dataset=blocks, callbacks=[Clock()]).train()


def run_torch_loop(args, clock: list) -> None:
    import torch

    from genesis_hf import GenesisForCausalLM

    defaults = _recipe_defaults()
    config = _config(args)
    blocks = _blocks(config, defaults.seq_len)["input_ids"]
    batch = defaults.per_device_train_batch_size
    batches = [blocks[start : start + batch] for start in range(0, len(blocks) - batch + 1, batch)]
    torch.manual_seed(defaults.seed)
    model = GenesisForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=defaults.learning_rate, betas=(0.9, 0.95))
    for step in range(args.steps):
        input_ids = batches[step % len(batches)]
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.append(time.perf_counter())


def child(args) -> None:
    import torch

    clock: list[float] = []
    runs = {"recipe": run_recipe, "recipe_cores_less_one": run_recipe, "trainer": run_trainer}
    runs.get(args.child, run_torch_loop)(args, clock)
    steps = [later - earlier for earlier, later in zip(clock, clock[1:])][args.skip :]
    tokens = _recipe_defaults().tokens_per_step
    result = {"median_step_seconds": statistics.median(steps), "tokens_per_second": tokens / statistics.median(steps),
              "steps_timed": len(steps), "torch_threads": torch.get_num_threads()}  # fmt: skip
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# Side by side


def side_by_side(args) -> dict:
    report = {"steps": args.steps, "skip": args.skip, "rounds": args.rounds, "busy": args.busy, "sizes": {}}
    for size in args.sizes.split(","):
        runs = {kind: [] for kind in KINDS}
        for round_index in range(args.rounds):
            order = KINDS if round_index % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                with tempfile.TemporaryDirectory() as folder:
                    result = Path(folder) / "result.json"
                    command = [sys.executable, __file__, "--child", kind, "--size", size, "--result", str(result),
                               "--steps", str(args.steps), "--skip", str(args.skip)]  # fmt: skip
                    env = dict(os.environ)
                    if kind == "recipe_cores_less_one":
                        env["GENESIS_HF_CPU_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - 1))
                    # --busy: another program spins on one core for the whole run (a shared machine).
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
                    try:
                        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
                    if done.returncode != 0:
                        raise SystemExit(f"{kind} ({size}) failed:\n{done.stderr[-3000:]}")
                    runs[kind].append(json.loads(result.read_text()))
        rates = {kind: statistics.median(run["tokens_per_second"] for run in runs[kind]) for kind in KINDS}
        report["sizes"][size] = {
            "overrides": SIZES[size],
            **{kind: {"tokens_per_second": round(rates[kind]), "rounds": [round(run["tokens_per_second"]) for run in
                      runs[kind]], "torch_threads": runs[kind][0]["torch_threads"],
                      "steps_timed": runs[kind][0]["steps_timed"]} for kind in KINDS},
            "ratio_recipe_over_trainer": round(rates["recipe"] / rates["trainer"], 3),
            "ratio_recipe_over_torch_loop": round(rates["recipe"] / rates["torch_loop"], 3),
            "ratio_recipe_cores_less_one_over_recipe": round(rates["recipe_cores_less_one"] / rates["recipe"], 3),
            "ratio_trainer_over_torch_loop": round(rates["trainer"] / rates["torch_loop"], 3),
        }  # fmt: skip
    return report


def checkpoint_stall(args) -> dict:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.pretrain.checkpoint import CheckpointManager, capture_rng_state

    torch.manual_seed(0)
    overrides = json.loads(args.checkpoint_overrides)
    config = GenesisConfig.from_preset("genesis-tiny", **overrides)
    model = GenesisForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, config.vocab_size, (1, 16))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()  # AdamW state exists, as in a real checkpoint
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|endoftext|>")
    result = {"parameters": sum(parameter.numel() for parameter in model.parameters()), "overrides": overrides}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("sync", "async"):
            manager = CheckpointManager(
                Path(folder) / mode, save_total_limit=1, milestone_steps=None, async_save=mode == "async",
                run_config={}, model_config=config, tokenizer=tokenizer,
            )  # fmt: skip
            stalls, writes = [], []
            for step in range(1, 4):
                state = {"step": step, "tokens_seen": 0, "loss": 0.0}
                rank_state = {"data_loader": {}, "rng": capture_rng_state()}
                start = time.perf_counter()
                manager.save(step, model, optimizer, state, rank_state)
                stalls.append(time.perf_counter() - start)
                manager.wait()  # the background write, if any, finishes here
                writes.append(time.perf_counter() - start)
            manager.close()
            size = sum(path.stat().st_size for path in (Path(folder) / mode).rglob("*") if path.is_file())
            result[mode] = {"loop_stall_seconds": statistics.median(stalls),
                            "save_to_visible_seconds": statistics.median(writes), "checkpoint_bytes": size}  # fmt: skip
    result["ratio_async_stall_over_sync_stall"] = (
        result["async"]["loop_stall_seconds"] / result["sync"]["loop_stall_seconds"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--busy", action="store_true", help="another program spins on one core during every run")
    parser.add_argument("--only", choices=("speed", "checkpoint"), default="speed")
    parser.add_argument(
        "--checkpoint-overrides",
        default='{"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12, '
        '"num_key_value_heads": 4, "vocab_size": 8192}',
        help="genesis-tiny overrides of the checkpoint benchmark's model (default ~60M parameters)",
    )
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import torch

    machine = {"cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "command": " ".join(["python", "benchmarks/pretrain.py", *sys.argv[1:]])}  # fmt: skip
    body = side_by_side(args) if args.only == "speed" else {"checkpoint": checkpoint_stall(args)}
    print(json.dumps({**machine, **body}, indent=2))


if __name__ == "__main__":
    main()
