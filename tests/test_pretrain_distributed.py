"""Two gloo processes launched for real with `accelerate launch`, under DDP and under FSDP2, plus the README's run.

The kill-and-resume test is the promise of the checkpoint design: a run killed in the middle of a save, then killed
again at a random step, then resumed with the same command, logs the same losses bit for bit as a run that was never
interrupted. FSDP2 runs the 2x RTX 4090 Accelerate config itself (`--mixed_precision no`; without CUDA the two
processes use gloo), so the wrapping, activation checkpointing and sharded checkpoints tested here are the GPU run's.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from genesis_hf.pretrain import checkpoint as ckpt
from genesis_hf.pretrain.reference import greedy_samples

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "pretrain.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
LAUNCH_CONFIGS = {
    "ddp": ["--config_file", str(REPO / "accelerate_configs" / "ddp-cpu.yaml")],
    "fsdp2": ["--config_file", str(REPO / "accelerate_configs" / "fsdp2-2x4090-pcie.yaml"), "--mixed_precision", "no"],
}
MAX_STEPS = 8
RUN_CONFIG = {
    "model_preset": "debug",
    "model_overrides": {"vocab_size": 512},
    "seq_len": 32,
    "per_device_train_batch_size": 2,
    "tokens_per_step": 256,  # 2 per device x 32 x 2 processes x 2 accumulation: exercises no_sync / gradient sync
    "max_steps": MAX_STEPS,
    "learning_rate": 1e-2,
    "min_learning_rate": 1e-3,
    "warmup_steps": 2,
    "save_steps": 2,
    "eval_steps": 4,
    "eval_batches": 3,  # odd on purpose: the ranks must still run the same number of forwards
    "per_device_eval_batch_size": 2,
    "logging_steps": 2,
    "save_total_limit": 2,
    "report_to": "none",
    "disable_tqdm": True,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(strategy: str, config: Path, fault: str | None = None) -> list[str]:
    # A fault is injected by the test helper genesis_hf.testing.faults, which runs the recipe with its subscriber.
    runner = ["-m", "genesis_hf.testing.faults"] if fault else []
    return [
        str(ACCELERATE), "launch", *LAUNCH_CONFIGS[strategy], "--main_process_port", str(free_port()),
        *runner, str(RECIPE), "--config", str(config),
    ]  # fmt: skip


class Launch:
    """One `accelerate launch` of the recipe in its own session (so the test can SIGKILL launcher and workers)."""

    def __init__(self, strategy: str, config: Path, env: dict, fault: str | None = None) -> None:
        env = dict(env, GENESIS_HF_FAULT=fault) if fault else env
        self.log_path = config.parent / f"launch-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                launch_command(strategy, config, fault), env=env, cwd=config.parent, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return returncode, self.log_path.read_text()


def read_metrics(output_dir: Path, offset: int = 0) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_bytes()[offset:].decode()
    records = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
    return [record for record in records if "event" not in record]  # a later launch's restart line is no step


def write_config(folder: Path, mixture: str, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(dict(RUN_CONFIG, mixture=mixture, output_dir=str(folder / "out"), **overrides)))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_killed_and_resumed_run_matches_the_uninterrupted_one_bit_for_bit(strategy, tmp_path, run_env, test_mixture):
    # The uninterrupted reference.
    reference_config = write_config(tmp_path / "reference", test_mixture)
    returncode, log = Launch(strategy, reference_config, run_env).finish()
    assert returncode == 0, log[-4000:]
    assert f"| {strategy}" in log and "on 2 process(es)" in log
    reference = {record["step"]: record for record in read_metrics(tmp_path / "reference" / "out")}
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))

    config = write_config(tmp_path / "interrupted", test_mixture)
    output_dir = tmp_path / "interrupted" / "out"
    # 1. Killed while saving step 4: every rank wrote its shards, the rename never happened.
    returncode, log = Launch(strategy, config, run_env, fault="kill_during_save:4").finish()
    assert returncode != 0
    staging = list((output_dir / "checkpoints").glob("step-0000004.tmp-*"))
    assert len(staging) == 1 and len(list((staging[0] / "model").glob("__*_0.distcp"))) == 2, log[-4000:]
    assert [info.step for info in ckpt.list_checkpoints(output_dir)] == [2]

    # 2. Resumed (from step 2), then SIGKILLed from outside at a random step.
    kill_step = random.Random(f"genesis-{strategy}").randint(5, MAX_STEPS - 1)
    offset = (output_dir / "metrics.jsonl").stat().st_size
    launch = Launch(strategy, config, run_env, fault=f"slow_step:1-{MAX_STEPS}")
    deadline = time.monotonic() + 240
    while not any(record["step"] >= kill_step for record in read_metrics(output_dir, offset)):
        assert launch.process.poll() is None, launch.finish()[1][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    launch.kill()
    assert not (output_dir / "final").exists()

    # 3. The same command again, to the end.
    returncode, log = Launch(strategy, config, run_env).finish()
    assert returncode == 0, log[-4000:]
    assert "Resumed from" in log

    records = read_metrics(output_dir)
    assert {record["step"] for record in records} == set(reference)
    replayed = len(records) - MAX_STEPS
    assert replayed >= 2, "the interruptions should have forced some steps to run twice"
    for record in records:  # every occurrence of a step, first run or replay, is the reference's
        expected = reference[record["step"]]
        for key in ("loss", "grad_norm", "lr", "tokens_seen", "eval_loss", "tokens_per_source"):
            assert record.get(key) == expected.get(key), (strategy, record["step"], key)

    # FSDP2 and DDP alike: each rank wrote its own shard, and all ranks' loader states are stored.
    newest = ckpt.list_checkpoints(output_dir)[-1]
    assert newest.step == MAX_STEPS and len(list((newest.path / "optimizer").glob("__*_0.distcp"))) == 2
    assert len(ckpt.read_trainer_state(newest.path)["data_loader_states"]) == 2
    assert [info.step for info in ckpt.list_checkpoints(output_dir)] == [6, 8]  # save_total_limit 2
    assert (output_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_on_every_rank_then_stop_the_run(tmp_path, run_env, test_mixture):
    """Rank 0's loss is NaN at step 3 (skipped by both ranks, training goes on) and at 6-8 (three in a row: stop).

    The skip decision is all-reduced; a rank deciding alone would hang DDP or let the replicas drift apart. Saves are
    asynchronous here, and no checkpoint is written right after a skipped step.
    """
    config = write_config(
        tmp_path / "run",
        test_mixture,
        async_save=True,
        save_steps=1,
        save_total_limit=None,
        max_consecutive_nonfinite=3,
    )
    output_dir = tmp_path / "run" / "out"
    returncode, log = Launch("ddp", config, run_env, fault="nonfinite_loss:3,nonfinite_loss:6-8").finish()
    assert returncode != 0
    assert "NonFiniteLossError: Stopping: 3 consecutive steps (up to step 8)" in log
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == list(range(1, 9))
    assert [record["skipped_steps"] for record in records] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert [record["loss"] is None for record in records] == [step in (3, 6, 7, 8) for step in range(1, 9)]
    assert [info.step for info in ckpt.list_checkpoints(output_dir)] == [1, 2, 4, 5]
    assert not list((output_dir / "checkpoints").glob("*.tmp-*"))
    state = ckpt.read_trainer_state(output_dir / "checkpoints" / "step-0000005")
    assert (state["optimizer_steps"], state["skipped_steps"]) == (4, 1)

    # The same run continues on one process: the data loader's position is global, DCP reshards the weights, and
    # tokens_per_step keeps the global batch (4 accumulation steps instead of 2).
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--config", str(config)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Resuming on 1 processes a checkpoint written by 2" in result.stderr
    assert "x 4 accumulation" in result.stderr
    resumed = read_metrics(output_dir)[8:]
    assert [record["step"] for record in resumed] == [6, 7, 8] and all(record["loss"] for record in resumed)
    assert ckpt.read_trainer_state(output_dir / "checkpoints" / "step-0000008")["world_size"] == 1


@pytest.mark.slow
def test_readme_command_trains_genesis_tiny_and_the_result_loads(tmp_path, run_env):
    """`accelerate launch recipes/pretrain.py` with no arguments, as the README runs it (here from a scratch copy of
    the working directory layout, so outputs/ lands in tmp)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    result = subprocess.run(
        [str(ACCELERATE), "launch", str(RECIPE)],
        env=run_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    output_dir = tmp_path / "outputs" / "genesis-tiny"
    records = read_metrics(output_dir)
    assert len(records) == 1300
    first = records[0]["loss"]
    assert first > 6.5, first  # ln(1024) = 6.93 at initialisation
    # The bar for the default run: the held-out loss ends at least 1 nat below the unigram entropy of the
    # held-out text (what word frequencies alone reach), logged by the run itself.
    all_records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    (reference,) = [record["unigram_entropy"] for record in all_records if record.get("event") == "reference"]
    last = records[-1]["eval_loss"]
    assert reference - last >= 1.0, (reference, last)
    assert "pretrain: 100%" in result.stderr  # the progress bar
    # The end of the run says how far below word frequencies the held-out loss went, samples, and the playground.
    assert "nats/token vs" in result.stdout and "it learned from context" in result.stdout
    assert "Sample (greedy) 'self.' ->" in result.stdout
    assert f"playground --runs {Path('outputs') / 'genesis-tiny'}" in result.stdout
    assert any((output_dir / "tensorboard").rglob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(output_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "final")
    # final/ loads as the model the run trained: its greedy samples are the ones the run printed from memory.
    samples = greedy_samples(model, tokenizer)
    for prompt, continuation in samples.items():
        assert f"Sample (greedy) {prompt!r} -> {continuation!r}" in result.stdout, (samples, result.stdout[-2000:])
    print(f"README run: {elapsed:.0f}s, loss {first:.2f}, held-out {last:.2f} vs unigram {reference:.2f}")
