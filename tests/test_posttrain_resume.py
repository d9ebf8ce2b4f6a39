"""SFT and DPO keep pretraining's promises: a killed run relaunched with the same command resumes from its newest
complete `checkpoint-N` and ends with the weights of an uninterrupted run; finished results are never replaced by a
launch with other settings; a checkpoint's pickles must hold tensors only.

Runs go through the recipes as a user launches them: in a subprocess (killed by `genesis_hf.testing.faults`) when
they train, in this process when they must stop before anything loads.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_posttrain import run_recipe_in_process, write_jsonl

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from genesis_hf.testing import build_tiny_model_folder

    folder = tmp_path_factory.mktemp("resume") / "base"
    build_tiny_model_folder(folder, chat_tokens=False, metrics=False)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("resume-data")
    conversations = [
        [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]
        for i in range(24)
    ]
    pairs = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {i}, who knows."}
        for i in range(24)
    ]
    return {
        "sft": write_jsonl(folder / "sft.jsonl", [{"messages": messages} for messages in conversations]),
        "dpo": write_jsonl(folder / "dpo.jsonl", pairs),
    }


def recipe_flags(kind: str, base_dir: Path, data: dict[str, Path], output_dir: Path) -> list[str]:
    return ["--model_name_or_path", str(base_dir), "--dataset_name", str(data[kind]), "--output_dir", str(output_dir),
            "--max_steps", "6", "--learning_rate", "1e-2", "--lr_scheduler_type", "cosine", "--warmup_steps", "1",
            "--max_length", "64", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps",
            "2", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "7"]  # fmt: skip


def run_recipe(kind: str, flags: list[str], run_env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    # One thread: the uninterrupted run and the resumed one must do the same float operations in the same order.
    env = dict(run_env, OMP_NUM_THREADS="1")
    if fault:
        env["GENESIS_HF_FAULT"] = fault
    runner = ["-m", "genesis_hf.testing.faults"] if fault else []
    return subprocess.run(
        [sys.executable, *runner, str(REPO / "recipes" / f"{kind}.py"), *flags],
        env=env, cwd=REPO.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(base_dir, data, tmp_path_factory, run_env) -> dict[str, Path]:
    """An uninterrupted 6-step run of each recipe, checkpoints at 2, 4 and 6: the reference, and a finished folder."""
    runs = {}
    for kind in ("sft", "dpo"):
        output_dir = tmp_path_factory.mktemp(f"finished-{kind}") / "run"
        result = run_recipe(kind, recipe_flags(kind, base_dir, data, output_dir), run_env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[kind] = output_dir
    return runs


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_killed_run_resumes_from_its_newest_complete_checkpoint_and_ends_like_an_uninterrupted_one(
    kind, base_dir, data, finished, tmp_path, run_env
):
    output_dir = tmp_path / "run"
    flags = recipe_flags(kind, base_dir, data, output_dir)
    # Killed once checkpoint-4 is written; its trainer_state.json (the Trainer writes it last) then cut in half: the
    # state of a run killed while saving step 4.
    killed = run_recipe(kind, flags, run_env, fault="kill_after_save:4")
    assert killed.returncode != 0 and "killing this process at step 4" in killed.stderr, killed.stderr[-3000:]
    state = output_dir / "checkpoint-4" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert [record["step"] for record in metrics(output_dir)] == [1, 2, 3, 4]
    kept = snapshot(output_dir / "checkpoint-2")

    resumed = run_recipe(kind, flags, run_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping" in resumed.stderr and "checkpoint-4" in resumed.stderr and "does not parse" in resumed.stderr
    assert "Resuming from" in resumed.stderr and "checkpoint-2 (step 2)" in resumed.stderr
    assert snapshot(output_dir / "checkpoint-2") == kept  # never rewritten
    # Written again, complete, when the resumed run got there.
    assert json.loads(state.read_text())["global_step"] == 4

    records = metrics(output_dir)
    restart = [record for record in records if record.get("event") == "restart"]
    assert len(restart) == 1 and restart[0]["step"] == 2 and restart[0]["dropped_records"] == 2
    assert restart[0]["resumed_from"].endswith("checkpoint-2")
    steps = [record["step"] for record in records if "event" not in record and "loss" in record]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once: the killed launch's steps 3 and 4 are gone
    reference = [record for record in metrics(finished[kind]) if "loss" in record]
    losses = [record["loss"] for record in records if "event" not in record and "loss" in record]
    assert losses == [record["loss"] for record in reference]

    expected, got = final_weights(finished[kind]), final_weights(output_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_before_anything_loads(
    base_dir, data, finished, tmp_path, capsys
):
    output_dir = tmp_path / "run"
    shutil.copytree(finished["sft"], output_dir)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"python": Payload()}, output_dir / "checkpoint-6" / "rng_state.pth")
    before = snapshot(output_dir)
    # The same command: the checkpoint is chosen, and refused before the data or the model are read.
    assert run_recipe_in_process("sft", recipe_flags("sft", base_dir, data, output_dir)) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoint-6/rng_state.pth holds objects other than tensors" in error[0], error
    assert not marker.exists() and snapshot(output_dir) == before


class MarkerPayload:
    """Unpickling it creates `path` (`open(path, "w")`): what a planted pickle could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fsdp_checkpoint(output_dir: Path, step: int, plant: tuple[str, Path] | None = None) -> Path:
    """A `checkpoint-N` as an FSDP run leaves it (no training: the folders are built directly): the trainer state and
    the DCP folders Accelerate's sharded save writes, `pytorch_model_fsdp_0/` (`{"model": model state}`) and
    `optimizer_0/` (`{"optimizer": get_optimizer_state_dict(...)}`) of an AdamW with the Trainer's two parameter
    groups after a step of a LambdaLR schedule. `plant=(folder, marker)` puts a `MarkerPayload` in that folder's state
    (the optimizer's first learning rate, or an extra model entry): DCP saves it as a bytes entry, a torch.save'd
    object, and its `.metadata` holds only DCP's own classes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = [{"params": [model[0].weight], "weight_decay": 0.1}, {"params": [model[0].bias, *model[1].parameters()]}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    states = {
        "pytorch_model_fsdp_0": {"model": get_model_state_dict(model)},
        "optimizer_0": {"optimizer": get_optimizer_state_dict(model, optimizer)},
    }
    if plant is not None and plant[0] == "optimizer_0":
        states["optimizer_0"]["optimizer"]["param_groups"][0]["lr"] = MarkerPayload(plant[1])
    elif plant is not None:
        states[plant[0]]["model"]["extra_state"] = MarkerPayload(plant[1])
    checkpoint = output_dir / f"checkpoint-{step}"
    for name, state in states.items():
        dcp.save(state, checkpoint_id=checkpoint / name, no_dist=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


def test_the_dcp_folders_accelerate_writes_for_an_fsdp_run_pass_the_resume_check(tmp_path):
    import pickle
    from types import SimpleNamespace

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from genesis_hf.posttrain.resume import ResumeError, plan_run

    output_dir = tmp_path / "run"
    checkpoint = fsdp_checkpoint(output_dir, 4)
    declared = dcp.FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata().state_dict_metadata
    pickled = {key for key, entry in declared.items() if isinstance(entry, BytesStorageMetadata)}
    # What the check has to let through: the param_groups values are bytes entries (torch.save'd floats, bools, the
    # betas tuple, the list of parameter names), one set per group.
    assert {"optimizer.param_groups.0.lr", "optimizer.param_groups.1.betas", "optimizer.param_groups.1.initial_lr",
            "optimizer.param_groups.0.params"} <= pickled  # fmt: skip
    args = SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=None)
    plan = plan_run(args, {"world_size": 1})
    assert (plan.checkpoint, plan.step) == (checkpoint, 4)
    # A .metadata that is not DCP's own classes is refused before it is built.
    marker = tmp_path / "code-ran"
    (checkpoint / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(MarkerPayload(marker)))
    with pytest.raises(
        ResumeError,
        match=r"checkpoint-4: optimizer_0/\.metadata is not DCP metadata \(\w+\.open is not a DCP metadata class",
    ):
        plan_run(args, {"world_size": 1})
    assert not marker.exists()


@pytest.mark.parametrize(
    ("kind", "folder", "entry"),
    [("sft", "optimizer_0", "optimizer.param_groups.0.lr"), ("dpo", "pytorch_model_fsdp_0", "model.extra_state")],
)
def test_a_planted_bytes_entry_in_an_fsdp_checkpoint_is_refused_before_anything_loads(
    kind, folder, entry, base_dir, data, tmp_path, capsys
):
    import torch.distributed.checkpoint as dcp

    output_dir = tmp_path / "run"
    marker = tmp_path / "code-ran"
    checkpoint = fsdp_checkpoint(output_dir, 2, plant=(folder, marker))
    before = snapshot(output_dir)
    assert run_recipe_in_process(kind, recipe_flags(kind, base_dir, data, output_dir)) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    assert f"checkpoint-2: entry '{entry}' of {folder}/ holds objects other than tensors" in error[0], error
    assert "weights_only refuses it: Unsupported global: GLOBAL io.open was not an allowed global" in error[0]
    assert not marker.exists() and snapshot(output_dir) == before
    # The oracle: torch's default reader and planner, as Accelerate loads the folder, run the planted code.
    state = (
        {"optimizer": {"param_groups": [{"lr": 0.0}]}} if folder == "optimizer_0" else {"model": {"extra_state": 0}}
    )
    dcp.load(state, checkpoint_id=checkpoint / folder, no_dist=True)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_finished_results_are_kept_and_refusals_come_before_anything_loads(
    kind, base_dir, data, finished, tmp_path, capsys
):
    output_dir = tmp_path / "run"
    shutil.copytree(finished[kind], output_dir)
    flags = recipe_flags(kind, base_dir, data, output_dir)

    def refused(argv: list[str]) -> str:
        before = snapshot(tmp_path)
        assert run_recipe_in_process(kind, argv) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and snapshot(tmp_path) == before, error  # nothing written, metrics.jsonl included
        return error[0]

    # Other settings over a finished run: never, not even with --overwrite_output_dir (the checkpoints would mix).
    for extra in ([], ["--overwrite_output_dir", "true"]):
        error = refused([*flags, "--learning_rate", "5e-3", *extra])
        assert "holds checkpoints of a run with other settings (learning_rate: 0.01 -> 0.005)" in error
    # A file of the user's in final/ stops the run before training, not after.
    (output_dir / "final" / "notes.txt").write_text("mine")
    error = refused(flags)
    assert "notes.txt" in error and "checked before training" in error
    (output_dir / "final" / "notes.txt").unlink()
    # Results and no checkpoint to resume: refused unless --overwrite_output_dir true, as in pretraining.
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    error = refused(flags)
    assert "final/, metrics.jsonl (up to step 6)" in error and "--overwrite_output_dir true" in error


def test_overwrite_output_dir_starts_afresh_over_results_and_keeps_the_old_records(base_dir, data, finished, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(finished["sft"], output_dir)
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    old = metrics(output_dir)
    argv = [*recipe_flags("sft", base_dir, data, output_dir), "--max_steps", "2", "--save_strategy", "no",
            "--overwrite_output_dir", "true"]  # fmt: skip
    assert run_recipe_in_process("sft", argv) == 0
    records = metrics(output_dir)
    assert records[: len(old)] == old
    restart = records[len(old)]
    assert restart["event"] == "restart" and restart["step"] == 0 and restart["resumed_from"] is None
    assert [record["step"] for record in records[len(old) + 1 :] if "loss" in record] == [1, 2]
    assert json.loads((output_dir / "run_settings.json").read_text())["max_steps"] == 2
    assert json.loads((output_dir / "final" / "genesis_checkpoint.json").read_text())["step"] == 2


def test_a_checkpoint_is_complete_only_with_its_state_its_weights_and_every_ranks_rng(tmp_path):
    from genesis_hf.posttrain.resume import checkpoint_problem, complete_checkpoints

    def checkpoint(step: int, state: str | None, files=("model.safetensors", "rng_state_0.pth")) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        for name in files:
            (folder / name).write_bytes(b"x")
        return folder

    checkpoint(1, json.dumps({"global_step": 1}), files=("model.safetensors", "rng_state_0.pth", "rng_state_1.pth"))
    checkpoint(2, json.dumps({"global_step": 2}))  # rank 1's RNG state never written
    checkpoint(3, '{"global_step": 3, "log_hist')  # cut while written
    checkpoint(4, None)  # killed before the state
    checkpoint(5, json.dumps({"global_step": 6}))  # not this step's state
    checkpoint(6, json.dumps({"global_step": 6}), files=())  # no weights
    adapter = checkpoint(7, json.dumps({"global_step": 7}), files=("adapter_model.safetensors",))
    complete, skipped = complete_checkpoints(tmp_path, world_size=2)
    assert [step for step, _ in complete] == [1, 7]
    problems = {path.name: problem for path, problem in skipped}
    assert problems == {
        "checkpoint-2": "it lacks rng_state_1.pth (the save was cut short)",
        "checkpoint-3": "its trainer_state.json does not parse (JSONDecodeError; the save was cut short)",
        "checkpoint-4": "it has no trainer_state.json (the save was cut short)",
        "checkpoint-5": "its trainer_state.json says global_step 6, not 5",
        "checkpoint-6": "it has no model weights",
    }
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None  # one process: rank 0's RNG state is all there is
    assert checkpoint_problem(adapter) is None  # a LoRA run's checkpoint holds the adapter
