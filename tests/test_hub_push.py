"""Pushing checkpoints while training runs, against the local Hub server: failures, crashes, revisions, listings."""

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants

from genesis_hf import cli
from genesis_hf.events import Events
from genesis_hf.layout import HUB_JOURNAL_FILE, HUB_STAGING_DIR
from genesis_hf.publish.listing import list_run_checkpoints
from genesis_hf.publish.push import CheckpointPusher, PublishError, preflight
from genesis_hf.testing import HubServer, build_tiny_model_folder

BLOCK_GENESIS_HF = "import sys\nsys.modules['genesis_hf'] = None\n"
REPO = "alice/genesis-tiny"
STEPS = (2, 4, 6)
CHECKPOINT_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "configuration_genesis.py",
    "modeling_genesis.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
    "genesis_checkpoint.json",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = build_tiny_model_folder(folder)
    return folder, model, tokenizer


def _checkpoint(tiny_folder, root, step):
    """A model folder standing for the training checkpoint of `step`."""
    folder = root / "checkpoints" / f"step-{step:07d}"
    shutil.copytree(tiny_folder, folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "step": step, "tokens_seen": step * 512}))
    return folder


@pytest.fixture(scope="module")
def pushed(tiny, tmp_path_factory):
    """Three checkpoints pushed while the server fails, drops and stalls requests; everything printed is captured."""
    root = tmp_path_factory.mktemp("pushed")
    server = HubServer().start()
    # The first commit stalls 2 s; later ones fail once with a 500 and once with a dropped connection; so do a branch
    # creation and a preupload. The pusher takes checkpoints as the training loop hands them over: as events.
    server.add_failure(r"POST /api/models/.*/commit/", action="stall", delay=2.0)
    server.add_failure(r"POST /api/models/.*/commit/", action="error", status=500, skip=1)
    server.add_failure(r"POST /api/models/.*/commit/", action="drop", skip=2)
    server.add_failure(r"POST /api/models/.*/branch/", action="drop", skip=1)
    server.add_failure(r"POST /api/models/.*/preupload/", action="error", status=503, skip=3)
    checkpoints = {step: _checkpoint(tiny[0], root, step) for step in STEPS}

    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    handler.setLevel(logging.DEBUG)
    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    printed = io.StringIO()
    submit_seconds, pending_during_stall, deletable_during_stall = [], None, None
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            pusher = CheckpointPusher(
                REPO, server.write_token, root, dtype="fp32", endpoint=server.endpoint, base_delay=0.05
            )
            for step in STEPS:
                started = time.perf_counter()
                pusher.on_checkpoint_saved(checkpoints[step], step)  # the training loop's call
                submit_seconds.append(time.perf_counter() - started)
                time.sleep(0.05)  # "training"
            assert server.wait_for_request(r"POST /api/models/.*/commit/", timeout=60)
            stalled = [record for record in server.requests if record.injected == "stall" and record.status is None]
            pending_during_stall = (len(stalled), pusher.pending_steps())
            deletable_during_stall = pusher.may_delete(checkpoints[STEPS[0]])
            finished = pusher.wait(timeout=180)
            submission = pusher.journal.entry(STEPS[-1])["submission"]
            pusher.on_train_end(root, checkpoints[STEPS[-1]], STEPS[-1])  # pretraining's last checkpoint, pushed
            resubmitted = pusher.journal.entry(STEPS[-1])["submission"] != submission
            pusher.close()
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(previous_level)
    yield {
        "server": server,
        "root": root,
        "pusher": pusher,
        "checkpoints": checkpoints,
        "finished": finished,
        "resubmitted": resubmitted,
        "submit_seconds": submit_seconds,
        "pending_during_stall": pending_during_stall,
        "deletable_during_stall": deletable_during_stall,
        "output": printed.getvalue() + log_stream.getvalue(),
    }
    server.stop()


def test_submit_returns_at_once_while_the_server_stalls(pushed):
    # Every submit returned while the first upload's commit was still stalled on the server (2 s).
    assert sum(pushed["submit_seconds"]) < 1.0, pushed["submit_seconds"]
    stalled_count, pending = pushed["pending_during_stall"]
    assert stalled_count == 1 and pending == list(STEPS)
    assert pushed["deletable_during_stall"] is False


