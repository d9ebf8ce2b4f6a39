"""Pretraining engine on one CPU process: bad input stops before training, checkpoints are complete or invisible,
resume checks the AdamW state, extensions keep the LR continuous, non-finite steps are skipped and then stop the run.

Runs go through `recipes/pretrain.py` in a subprocess, as a user launches it; a tiny `debug` model (vocab 512, seq 32)
keeps each run to seconds. Multi-process runs (DDP, FSDP2, kill and resume) are in `test_pretrain_distributed.py`.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from genesis_hf.args import ConfigError
from genesis_hf.pretrain import checkpoint as ckpt
from genesis_hf.pretrain.config import PretrainArguments, resolve_gradient_accumulation

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "pretrain.py"

DEBUG_CONFIG = {
    "model_preset": "debug",
    "model_overrides": {"vocab_size": 512},
    "seq_len": 32,
    "per_device_train_batch_size": 2,
    "tokens_per_step": 128,  # two micro-batches of 2 x 32 on one process
    "max_steps": 4,
    "learning_rate": 1e-2,
    "min_learning_rate": 1e-3,
    "warmup_steps": 1,
    "save_steps": 2,
    "eval_steps": 2,
    "eval_batches": 2,
    "per_device_eval_batch_size": 2,
    "logging_steps": 2,
    "save_total_limit": None,
    "report_to": "none",
    "disable_tqdm": True,
}


def write_config(path: Path, mixture: str, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**DEBUG_CONFIG, "mixture": mixture, **overrides}))
    return path


def recipe_main(argv: list[str]) -> int:
    """`recipes/pretrain.py`'s `main` in this process (for runs that must fail before training: no launch cost)."""
    import importlib.util

    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location("pretrain_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    try:
        return recipe.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def run_recipe(env: dict, config: Path, *flags: str, fault: str | None = None) -> subprocess.CompletedProcess:
    # A fault is injected by the test helper genesis_hf.testing.faults, which runs the recipe with its subscriber.
    env = dict(env, GENESIS_HF_FAULT=fault) if fault else env
    runner = ["-m", "genesis_hf.testing.faults"] if fault else []
    return subprocess.run(
        [sys.executable, *runner, str(RECIPE), "--config", str(config), *flags],
        env=env,
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_metrics(output_dir: Path) -> list[dict]:
    """The step records of metrics.jsonl (without the `"event": "restart"` line each later launch writes)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "event" not in record]


def steps_of(output_dir: Path) -> list[int]:
    return [info.step for info in ckpt.list_checkpoints(output_dir)]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory, run_env, test_mixture) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests copy it before changing anything)."""
    folder = tmp_path_factory.mktemp("debug-run")
    config = write_config(folder / "run.yaml", test_mixture, output_dir=str(folder / "out"))
    result = run_recipe(run_env, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


def copy_run(debug_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the debug run's output directory and a config that points at it."""
    output_dir = tmp_path / "out"
    shutil.copytree(debug_run, output_dir)
    values = yaml.safe_load((debug_run.parent / "run.yaml").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(dict(values, output_dir=str(output_dir))))
    return output_dir, config


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_gradient_accumulation_keeps_the_global_batch_for_any_world_size():
    for world_size, accumulation in ((1, 64), (2, 32), (8, 8)):
        args = PretrainArguments(per_device_train_batch_size=4, seq_len=2048, tokens_per_step=524_288, warmup_steps=0)
        assert resolve_gradient_accumulation(args, world_size) == accumulation


def test_impossible_batch_geometry_names_the_numbers_and_a_fix():
    args = PretrainArguments(per_device_train_batch_size=4, seq_len=2048, tokens_per_step=524_288, warmup_steps=0)
    with pytest.raises(
        ConfigError, match=r"524,288 is not a multiple of .* \(4\) x seq_len \(2048\) x world_size \(3\)"
    ):
        resolve_gradient_accumulation(args, 3)
    explicit = PretrainArguments(
        per_device_train_batch_size=4, seq_len=2048, tokens_per_step=524_288, gradient_accumulation_steps=8
    )
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 disagrees .* needs 32"):
        resolve_gradient_accumulation(explicit, 2)


def test_shipped_configs_parse_and_the_1b_config_is_the_seed_run():
    from genesis_hf.args import parse_args

    (tiny,) = parse_args((PretrainArguments,), ["--config", str(REPO / "recipes/configs/pretrain/genesis-tiny.yaml")])
    assert tiny == PretrainArguments()  # the YAML spells out the dataclass defaults
    (big,) = parse_args((PretrainArguments,), ["--config", str(REPO / "recipes/configs/pretrain/genesis-1b.yaml")])
    assert (big.per_device_train_batch_size, big.seq_len, big.tokens_per_step) == (4, 2048, 524_288)
    assert resolve_gradient_accumulation(big, 2) == 32
    assert (big.learning_rate, big.min_learning_rate, big.warmup_steps, big.max_steps) == (1e-4, 1e-5, 1000, 40_000)
    assert (big.adam_beta1, big.adam_beta2, big.weight_decay, big.bf16, big.save_minutes) == (0.9, 0.95, 0.1, True, 10)
    assert big.gradient_checkpointing and big.mixture == "genesis-1b" and big.model_preset == "genesis-1b"


def test_accelerate_accepts_every_config(tmp_path):
    """`accelerate launch --config_file X` parses each YAML; a tiny script reports what each process got."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os\nprint('PROBE', os.environ.get('ACCELERATE_USE_FSDP'), os.environ.get('FSDP_VERSION'))\n"
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    from accelerate.commands.config.config_args import load_config_from_file

    for config in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        parsed = load_config_from_file(str(config))
        text = config.read_text()
        assert text.startswith("#"), f"{config.name} must open with a comment naming its hardware"
        for forbidden in ("learning_rate", "max_steps", "batch_size"):
            assert forbidden not in yaml.safe_load(text), f"{config.name} carries a hyperparameter"
        if parsed.distributed_type.value == "FSDP":
            fsdp = parsed.fsdp_config
            assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
            assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
            assert fsdp["fsdp_activation_checkpointing"] and fsdp["fsdp_reshard_after_forward"]
    # Launching for real: the DDP config and the 2x4090 FSDP2 config (on CPU: two gloo processes).
    for name, extra in (("ddp-cpu.yaml", []), ("fsdp2-2x4090-pcie.yaml", ["--mixed_precision", "no"])):
        result = subprocess.run(
            [
                str(accelerate),
                "launch",
                "--config_file",
                str(REPO / "accelerate_configs" / name),
                *extra,
                "--main_process_port",
                str(_free_port()),
                str(script),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("PROBE") == 2, result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_consumer_gpu_env_policy(monkeypatch):
    from genesis_hf.pretrain import distributed

    for key in distributed.CONSUMER_GPU_ENV:
        monkeypatch.setenv(key, "placeholder")  # so that monkeypatch restores the original state afterwards
        monkeypatch.delenv(key)
    monkeypatch.setattr(distributed, "gpu_names", lambda: ["NVIDIA A100-SXM4-80GB"] * 2)
    monkeypatch.setattr(distributed, "has_active_nvlink", lambda: False)
    assert distributed.configure_consumer_gpu_env("auto") == {}
    monkeypatch.setattr(distributed, "gpu_names", lambda: ["NVIDIA GeForce RTX 4090"] * 2)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.8")  # the user's own value wins
    assert distributed.configure_consumer_gpu_env("auto") == {"NCCL_P2P_DISABLE": "1"}
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.8"
    monkeypatch.delenv("NCCL_P2P_DISABLE")
    monkeypatch.setattr(distributed, "has_active_nvlink", lambda: True)
    assert distributed.configure_consumer_gpu_env("auto") == {}
    assert distributed.configure_consumer_gpu_env("off") == {}
    assert distributed.configure_consumer_gpu_env("on") == {"NCCL_P2P_DISABLE": "1"}


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything trains


def test_unknown_config_key_is_rejected_by_the_recipe(tmp_path, test_mixture, capsys):
    config = write_config(tmp_path / "run.yaml", test_mixture, output_dir=str(tmp_path / "out"), learning_rte=1e-3)
    assert recipe_main(["--config", str(config)]) == 1
    stderr = capsys.readouterr().err
    assert "'learning_rte' (did you mean 'learning_rate'?)" in stderr
    assert "tokens_per_step" in stderr  # the valid keys are listed
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_model_vocab_is_rejected(tmp_path, debug_run, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(debug_run / "final")  # 512 tokens
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    output_dir, config = copy_run(debug_run, tmp_path)
    shutil.rmtree(output_dir)
    assert recipe_main(["--config", str(config), "--tokenizer_name_or_path", str(tmp_path / "tokenizer")]) == 1
    stderr = capsys.readouterr().err
    assert "has 514 tokens but the model's vocab_size is 512" in stderr
    assert '"vocab_size": 514' in stderr  # the fix
    assert not (output_dir / "metrics.jsonl").exists()


def test_output_dir_of_another_model_is_rejected(tmp_path, debug_run, capsys):
    output_dir, config = copy_run(debug_run, tmp_path)
    assert recipe_main(["--config", str(config), "--model_overrides", '{"vocab_size": 512, "hidden_size": 64}']) == 1
    stderr = capsys.readouterr().err
    assert "holds checkpoints of a different model" in stderr
    assert "hidden_size: checkpoint 32 vs this run 64" in stderr
    assert "new --output_dir" in stderr
    assert steps_of(output_dir) == [2, 4]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_layout_and_contract(debug_run):
    infos = ckpt.list_checkpoints(debug_run)
    assert [info.step for info in infos] == [2, 4]
    newest = infos[-1]
    assert newest.path.name == "step-0000004" and newest.tokens_seen == 4 * 128
    assert newest.loss == read_metrics(debug_run)[3]["loss"]
    for name in (
        "trainer_state.json",
        "rng_states.json",
        "run_config.yaml",
        "config.json",
        "tokenizer",
        "model",
        "optimizer",
    ):
        assert (newest.path / name).exists(), name
    state = ckpt.read_trainer_state(newest.path)
    assert state["step"] == 4 and state["optimizer_steps"] == 4 and state["world_size"] == 1
    assert len(state["data_loader_states"]) == 1 and state["scheduler"]["last_epoch"] == 4
    assert yaml.safe_load((newest.path / "run_config.yaml").read_text())["gradient_accumulation_steps"] == 2


def test_load_model_from_checkpoint_without_a_process_group_matches_final(debug_run):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    assert not dist.is_initialized()
    model, tokenizer, state = ckpt.load_model_from_checkpoint(debug_run / "checkpoints" / "step-0000004")
    final = AutoModelForCausalLM.from_pretrained(debug_run / "final")
    assert state["step"] == 4 and len(tokenizer) == 512
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, final(ids).logits, rtol=0, atol=0)


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path, debug_run):
    output_dir, _ = copy_run(debug_run, tmp_path)
    root = output_dir / "checkpoints"
    # An interrupted save: complete-looking contents, but never renamed.
    shutil.copytree(root / "step-0000004", root / "step-0000006.tmp-deadbeef")
    assert steps_of(output_dir) == [2, 4]
    # A visible checkpoint whose shard lost its tail.
    shard = next((root / "step-0000004" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    choice, warnings = ckpt.select_checkpoint(output_dir)
    assert choice.step == 2
    assert "step-0000004" in warnings[0] and "truncated" in warnings[0]
    # Nothing intact at all is an error, not a silent fresh start.
    (root / "step-0000002" / "model" / ".metadata").unlink()
    with pytest.raises(ckpt.CheckpointError, match="None of the 2 checkpoints .* is intact"):
        ckpt.select_checkpoint(output_dir)


@pytest.mark.slow
def test_resume_falls_back_from_a_truncated_checkpoint_and_replays_the_same_losses(tmp_path, run_env, debug_run):
    output_dir, config = copy_run(debug_run, tmp_path)
    shard = next((output_dir / "checkpoints" / "step-0000004" / "optimizer").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (output_dir / "final").rename(output_dir / "final-before")
    result = run_recipe(run_env, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipping checkpoint" in result.stderr and "Resumed from" in result.stderr
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 3, 4]
    assert records[4:] == [
        dict(r, step_time=n["step_time"], tokens_per_second=n["tokens_per_second"])
        for r, n in zip(records[2:4], records[4:])
    ]
    assert (output_dir / "final" / "config.json").is_file()


def test_async_save_is_published_only_once_its_shards_and_checksums_are_written(tmp_path, monkeypatch):
    """`dcp.async_save` in one process, its shard writes held back: training goes on, nothing is visible (a kill now
    resumes from the previous checkpoint), and once released `poll` publishes the weights of the step that was saved."""
    import threading

    from tokenizers import Tokenizer, models
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter
    from transformers import PreTrainedTokenizerFast

    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.events import Events, TrainingCallback

    class Recorder(TrainingCallback):
        def __init__(self) -> None:
            self.calls = []

        def on_checkpoint_staged(self, staging_dir: Path, step: int) -> None:
            # What a subscriber (and the fault injector's kill) sees just before the rename: a complete checkpoint.
            self.calls.append(("staged", step, ckpt.validate_checkpoint(staging_dir, checksums=True, resumable=True)))

        def on_checkpoint_saved(self, checkpoint_dir: Path, step: int) -> None:
            self.calls.append(("saved", step, checkpoint_dir.name))

    torch.manual_seed(0)
    config = GenesisConfig.from_preset("debug", vocab_size=99)
    model = GenesisForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recorder = Recorder()
    manager = ckpt.CheckpointManager(
        tmp_path, save_total_limit=None, milestone_steps=None, async_save=True, events=Events([recorder]),
        run_config={}, model_config=config,
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|endoftext|>"),
    )  # fmt: skip

    def train_and_save(step: int | None) -> None:
        input_ids = torch.randint(0, config.vocab_size, (1, 8))
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step is not None:
            state = {"step": step, "optimizer_steps": step, "tokens_seen": 8 * step, "loss": 1.0, "scheduler": {}}
            manager.save(step, model, optimizer, state, {"data_loader": {}, "rng": ckpt.capture_rng_state()})

    train_and_save(1)
    manager.wait()
    assert steps_of(tmp_path) == [1]

    release = threading.Event()
    write_data = _FileSystemWriter.write_data

    def held_write_data(self, *args, **kwargs):
        assert release.wait(timeout=60)
        return write_data(self, *args, **kwargs)

    monkeypatch.setattr(_FileSystemWriter, "write_data", held_write_data)
    train_and_save(2)
    saved = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    train_and_save(None)  # the live weights move on; the checkpoint must hold step 2's
    manager.poll()
    (staging,) = (tmp_path / "checkpoints").glob("step-0000002.tmp-*")
    assert not list(staging.glob("*/*.distcp")) and not (staging / "checksums.json").exists()
    assert steps_of(tmp_path) == [1] and ckpt.select_checkpoint(tmp_path)[0].step == 1

    release.set()
    deadline = time.monotonic() + 60
    while manager.pending is not None:  # the training loop's once-per-step call publishes the finished save
        assert time.monotonic() < deadline
        manager.poll()
        time.sleep(0.01)
    manager.close()
    assert recorder.calls == [
        ("staged", 1, None), ("saved", 1, "step-0000001"), ("staged", 2, None), ("saved", 2, "step-0000002"),
    ]  # fmt: skip
    newest = tmp_path / "checkpoints" / "step-0000002"
    shards = {file.relative_to(newest).as_posix() for file in newest.glob("*/*") if file.parent.name != "tokenizer"}
    assert set(json.loads((newest / "checksums.json").read_text())["crc32"]) == shards
    restored, _, _ = ckpt.load_model_from_checkpoint(newest)
    for name, parameter in restored.named_parameters():
        torch.testing.assert_close(parameter, saved[name], rtol=0, atol=0)


@pytest.mark.slow
def test_a_run_killed_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path, run_env, debug_run):
    output_dir, config = copy_run(debug_run, tmp_path)
    shutil.rmtree(output_dir / "checkpoints" / "step-0000004")
    shutil.rmtree(output_dir / "final")
    # Resumed from step 2, killed at the end of step 4's async save: written and checksummed, never renamed.
    result = run_recipe(run_env, config, "--async_save", "true", fault="kill_during_save:4")
    assert result.returncode != 0 and "killing this process at step 4" in result.stderr, result.stderr[-3000:]
    (staging,) = (output_dir / "checkpoints").glob("step-0000004.tmp-*")
    assert (staging / "checksums.json").is_file() and steps_of(output_dir) == [2]

    result = run_recipe(run_env, config, "--async_save", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr and "step-0000002" in result.stderr
    records = read_metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 3, 4, 3, 4]
    for replayed in (records[4:6], records[6:8]):
        assert replayed == [
            dict(r, step_time=n["step_time"], tokens_per_second=n["tokens_per_second"])
            for r, n in zip(records[2:4], replayed)
        ]
    assert steps_of(output_dir) == [2, 4] and (output_dir / "final" / "config.json").is_file()
    assert not list((output_dir / "checkpoints").glob("*.tmp-*"))


def test_optimizer_state_is_checked(tmp_path, debug_run):
    """`load_training_checkpoint` in one process: present and consistent AdamW state loads; missing or stale fails."""
    from genesis_hf.pretrain.trainer import build_model, build_model_config, build_optimizer

    output_dir, _ = copy_run(debug_run, tmp_path)
    path = output_dir / "checkpoints" / "step-0000004"
    args = PretrainArguments(**{**DEBUG_CONFIG, "model_overrides": {"vocab_size": 512}})

    def fresh():
        model = build_model(build_model_config(args), seed=0)
        return model, build_optimizer(model, args)

    model, optimizer = fresh()
    result = ckpt.load_training_checkpoint(path, model, optimizer, allow_fresh_optimizer=False)
    assert not result.fresh_optimizer
    assert all(float(state["step"]) == 4 for state in optimizer.state.values())
    assert len(optimizer.state) == len(list(model.parameters()))

    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps(dict(state, optimizer_steps=3)))
    with pytest.raises(ckpt.OptimizerStateError, match=r"step counts \[4.0\] differ from the 3"):
        ckpt.load_training_checkpoint(path, *fresh(), allow_fresh_optimizer=False)

    shutil.rmtree(path / "optimizer")
    older = ckpt.list_checkpoints(output_dir)[:-1]
    with pytest.raises(ckpt.OptimizerStateError) as error:
        ckpt.load_training_checkpoint(path, *fresh(), allow_fresh_optimizer=False, older_checkpoints=older)
    message = str(error.value)
    assert "holds no optimizer state" in message and "~50 steps" in message
    assert "--allow_fresh_optimizer true" in message and "step-0000002" in message
    model, optimizer = fresh()
    result = ckpt.load_training_checkpoint(path, model, optimizer, allow_fresh_optimizer=True)
    assert result.fresh_optimizer and not optimizer.state


@pytest.mark.slow
def test_resume_without_optimizer_state_fails_unless_allowed(tmp_path, run_env, debug_run):
    output_dir, config = copy_run(debug_run, tmp_path)
    shutil.rmtree(output_dir / "checkpoints" / "step-0000004" / "optimizer")
    result = run_recipe(run_env, config, "--max_steps", "6")
    assert result.returncode == 1
    assert "OptimizerStateError" in result.stderr and "AdamW state is missing" in result.stderr
    assert "--allow_fresh_optimizer true" in result.stderr
    assert [record["step"] for record in read_metrics(output_dir)] == [1, 2, 3, 4]  # nothing trained

    result = run_recipe(run_env, config, "--max_steps", "6", "--allow_fresh_optimizer", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESUMING STEP 4 WITH A FRESH ADAMW STATE" in result.stderr
    resumed = read_metrics(output_dir)[4:]
    assert [record["step"] for record in resumed] == [5, 6]
    assert all(record["fresh_optimizer"] for record in resumed)
    assert ckpt.read_trainer_state(output_dir / "checkpoints" / "step-0000006")["fresh_optimizer_steps"] == [4]


@pytest.mark.slow
def test_extending_max_steps_keeps_the_learning_rate_continuous(tmp_path, run_env, debug_run):
    output_dir, config = copy_run(debug_run, tmp_path)
    # Also the wall-clock cadence: with save_minutes ~0, rank 0's clock asks for a checkpoint after every step.
    result = run_recipe(run_env, config, "--max_steps", "8", "--save_steps", "100", "--save_minutes", "1e-6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps changed on resume: 4 -> 8 at step 4" in result.stderr
    lrs = {record["step"]: record["lr"] for record in read_metrics(output_dir)}
    assert sorted(lrs) == list(range(1, 9))
    # The original schedule: warmup to 1e-2 at step 2, cosine down to 1e-3; its largest change in one step:
    normal_change = max(abs(lrs[step + 1] - lrs[step]) for step in (2, 3))
    assert abs(lrs[5] - lrs[4]) <= normal_change * (1 + 1e-9)
    # The run had finished its decay, so the extension continues at min_learning_rate: no jump, never upwards.
    assert [lrs[step] for step in range(5, 9)] == [DEBUG_CONFIG["min_learning_rate"]] * 4
    assert steps_of(output_dir) == [2, 4, 5, 6, 7, 8]


@pytest.mark.slow
def test_extending_in_the_middle_of_the_decay_stretches_it(tmp_path, run_env, debug_run):
    """Resume from step 2 (mid-cosine) with max_steps 8: the decay restarts from the current LR over the new horizon."""
    output_dir, config = copy_run(debug_run, tmp_path)
    shutil.rmtree(output_dir / "checkpoints" / "step-0000004")
    result = run_recipe(run_env, config, "--max_steps", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps changed on resume: 4 -> 8 at step 2" in result.stderr
    before = {record["step"]: record["lr"] for record in read_metrics(debug_run)}
    after = {record["step"]: record["lr"] for record in read_metrics(output_dir)[4:]}
    assert after[3] == before[3]  # the first LR after the resume is the one the old schedule gave at that step
    decay = [after[step] for step in range(3, 9)]
    assert decay == sorted(decay, reverse=True) and decay[-1] > DEBUG_CONFIG["min_learning_rate"]
    steps = [after[step] - after[step + 1] for step in range(3, 8)]
    assert max(steps) < before[3] - before[4]  # a slower decay than the original one


# ---------------------------------------------------------------------------------------------------------------------
# The unigram reference


def test_unigram_entropy_equals_an_independent_count():
    import math
    from collections import Counter

    from genesis_hf.pretrain.reference import unigram_entropy

    batches = [
        {"labels": torch.tensor([[1, 2, 2, 3], [4, -100, 4, 4]])},
        {"labels": torch.tensor([[9, 5, 5, 700]])},
    ]
    # The shifted loss predicts each row's tokens after the first; -100 is not predicted.
    targets = Counter([2, 2, 3, 4, 4, 5, 5, 700])
    total = sum(targets.values())
    expected = -sum(count / total * math.log(count / total) for count in targets.values())
    assert unigram_entropy(batches) == pytest.approx(expected, abs=1e-12)


def test_the_run_logs_the_unigram_reference_once(debug_run, test_mixture):
    from transformers import AutoTokenizer

    from genesis_hf.pretrain.reference import held_out_unigram_entropy

    records = [json.loads(line) for line in (debug_run / "metrics.jsonl").read_text().splitlines()]
    references = [record for record in records if record.get("event") == "reference"]
    assert len(references) == 1 and records[0] == references[0]
    tokenizer = AutoTokenizer.from_pretrained(debug_run / "final")
    expected = held_out_unigram_entropy(test_mixture, tokenizer, seq_len=DEBUG_CONFIG["seq_len"])
    assert references[0]["unigram_entropy"] == pytest.approx(expected, rel=1e-12)


def test_first_run_benchmark_reports_the_margin_and_plots_it(debug_run, tmp_path):
    """benchmarks/first_run.py on a finished run (`--summarize_only`: the README run itself is timed by the benchmark,
    not by a test): the margin below the unigram reference, samples, and the loss-curve PNG."""
    from PIL import Image

    png = tmp_path / "curve.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "first_run.py"), "--summarize_only"]
        + ["--output_dir", str(debug_run), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    records = [json.loads(line) for line in (debug_run / "metrics.jsonl").read_text().splitlines()]
    evals = [record["eval_loss"] for record in records if record.get("eval_loss") is not None]
    assert report["final_eval_loss"] == evals[-1] and report["steps"] == DEBUG_CONFIG["max_steps"]
    assert report["nats_below_unigram"] == pytest.approx(report["unigram_entropy"] - evals[-1])
    assert set(report["samples"]) == {"The", "self."}
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300


def test_cpu_threads_give_way_to_another_program_and_come_back():
    """A real program spinning on one core: the governor measures it and takes one thread from torch; once it stops,
    the thread comes back. (OpenMP threads that share a core with another program stall every matmul.)"""
    from genesis_hf.pretrain.distributed import CpuThreadGovernor

    cores = len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    governor = CpuThreadGovernor(share=cores, interval=0.0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        governor.others_load()  # from here on the busy loop runs the whole interval
        time.sleep(2.0)
        governor.on_step_end(1, {})
        loaded, threads_loaded = governor.load, governor.threads
        assert loaded >= 0.8 and threads_loaded == torch.get_num_threads() <= max(1, cores - 1), (loaded, cores)
        busy.kill()
        busy.wait()
        governor.others_load()
        time.sleep(2.0)
        governor.on_step_end(2, {})
        assert governor.load <= loaded - 0.7 and governor.threads >= threads_loaded
        if governor.load < 0.25:  # nothing else ran meanwhile: every core is torch's again
            assert governor.threads == cores == torch.get_num_threads()
    finally:
        busy.kill()
        torch.set_num_threads(previous)
