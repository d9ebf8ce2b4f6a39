"""Small lm-eval runs during training (`--eval_tasks`, `--eval_limit`): pretraining logs each checkpoint's scores to
metrics.jsonl and TensorBoard, equal to `genesis-hf eval` on that checkpoint; SFT logs them through TRL's trainer; a
task name lm-eval does not know stops the run before training. The tasks are small local copies in the real formats
(`test_evaluate.write_local_benchmarks`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluate import write_local_benchmarks
from test_posttrain import run_recipe_in_process
from test_pretrain import RECIPE, recipe_main, write_config

from genesis_hf import cli
from genesis_hf.evaluate.during_training import flatten_results

TASKS = "piqa,arc_easy"
LIMIT = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-tasks")
    write_local_benchmarks(root / "data")
    assert cli.main(["eval_tasks", "--data_dir", str(root / "data"), "--output_dir", str(root / "tasks")]) == 0
    return root / "tasks"


def eval_records(metrics_path: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [record for record in records if record.get("event") == "eval"]


def genesis_eval_scores(model: Path, tasks_dir: Path, output: Path) -> dict[str, float]:
    argv = ["eval", str(model), "--tasks", TASKS, "--include_path", str(tasks_dir), "--limit", str(LIMIT)]
    assert cli.main(argv + ["--output_path", str(output), "--no_sanity_gate"]) in (0, 1)
    return flatten_results(json.loads(output.read_text()))


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return scalars


def test_pretraining_logs_each_checkpoints_scores_equal_to_genesis_hf_eval(tmp_path, run_env, test_mixture, tasks_dir):
    config = write_config(
        tmp_path / "run.yaml", test_mixture, output_dir=str(tmp_path / "run"), report_to="tensorboard"
    )
    flags = ["--eval_tasks", TASKS, "--eval_limit", str(LIMIT), "--eval_include_path", str(tasks_dir)]
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--config", str(config), *flags],
        env={**run_env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    records = eval_records(tmp_path / "run" / "metrics.jsonl")
    assert [record["step"] for record in records] == [2, 4]  # save_steps 2, max_steps 4
    board = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    for record in records:
        checkpoint = tmp_path / "run" / "checkpoints" / f"step-{record['step']:07d}"
        expected = genesis_eval_scores(checkpoint, tasks_dir, tmp_path / f"eval-{record['step']}.json")
        assert {"eval/piqa/acc", "eval/arc_easy/acc_norm"} <= set(expected)
        assert {key: value for key, value in record.items() if key.startswith("eval/")} == expected
        for key, value in expected.items():
            assert board[key][record["step"]] == pytest.approx(value, rel=1e-6)  # TensorBoard stores float32


def test_an_unknown_eval_task_stops_pretraining_before_it_starts(tmp_path, test_mixture, tasks_dir, capsys):
    config = write_config(tmp_path / "run.yaml", test_mixture, output_dir=str(tmp_path / "run"))
    flags = ["--eval_tasks", "piqa,no_such_task", "--eval_include_path", str(tasks_dir)]
    assert recipe_main(["--config", str(config), *flags]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Unknown task(s) no_such_task" in error and "piqa" not in error.split("Unknown task(s)")[1]
    assert not (tmp_path / "run").exists()


def test_sft_logs_each_checkpoints_scores_through_the_trainer(tmp_path, tasks_dir):
    from genesis_hf.testing import build_tiny_model_folder

    build_tiny_model_folder(tmp_path / "base", chat_tokens=False, metrics=False)
    out = tmp_path / "sft"
    argv = ["--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(out), "--max_steps", "2",
            "--max_length", "64", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true",
            "--eval_tasks", TASKS, "--eval_limit", str(LIMIT), "--eval_include_path", str(tasks_dir)]  # fmt: skip
    assert run_recipe_in_process("sft", argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in records if "eval/piqa/acc" in record]
    assert [record["step"] for record in evals] == [1, 2]
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval/piqa/acc" in entry] == [1]  # step 2's is logged after its save
    expected = genesis_eval_scores(out / "checkpoint-2", tasks_dir, tmp_path / "eval.json")
    assert {key: value for key, value in evals[-1].items() if key.startswith("eval/")} == expected
    assert "loss" not in evals[-1]  # the scores are their own record, not folded into a training log


def test_dpo_logs_each_checkpoints_scores_through_the_trainer(tmp_path, tasks_dir):
    from genesis_hf.testing import build_tiny_model_folder

    build_tiny_model_folder(tmp_path / "base", chat_tokens=False, metrics=False)
    out = tmp_path / "dpo"
    argv = ["--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(out), "--max_steps", "1",
            "--max_length", "64", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true",
            "--eval_tasks", "piqa", "--eval_limit", str(LIMIT), "--eval_include_path", str(tasks_dir)]  # fmt: skip
    assert run_recipe_in_process("dpo", argv) == 0
    evals = eval_records_of_trainer(out / "metrics.jsonl")
    assert [record["step"] for record in evals] == [1]
    output = tmp_path / "eval.json"
    argv = [
        "eval",
        str(out / "checkpoint-1"),
        "--tasks",
        "piqa",
        "--include_path",
        str(tasks_dir),
        "--limit",
        str(LIMIT),
    ]
    assert cli.main(argv + ["--output_path", str(output), "--no_sanity_gate"]) in (0, 1)
    expected = flatten_results(json.loads(output.read_text()))
    assert "eval/piqa/acc" in expected
    assert {key: value for key, value in evals[0].items() if key.startswith("eval/")} == expected


def eval_records_of_trainer(metrics_path: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [record for record in records if "eval/piqa/acc" in record]


def test_an_evaluation_leaves_the_random_generators_as_it_found_them(tmp_path, tasks_dir):
    import random

    import numpy as np

    from genesis_hf.evaluate.during_training import checkpoint_evaluator
    from genesis_hf.testing import build_tiny_model_folder

    build_tiny_model_folder(tmp_path / "model", metrics=False)
    evaluator = checkpoint_evaluator("piqa", eval_limit=LIMIT, eval_include_path=str(tasks_dir))
    draws = []
    for evaluate in (False, True):
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        if evaluate:
            assert "eval/piqa/acc" in evaluator(tmp_path / "model", 0)  # lm-eval seeds all three generators
        draws.append((torch.rand(3).tolist(), random.random(), np.random.rand()))
    assert draws[0] == draws[1]


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_refuses_eval_tasks_with_lora_before_loading_anything(recipe, tmp_path, capsys):
    argv = ["--model_name_or_path", str(tmp_path / "never-loaded"), "--output_dir", str(tmp_path / recipe),
            "--use_peft", "true", "--eval_tasks", "piqa"]  # fmt: skip
    assert run_recipe_in_process(recipe, argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--eval_tasks piqa with --use_peft true" in error and "genesis-hf eval" in error
    assert not (tmp_path / recipe).exists()
