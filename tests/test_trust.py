"""Trust, part two (issue 21): no code runs from a checkpoint's data, one writer per folder, finished results are kept,
and bad input gets one line.

The planted checkpoints here are built only of DCP's own metadata classes (what `read_dcp_metadata` admits), but
declare an entry as bytes pointing at a `torch.save`d object whose `__reduce__` would create a marker file: DCP's
default load planner unpickles such bytes with `torch.load(weights_only=False)`.
"""

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from genesis_hf import cli, layout, writer_lock
from genesis_hf.pretrain import checkpoint as ckpt
from genesis_hf.testing import build_tiny_model_folder

REPO = Path(__file__).resolve().parents[1]


class _Planted:
    """An object whose unpickling runs a shell command that creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real training checkpoint of the debug model (model/ and optimizer/ DCP folders, checksums), step 3."""
    root = tmp_path_factory.mktemp("trust-run")
    model, tokenizer = build_tiny_model_folder(root / "model", train_steps=1)
    manager = ckpt.CheckpointManager(
        root / "run",
        save_total_limit=None,
        milestone_steps=None,
        async_save=False,
        run_config={"learning_rate": 0.001},
        model_config=model.config,
        tokenizer=tokenizer,
    )
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()(ids, labels=ids).loss.backward()
    optimizer.step()
    state = {"step": 3, "tokens_seen": 12, "loss": 5.0}
    manager.save(3, model, optimizer, state, {"data_loader": {}, "rng": ckpt.capture_rng_state()})
    manager.close()
    return root / "run"


def _plant(run_dir: Path, tmp_path: Path, part: str, fqn: str) -> tuple[Path, Path]:
    """A copy of the run whose `part/.metadata` declares `fqn` as bytes: a torch.save'd `_Planted`, appended to the
    shard (checksums updated, so only the content of the metadata is wrong). Returns (run copy, marker path)."""

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = copy / "checkpoints" / "step-0000003"
    marker = tmp_path / "the-pickle-ran"
    payload = io.BytesIO()
    torch.save(_Planted(marker), payload)
    folder = checkpoint / part
    shard = next(folder.glob("*.distcp"))
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(payload.getvalue())
    metadata = ckpt.read_dcp_metadata(folder) if part == layout.MODEL_DIR else _unchecked_metadata(folder)
    assert fqn in metadata.state_dict_metadata
    metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data = {index: info for index, info in metadata.storage_data.items() if index.fqn != fqn}
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo(shard.name, offset, len(payload.getvalue()))
    (folder / layout.DCP_METADATA_FILE).write_bytes(pickle.dumps(metadata))
    sums = json.loads((checkpoint / layout.CHECKSUMS_FILE).read_text())
    for file in (shard, folder / layout.DCP_METADATA_FILE):
        sums["crc32"][f"{part}/{file.name}"] = f"{zlib.crc32(file.read_bytes()):08x}"
    (checkpoint / layout.CHECKSUMS_FILE).write_text(json.dumps(sums))
    return copy, marker


def _unchecked_metadata(folder: Path):
    return ckpt.unpickle_dcp_metadata(folder)


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_planted_bytes_weight_is_refused_by_every_loader(tmp_path, tiny_checkpoint, capsys):
    run, marker = _plant(tiny_checkpoint, tmp_path, layout.MODEL_DIR, "model.model.norm.weight")
    checkpoint = run / "checkpoints" / "step-0000003"
    assert "'model.model.norm.weight' as a pickled object" in ckpt.validate_checkpoint(checkpoint)
    # pretraining resume: the checkpoint does not count
    with pytest.raises(ckpt.CheckpointError, match="is intact"):
        ckpt.select_checkpoint(run)
    # load_model_from_checkpoint: what SFT-from-checkpoint, the playground, eval and export use
    with pytest.raises(ckpt.CheckpointError, match="pickled object"):
        ckpt.load_model_from_checkpoint(checkpoint)
    from genesis_hf.posttrain.model import load_starting_point

    with pytest.raises(ckpt.CheckpointError, match="pickled object"):
        load_starting_point(str(checkpoint))
    from genesis_hf.playground.sources import CheckpointSource

    assert "step-0000003" not in [entry.name for entry in CheckpointSource(runs=run).list_checkpoints()]
    capsys.readouterr()
    assert cli.main(["export", str(checkpoint), str(tmp_path / "export")]) == 2
    assert "pickled object" in _one_line(capsys.readouterr().err)
    assert cli.main(["eval", str(checkpoint), "--output_path", str(tmp_path / "r.json"), "--tasks", "arc_easy"]) == 2
    assert "pickled object" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "export").exists() and not (tmp_path / "r.json").exists()
    assert not marker.exists()