def test_every_checkpoint_lands_on_its_branch_despite_failures(pushed):
    server, pusher = pushed["server"], pushed["pusher"]
    assert pushed["finished"]
    injected = {record.injected for record in server.requests if record.injected}
    assert injected == {"stall", "error", "drop"}
    for step in STEPS:
        files = server.branch_files(REPO, f"step-{step:07d}")
        assert CHECKPOINT_FILES <= set(files), sorted(files)
        assert json.loads(files["genesis_checkpoint.json"])["step"] == step
        assert f'revision="step-{step:07d}"' in files["README.md"].decode()
        assert pusher.is_confirmed(step) and pusher.may_delete(pushed["checkpoints"][step])
    main = server.branch_files(REPO, "main")
    assert json.loads(main["genesis_checkpoint.json"])["step"] == STEPS[-1]
    journal = json.loads((pushed["root"] / HUB_JOURNAL_FILE).read_text())
    assert journal["main_step"] == STEPS[-1]
    assert {entry["state"] for entry in journal["uploads"].values()} == {"done"}
    assert not (pushed["root"] / "hub_exports").exists() or not any((pushed["root"] / "hub_exports").iterdir())


def _main_history(repo) -> list:
    """The commits of `main`, newest first."""
    history, commit = [], repo.resolve("main")
    while commit is not None:
        history.append(commit)
        commit = repo.commits.get(commit.parent) if commit.parent else None
    return history


def test_each_checkpoint_is_uploaded_once_and_its_branch_is_that_commit_of_main(pushed):
    server = pushed["server"]
    # One successful commit per checkpoint, all to main (a failed try made no commit); none to a branch.
    commits = server.requests_matching(r"POST /api/models/alice/genesis-tiny/commit/")
    assert [record.path.rsplit("/", 1)[-1] for record in commits if record.status == 200] == ["main"] * len(STEPS)
    repo = server.get_repo(REPO)
    history = _main_history(repo)
    assert len(repo.commits) == len(history) == len(STEPS) + 1  # the repo's initial commit, then one per checkpoint
    # Each branch was created at the commit main had right after that checkpoint's upload.
    for commit, step in zip(history, reversed(STEPS), strict=False):
        assert repo.branches[f"step-{step:07d}"] == commit.oid
        assert commit.title == f"Checkpoint at step {step}"
    assert repo.branches["main"] == repo.branches[f"step-{STEPS[-1]:07d}"]
    # on_train_end with the last checkpoint (pretraining) queued nothing new.
    assert pushed["resubmitted"] is False