def test_a_planted_param_group_value_is_loaded_without_running_code(tmp_path, tiny_checkpoint):
    """An entry name the trainer does write as bytes (an AdamW param_groups value): the metadata passes, and the
    load planner unpickles it with weights_only=True, which refuses the object."""
    run, marker = _plant(tiny_checkpoint, tmp_path, layout.OPTIMIZER_DIR, "optimizer.param_groups.0.lr")
    checkpoint = run / "checkpoints" / "step-0000003"
    assert ckpt.validate_checkpoint(checkpoint, checksums=True) is None
    model, _, _ = ckpt.load_model_from_checkpoint(checkpoint)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_training_checkpoint(checkpoint, model, optimizer, allow_fresh_optimizer=False)
    assert "optimizer.param_groups.0.lr" in _one_line(str(refused.value))
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("genesis_hf", "recipes", "benchmarks", "scripts", "tests"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line and path.name != "test_trust.py":
                    offenders.append(f"{path.relative_to(root)}:{number}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------------
# 3. One writer per folder

_HOLD = """
import sys, time
from genesis_hf.writer_lock import hold_folder
hold_folder(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""

_TAKE = """
import sys
from genesis_hf.writer_lock import FolderInUseError, hold_folder
try:
    hold_folder(sys.argv[1])
except FolderInUseError as error:
    print(error, file=sys.stderr)
    sys.exit(3)
print("taken")
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, **kwargs)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with writer_lock.hold_folder(folder) as held:
        with writer_lock.hold_folder(folder) as again:  # the same process may take it again
            assert again.path == held.path
        refused = _python(_TAKE, str(folder), timeout=120)
        assert refused.returncode == 3, refused.stderr
        line = _one_line(refused.stderr)
        assert f"PID {os.getpid()} on {socket.gethostname()}, since " in line and str(folder) in line
        assert not folder.exists()  # the lock is a sibling file: the folder itself gets nothing
    assert not writer_lock.lock_path(folder).exists()  # released and removed
    with writer_lock.hold_folder(folder):
        # ranks other than 0 of one launch never take (nor wait for) it
        assert writer_lock.hold_folder(folder, rank=1).path is None


def test_a_killed_holder_does_not_lock_the_folder(tmp_path):
    folder = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _python(_TAKE, str(folder), timeout=60).returncode == 3
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert writer_lock.lock_path(folder).exists()  # left behind by the killed holder, but not locked
    with writer_lock.hold_folder(folder):
        assert str(os.getpid()) in writer_lock.lock_path(folder).read_text()


def test_two_pretraining_launches_into_one_folder(tmp_path, run_env, test_mixture):
    """Two real `accelerate launch recipes/pretrain.py` (two gloo ranks each) with one --output_dir: the first trains
    (its rank 1 does not trip over rank 0's lock), the second is refused in one line naming the first."""
    from test_pretrain import write_config
    from test_pretrain_distributed import Launch

    output_dir = tmp_path / "out"
    config = write_config(
        tmp_path / "run.yaml", test_mixture, output_dir=str(output_dir), max_steps=100000, save_steps=100000
    )
    first = Launch("ddp", config, run_env)
    try:
        lock = writer_lock.lock_path(output_dir)
        deadline = time.monotonic() + 180
        while '"pid"' not in (lock.read_text() if lock.is_file() else "") and first.process.poll() is None:
            assert time.monotonic() < deadline, first.log_path.read_text()[-3000:]
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        second = subprocess.run(
            [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "recipes" / "pretrain.py"),
             "--config", str(config)],
            env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert second.returncode != 0
        refusals = [line for line in second.stderr.splitlines() if line.startswith("[rank 0] FolderInUseError")]
        assert len(refusals) == 1 and f"PID {holder['pid']} on {holder['host']}" in refusals[0], second.stderr[-3000:]
        assert first.process.poll() is None, first.log_path.read_text()[-3000:]  # the first one trains on
    finally:
        first.kill()


# ---------------------------------------------------------------------------------------------------------------------
# 2 and 6. Engagement keeps finished results; its input files are checked in one line


def _engagement(argv: list[str], capsys) -> tuple[int, str]:
    from genesis_hf.constitution.engagement import main as engagement_main

    code = engagement_main(argv)
    return code, capsys.readouterr().err


def test_engagement_never_replaces_results(tmp_path, capsys):
    responses = tmp_path / "answers.jsonl"
    rows = [
        {"prompt": "Pizza tips?", "response": "Use a hot oven. What toppings do you like?", "category": "everyday"}
    ]
    responses.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "run"
    assert _engagement(["--responses", str(responses), "--output_dir", str(run)], capsys)[0] == 0
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    assert set(before) == {"scores.jsonl", "engagement.json", "engagement.md"}
    code, error = _engagement(["--responses", str(responses), "--output_dir", str(run)], capsys)
    assert code == 2 and "already holds scores.jsonl, engagement.json, engagement.md" in _one_line(error)
    # --compare into a compared run's folder: its engagement.md is kept
    code, error = _engagement(["--compare", f"a={run},b={run}", "--output_dir", str(run)], capsys)
    assert code == 2 and "already holds engagement.md" in _one_line(error)
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before
    assert _engagement(["--compare", f"a={run},b={run}", "--output_dir", str(tmp_path / "table")], capsys)[0] == 0
    assert (tmp_path / "table" / "engagement.md").read_text().startswith("| metric | a | b |")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{'prompt': 'Hi', 'response': 'Caf\u00e9'}".replace("'", '"').encode("latin-1"), "is not UTF-8 text (byte"),
        (b'{"prompt": "Hi", "response": "Hello.", "category": 3}\n', "has category=3; the category must be a string"),
    ],
)
def test_engagement_responses_are_checked_in_one_line(tmp_path, capsys, content, expected):
    responses = tmp_path / "answers.jsonl"
    responses.write_bytes(content)
    code, error = _engagement(["--responses", str(responses), "--output_dir", str(tmp_path / "out")], capsys)
    line = _one_line(error)
    assert code == 2 and expected in line and str(responses) in line
    assert not (tmp_path / "out").exists()


def test_constitution_prompts_that_are_not_utf8_are_one_line(tmp_path, capsys):
    from genesis_hf.constitution.cli import main as generate_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("Tell me about cr\u00e8me br\u00fbl\u00e9e.\n".encode("latin-1"))
    argv = ["--prompts", str(prompts), "--model", str(tmp_path / "never-loaded"), "--output_dir", str(tmp_path / "o")]
    assert generate_main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--prompts" in line and str(prompts) in line and "is not UTF-8 text" in line


class _TrickleEndpoint(BaseHTTPRequestHandler):
    """A chat endpoint that answers one byte a second (a valid completion, eventually)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A slow reply."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for index in range(len(body)):
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass  # the client gave up

    def log_message(self, *args):
        pass


def test_the_endpoint_timeout_is_a_deadline_per_request(tmp_path, capsys):
    from genesis_hf.constitution.cli import main as generate_main

    server = ThreadingHTTPServer(("127.0.0.1", 0), _TrickleEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("What is a prime number?\n")
        argv = [
            "--prompts", str(prompts), "--base_url", f"http://127.0.0.1:{server.server_port}/v1", "--model", "local",
            "--output_dir", str(tmp_path / "cai"), "--timeout", "2", "--max_retries", "0",
        ]  # fmt: skip
        started = time.monotonic()
        assert generate_main(argv) == 2
        assert time.monotonic() - started < 6  # the reply takes ~80 s at a byte a second
        line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        assert line.startswith("genesis-hf constitution generate: error: ") and "within --timeout 2 s" in line
        assert "failed after 1 attempt(s)" in line
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# 6. Disk full during a pretraining checkpoint save


def _bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_exactly(tmp_path, run_env, test_mixture):
    """A real full disk (a tmpfs a bit larger than one checkpoint): the second save fails with one line saying what it
    needed and what was free, the first checkpoint is intact, and the run moved to a bigger disk ends like a run that
    never failed."""
    from test_pretrain import read_metrics, run_recipe, steps_of, write_config

    reference = tmp_path / "reference"
    result = run_recipe(run_env, write_config(tmp_path / "reference.yaml", test_mixture, output_dir=str(reference)))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint_size = _bytes_under(reference / "checkpoints" / "step-0000002")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(checkpoint_size * 1.6)}", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        output_dir = disk / "out"
        result = run_recipe(run_env, write_config(tmp_path / "full.yaml", test_mixture, output_dir=str(output_dir)))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if "CheckpointError" in line]
        assert len(errors) == 1 and "Saving checkpoint step-0000004 failed: the disk of" in errors[0], result.stderr
        assert "is full (the save needs about" in errors[0] and "were free when it began" in errors[0]
        assert "The previous checkpoint step-0000002 is intact" in errors[0]
        assert steps_of(output_dir) == [2]
        checkpoint = output_dir / "checkpoints" / "step-0000002"
        assert ckpt.validate_checkpoint(checkpoint, checksums=True, resumable=True) is None
        assert not [path.name for path in checkpoint.parent.iterdir() if ".tmp-" in path.name]
        moved = tmp_path / "moved"
        shutil.copytree(output_dir, moved)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    result = run_recipe(run_env, write_config(tmp_path / "moved.yaml", test_mixture, output_dir=str(moved)))
    assert result.returncode == 0, result.stderr[-3000:]

    def final_losses(folder):
        return {record["step"]: record["loss"] for record in read_metrics(folder) if "loss" in record}

    assert final_losses(moved)[4] == final_losses(reference)[4]


# ---------------------------------------------------------------------------------------------------------------------
# 6. The playground's refusals name the checkpoint, never a server path


def test_playground_refusals_name_the_checkpoint_not_server_paths(tmp_path, tiny_checkpoint):
    from genesis_hf.playground.sources import CheckpointSource, PlaygroundError

    run = tmp_path / "server" / "secret-place" / "my-run"
    shutil.copytree(tiny_checkpoint, run)
    outside = tmp_path / "server" / "elsewhere" / "step-0000009"
    shutil.copytree(run / "checkpoints" / "step-0000003", outside)
    (run / "checkpoints" / "step-0000009").symlink_to(outside)
    source = CheckpointSource(runs=run)
    entry = source.resolve("step-0000009")
    with pytest.raises(PlaygroundError) as refused:
        source.location(entry)
    message = str(refused.value)
    assert "step-0000009" in message and "run my-run" in message and "outside the run" in message
    assert str(tmp_path) not in message and "secret-place" not in message and "elsewhere" not in message
    shutil.rmtree(run)  # the run folder went away while the playground serves it
    with pytest.raises(PlaygroundError) as gone:
        source.list_checkpoints(refresh=True)
    assert "my-run" in str(gone.value) and str(tmp_path) not in str(gone.value)