def test_the_token_is_never_written_or_printed(pushed):
    token = pushed["server"].write_token
    assert "HTTP Request" in pushed["output"] or "Checkpoint" in pushed["output"]  # the capture did capture
    assert token not in pushed["output"]
    for path in pushed["root"].rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_checkpoints_load_back_by_revision_without_genesis_hf(pushed, tiny, tmp_path):
    server = pushed["server"]
    _, model, tokenizer = tiny
    ids = tokenizer("The history of science is long.")["input_ids"]
    script = BLOCK_GENESIS_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({REPO!r}, revision="step-0000004", trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({REPO!r}, revision="step-0000004")
        assert tokenizer("The history of science is long.")["input_ids"] == {ids}
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(torch.tensor([{ids}])).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, **server.client_env(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")}
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits
    assert (torch.load(tmp_path / "logits.pt", weights_only=True) - expected).abs().max().item() < 1e-5
    # transformers resolves the branch to its commit once, then downloads every file at that commit.
    assert server.requests_matching(r"/alice/genesis-tiny/(revision|resolve)/step-0000004")
    assert server.requests_matching(r"GET /alice/genesis-tiny/resolve/[0-9a-f]{40}/modeling_genesis\.py")


def test_checkpoints_are_listed_from_the_hub_and_locally(pushed, monkeypatch, tmp_path, capsys):
    server = pushed["server"]
    # What HF_ENDPOINT does at import time, for the command line's HfApi() in this process.
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    entries = list_run_checkpoints(REPO)
    assert [(entry.name, entry.step, entry.tokens_seen) for entry in entries] == [
        ("step-0000002", 2, 1024),
        ("step-0000004", 4, 2048),
        ("step-0000006", 6, 3072),
        ("main", 6, 3072),
    ]
    assert all(entry.loss is not None and entry.revision == entry.name for entry in entries)
    assert cli.main(["checkpoints", REPO, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [item["revision"] for item in listed][:3] == ["step-0000002", "step-0000004", "step-0000006"]

    local = list_run_checkpoints(str(pushed["root"]))
    assert [(entry.step, entry.kind) for entry in local] == [(2, "hf"), (4, "hf"), (6, "hf")]
    assert cli.main(["checkpoints", "not a repo!"]) == 2
    assert "neither a local directory nor a valid Hub repo id" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_mid_upload_then_resumed(tiny, tmp_path):
    server = HubServer().start()
    try:
        checkpoints = {step: _checkpoint(tiny[0], tmp_path, step) for step in (1, 2, 3)}
        # The upload of step 2 hangs at its commit (the second to main); the process is killed there.
        commit_pattern = r"POST /api/models/.*/commit/main"
        stall = server.add_failure(commit_pattern, action="stall", delay=600.0, skip=1)
        script = textwrap.dedent(
            f"""
            import os, torch
            torch.set_num_threads(1)
            from genesis_hf.publish.push import CheckpointPusher
            pusher = CheckpointPusher({REPO!r}, os.environ["GENESIS_TEST_TOKEN"], {str(tmp_path)!r},
                                      endpoint={server.endpoint!r}, base_delay=0.05)
            for step, folder in {[(step, str(folder)) for step, folder in checkpoints.items()]}:
                pusher.on_checkpoint_saved(folder, step)
            pusher.wait()
            """
        )
        env = {**os.environ, "GENESIS_TEST_TOKEN": server.write_token, "HF_HOME": str(tmp_path / "hf_home")}
        child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while len(server.requests_matching(commit_pattern)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(server.requests_matching(commit_pattern)) == 2
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        journal = json.loads((tmp_path / HUB_JOURNAL_FILE).read_text())
        states = {entry["step"]: entry["state"] for entry in journal["uploads"].values()}
        assert states == {1: "done", 2: "pending", 3: "pending"}, child.stderr.read()[-2000:]
        assert server.branch_files(REPO, "step-0000002") == server.branch_files(REPO, "step-0000003") == {}

        resumed = CheckpointPusher(REPO, server.write_token, tmp_path, endpoint=server.endpoint, base_delay=0.05)
        assert resumed.pending_steps() == [2, 3]
        assert not resumed.may_delete(checkpoints[3])
        assert resumed.wait(timeout=120)
        resumed.close()
        for step in (1, 2, 3):
            assert resumed.is_confirmed(step)
            assert CHECKPOINT_FILES <= set(server.branch_files(REPO, f"step-{step:07d}"))
        assert json.loads(server.branch_files(REPO, "main")["genesis_checkpoint.json"])["step"] == 3
        # The killed process's commit of step 2 arrives now: the Hub refuses it (main moved since), main stays at 3.
        stale = server.requests_matching(commit_pattern)[1]
        stall.release()
        deadline = time.monotonic() + 30
        while stale.status is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stale.status == 412
        assert json.loads(server.branch_files(REPO, "main")["genesis_checkpoint.json"])["step"] == 3
        assert [record.status for record in server.requests_matching(commit_pattern)].count(200) == 3
    finally:
        server.stop()


def test_raw_training_state_goes_to_a_private_backup_repo(tiny, tmp_path):
    from genesis_hf.pretrain import checkpoint as ckpt

    _, model, tokenizer = tiny
    optimizer = torch.optim.AdamW(model.parameters())
    manager = ckpt.CheckpointManager(
        tmp_path,
        save_total_limit=None,
        milestone_steps=None,
        async_save=False,
        run_config={"learning_rate": 0.001},
        model_config=model.config,
        tokenizer=tokenizer,
    )
    manager.save(
        7,
        model,
        optimizer,
        {"step": 7, "tokens_seen": 3584, "loss": 5.0},
        {"data_loader": {}, "rng": ckpt.capture_rng_state()},
    )
    manager.close()
    server = HubServer().start()
    try:
        pusher = CheckpointPusher(
            REPO,
            server.write_token,
            tmp_path,
            endpoint=server.endpoint,
            backup_repo_id="alice/genesis-tiny-state",
            base_delay=0.05,
        )
        pusher.on_checkpoint_saved(tmp_path / "checkpoints" / "step-0000007", 7)
        assert pusher.wait(timeout=120)
        pusher.close()
        assert pusher.is_confirmed(7)
        assert CHECKPOINT_FILES <= set(server.branch_files(REPO, "step-0000007"))
        backup = server.get_repo("alice/genesis-tiny-state")
        assert backup.private
        files = set(server.branch_files("alice/genesis-tiny-state"))
        assert {"checkpoints/step-0000007/trainer_state.json", "checkpoints/step-0000007/model/.metadata"} <= files
        assert any(path.startswith("checkpoints/step-0000007/optimizer/") for path in files)
        entries = list_run_checkpoints(str(tmp_path))
        assert [(entry.name, entry.step, entry.tokens_seen, entry.kind) for entry in entries] == [
            ("step-0000007", 7, 3584, "training")
        ]
    finally:
        server.stop()


@pytest.fixture
def no_local_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "repo_id, token_kind, expected",
    [
        ("alice/bad repo!", "write", "'alice/bad repo!' is not a valid Hub repo id"),
        ("alice/ok", None, "needs a token with write access, and none was found"),
        ("alice/ok", "invalid", "rejected the token"),
        ("alice/ok", "read", "is read-only"),
        ("someone-else/ok", "write", "cannot write to namespace 'someone-else'"),
    ],
)
def test_bad_repo_ids_and_tokens_fail_before_training(hub, no_local_token, repo_id, token_kind, expected):
    token = {"write": hub.write_token, "read": hub.read_token, "invalid": "hf_invalid_token_0000", None: None}[
        token_kind
    ]
    with pytest.raises(PublishError, match=expected) as error:
        preflight(repo_id, token, endpoint=hub.endpoint)
    if token:
        assert token not in str(error.value)
    with pytest.raises(PublishError, match=expected):
        CheckpointPusher(repo_id, token, "unused", endpoint=hub.endpoint)
    assert not hub.requests_matching("POST")  # nothing was created


def test_pusher_for_run_checks_before_training(hub, no_local_token, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from genesis_hf.publish.push import pusher_for_run

    assert pusher_for_run(SimpleNamespace(push_to_hub=False, hub_model_id=None, output_dir=tmp_path)) is None
    args = SimpleNamespace(push_to_hub=True, hub_model_id="alice/run", output_dir=tmp_path)
    with pytest.raises(PublishError, match="none was found"):
        pusher_for_run(args, endpoint=hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    with pytest.raises(PublishError, match="read-only"):
        pusher_for_run(args, endpoint=hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", hub.write_token)
    pusher = pusher_for_run(args, endpoint=hub.endpoint)
    assert pusher.repo_id == "alice/run"
    pusher.close()


def test_preflight_accepts_write_tokens_and_org_namespaces(hub):
    assert preflight("genesis-org/genesis-tiny", hub.write_token, endpoint=hub.endpoint) == "genesis-org/genesis-tiny"
    assert preflight("genesis-tiny", hub.write_token, endpoint=hub.endpoint) == "alice/genesis-tiny"


def _folder(path: Path, step: int, **files: bytes) -> Path:
    """A stand-in checkpoint: its step in genesis_checkpoint.json, plus `files`."""
    path.mkdir(parents=True)
    (path / "genesis_checkpoint.json").write_text(json.dumps({"step": step, "name": path.name}))
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


def _copy_export(checkpoint_dir: Path, out_dir: Path, step: int, branch: str) -> None:
    """An export_fn that copies the folder (the verified export is tested above): these tests are about the Hub."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(checkpoint_dir, out_dir)


def _fast_pusher(hub, run: Path) -> CheckpointPusher:
    return CheckpointPusher(REPO, hub.write_token, run, endpoint=hub.endpoint, export_fn=_copy_export, base_delay=0.05)


def test_the_pusher_subscribes_to_the_trainer_events(hub, tmp_path):
    run = tmp_path / "run"
    events = Events([_fast_pusher(hub, run)])
    pusher = events.subscribers[0]
    # A PEFT run's checkpoint holds an adapter, not a model: not pushed (its merged final/ is).
    events.on_checkpoint_saved(_folder(run / "checkpoint-1", 1, **{"adapter_model.safetensors": b"adapter"}), 1)
    assert pusher.journal.entry(1) is None
    # The Trainer's checkpoint-3 goes up from the pusher's own copy; the Trainer may rotate its folder at once. Its
    # commit is held on the server while final/ of the same step arrives (SFT/DPO's on_train_end).
    stall = hub.add_failure(r"POST /api/models/.*/commit/main", action="stall", delay=600.0)
    checkpoint = _folder(run / "checkpoint-3", 3, **{"model.safetensors": b"checkpoint-3"})
    events.on_checkpoint_saved(checkpoint, 3)
    shutil.rmtree(checkpoint)
    assert hub.wait_for_request(r"POST /api/models/.*/commit/main", timeout=60)
    final = _folder(run / "final", 3, **{"model.safetensors": b"final"})
    events.on_train_end(run, final, 3)
    assert not events.may_delete(final)  # its upload is pending
    stall.release()
    events.close()
    # The later submission wins: main and the branch hold final/, although checkpoint-3's commit landed after it came.
    main = hub.branch_files(REPO, "main")
    assert main["model.safetensors"] == b"final"
    assert hub.get_repo(REPO).branches["step-0000003"] == hub.get_repo(REPO).branches["main"]
    assert pusher.is_confirmed(3) and events.may_delete(final)
    assert not any((run / HUB_STAGING_DIR).iterdir())  # the pusher's copy of checkpoint-3 is gone


def test_a_checkpoint_older_than_main_goes_to_its_branch_only(hub, tmp_path):
    """A resumed run uploads what an earlier one left pending after newer checkpoints: main stays at the newest."""
    run = tmp_path / "run"
    pusher = _fast_pusher(hub, run)
    for step in (4, 2):
        pusher.on_checkpoint_saved(_folder(run / "checkpoints" / f"step-{step:07d}", step), step)
        assert pusher.wait(timeout=60)
    pusher.close()
    assert json.loads(hub.branch_files(REPO, "main")["genesis_checkpoint.json"])["step"] == 4
    assert json.loads(hub.branch_files(REPO, "step-0000002")["genesis_checkpoint.json"])["step"] == 2
    commits = hub.requests_matching(r"POST /api/models/alice/genesis-tiny/commit/")
    assert [record.path.rsplit("/", 1)[-1] for record in commits] == ["main", "step-0000002"]
    repo = hub.get_repo(REPO)
    on_main = {commit.oid for commit in _main_history(repo)}
    assert repo.branches["step-0000004"] in on_main and repo.branches["step-0000002"] not in on_main
    first_run_commit = repo.branches["step-0000004"]
    assert json.loads((run / HUB_JOURNAL_FILE).read_text())["main_step"] == 4

    # A new run into the same repo (another output_dir) moves the branch of a step it pushes again.
    rerun = _fast_pusher(hub, tmp_path / "rerun")
    rerun.on_checkpoint_saved(_folder(tmp_path / "rerun" / "checkpoints" / "step-0000004", 4, **{"new": b"1"}), 4)
    rerun.close()
    assert rerun.is_confirmed(4)
    assert repo.branches["step-0000004"] == repo.branches["main"] != first_run_commit
    assert hub.branch_files(REPO, "step-0000004")["new"] == b"1"
    assert len(hub.requests_matching(r"DELETE /api/models/alice/genesis-tiny/branch/step-0000004")) == 1


RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "pretrain.py"
TRAIN_CONFIG = {
    "model_preset": "debug",
    "model_overrides": {"vocab_size": 512},
    "seq_len": 32,
    "per_device_train_batch_size": 2,
    "tokens_per_step": 128,
    "max_steps": 4,
    "warmup_steps": 1,
    "save_steps": 2,
    "eval_steps": 2,
    "eval_batches": 1,
    "per_device_eval_batch_size": 2,
    "logging_steps": 2,
    # Keep one checkpoint: step 2 may only go once its upload is confirmed (the pusher's retention veto).
    "save_total_limit": 1,
    "report_to": "none",
    "disable_tqdm": True,
    "push_to_hub": True,
    "hub_model_id": "alice/genesis-run",
}


def _run_recipe(server, tmp_path, token):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TRAIN_CONFIG, "output_dir": str(tmp_path / "run")}))
    env = {
        **os.environ,
        **server.client_env(),
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "hf_home"),
        "GENESIS_HF_CACHE": str(tmp_path / "genesis_cache"),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, str(RECIPE), "--config", str(config)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_a_training_run_pushes_one_complete_branch_per_checkpoint(tmp_path):
    server = HubServer().start()
    try:
        result = _run_recipe(server, tmp_path, server.write_token)
        assert result.returncode == 0, result.stderr[-3000:]
        output_dir = tmp_path / "run"
        for step in (2, 4):
            files = server.branch_files("alice/genesis-run", f"step-{step:07d}")
            # A pretraining tokenizer has no ChatML tokens, hence no chat template.
            assert CHECKPOINT_FILES - {"chat_template.jinja"} <= set(files), sorted(files)
            metadata = json.loads(files["genesis_checkpoint.json"])
            assert (metadata["step"], metadata["tokens_seen"]) == (step, step * 128)
            assert "Training configuration" in files["README.md"].decode()
        assert json.loads(server.branch_files("alice/genesis-run", "main")["genesis_checkpoint.json"])["step"] == 4
        journal = json.loads((output_dir / HUB_JOURNAL_FILE).read_text())
        assert {entry["state"] for entry in journal["uploads"].values()} == {"done"}
        token = server.write_token
        assert token not in result.stdout + result.stderr
        for path in output_dir.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path
        assert "step-0000004" in [entry.name for entry in list_run_checkpoints(str(output_dir))]

        # A read-only token stops the run before its first step, with the reason.
        refused = _run_recipe(server, tmp_path / "refused", server.read_token)
        assert refused.returncode == 1
        assert "read-only" in refused.stderr and server.read_token not in refused.stderr
        assert not (tmp_path / "refused" / "run" / "checkpoints").exists()
    finally:
        server.stop()
