"""Nothing a user has is ever lost (issue 11): each test builds the situation, runs the real entry point, and checks
that every file that was there is still there byte for byte, or that the command refused before touching anything.

Covered: `genesis-hf export --overwrite` against runs, checkpoints, files, symlinks and folders of the user's; a fresh
start over a previous run's results; rotation and the final export with a stub checkpoint; structurally wrong state
files; a shard corrupted in place (checksums); a planted DCP `.metadata` pickle; non-finite and out-of-range float
arguments; misspelled `model_overrides`; metrics.jsonl with non-finite values and restarts; one-line documents of
any length; and the one-line errors that used to be tracebacks.
"""

import hashlib
import json
import math
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from test_pretrain import recipe_main, run_recipe, steps_of, write_config

from genesis_hf import cli, layout
from genesis_hf.args import ConfigError
from genesis_hf.pretrain import checkpoint as ckpt
from genesis_hf.testing import build_tiny_model_folder
from genesis_hf.testing.memory import PeakRss


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed) with the SHA-256 of its bytes: what must survive."""
    entries = {}
    for directory, subdirectories, files in os.walk(folder):
        for name in subdirectories + files:
            path = Path(directory) / name
            key = path.relative_to(folder).as_posix()
            if path.is_symlink():
                entries[key] = f"link to {os.readlink(path)}"
            elif path.is_file():
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[key] = "folder"
    return entries


def copy_run(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the debug run and a config pointing at it."""
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    values = yaml.safe_load((finished_run.parent / "run.yaml").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(dict(values, output_dir=str(output_dir))))
    return output_dir, config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, run_env, test_mixture) -> Path:
    """A finished 4-step pretraining run of the debug model (test_pretrain's config): checkpoints at steps 2 and 4,
    final/, metrics.jsonl. Tests change copies of it."""
    folder = tmp_path_factory.mktemp("finished-run")
    config = write_config(folder / "run.yaml", test_mixture, output_dir=str(folder / "out"))
    result = run_recipe(run_env, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A model folder (the export source) and a run folder as the trainer leaves it: DCP checkpoints at steps 3 and
    7, metrics.jsonl, a tensorboard event file and the user's notes."""
    root = tmp_path_factory.mktemp("tiny-run")
    model_dir = root / "model"
    model, tokenizer = build_tiny_model_folder(model_dir, train_steps=2)
    run_dir = root / "run"
    manager = ckpt.CheckpointManager(
        run_dir,
        save_total_limit=None,
        milestone_steps=None,
        async_save=False,
        run_config={"learning_rate": 0.001},
        model_config=model.config,
        tokenizer=tokenizer,
    )
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (3, 7):
        state = {"step": step, "tokens_seen": 512 * step, "loss": 5.0}
        manager.save(step, model.train(), optimizer, state, {"data_loader": {}, "rng": ckpt.capture_rng_state()})
    manager.close()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.1").write_bytes(b"\x00events")
    (run_dir / "notes.txt").write_text("what I changed in this run\n")
    return model_dir, run_dir


# ---------------------------------------------------------------------------------------------------------------------
# 1. export --overwrite deletes only an earlier export


def _out_is_the_run(model_dir, run_dir):
    return model_dir, run_dir, "is a run folder"


def _out_is_the_checkpoint(model_dir, run_dir):
    checkpoint = run_dir / "checkpoints" / "step-0000007"
    return checkpoint, checkpoint, "overlaps the checkpoint being exported"


def _out_inside_another_checkpoint(model_dir, run_dir):
    return (
        run_dir / "checkpoints" / "step-0000003",
        run_dir / "checkpoints" / "step-0000007" / "export",
        "inside a checkpoint",
    )


def _out_among_the_checkpoints(model_dir, run_dir):
    return model_dir, run_dir / "checkpoints" / "step-0000009", "inside a run's checkpoints folder"


def _out_contains_a_run(model_dir, run_dir):
    holder = run_dir.parent / "projects"
    (holder / "older-run").mkdir(parents=True, exist_ok=True)
    (holder / "older-run" / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    return model_dir, holder, "contains a run folder"


def _out_is_a_file(model_dir, run_dir):
    return model_dir, run_dir / "notes.txt", "is a file"


def _out_is_a_symlink(model_dir, run_dir):
    link = run_dir.parent / "link-to-run"
    if not link.is_symlink():
        link.symlink_to(run_dir)
    return model_dir, link, "is a symlink"


@pytest.mark.parametrize(
    "situation",
    [
        _out_is_the_run,
        _out_is_the_checkpoint,
        _out_inside_another_checkpoint,
        _out_among_the_checkpoints,
        _out_contains_a_run,
        _out_is_a_file,
        _out_is_a_symlink,
    ],
)
def test_export_overwrite_never_touches_a_run_a_checkpoint_or_a_file(tiny_run, capsys, situation):
    model_dir, run_dir = tiny_run
    source, out, expected = situation(model_dir, run_dir)
    before = snapshot(run_dir.parent)
    assert cli.main(["export", str(source), str(out), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert expected in error and str(out) in error and error.count("\n") == 1, error
    assert snapshot(run_dir.parent) == before


def test_overwrite_refuses_an_export_with_the_users_files_or_changes(tiny_run, tmp_path, capsys):
    model_dir, run_dir = tiny_run
    out = tmp_path / "run" / "exports" / "tiny"  # inside a run folder is allowed (the Hub pusher exports there)
    (tmp_path / "run" / "metrics.jsonl").parent.mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert cli.main(["export", str(model_dir), str(out), "--dtype", "fp32"]) == 0
    marker = json.loads((out / layout.EXPORT_MARKER_FILE).read_text())
    config_bytes = (out / "config.json").read_bytes()
    recorded = {"size": len(config_bytes), "sha256": hashlib.sha256(config_bytes).hexdigest()}
    assert marker["files"]["config.json"] == recorded and "README.md" in marker["files"]
    capsys.readouterr()

    (out / "my-eval-notes.md").write_text("keep me")
    before = snapshot(out)
    assert cli.main(["export", str(model_dir), str(out), "--overwrite"]) == 2
    assert "my-eval-notes.md" in capsys.readouterr().err and snapshot(out) == before

    (out / "my-eval-notes.md").unlink()
    original_card = (out / "README.md").read_text()
    with open(out / "README.md", "a") as card:
        card.write("\nMy edits to the card.\n")
    before = snapshot(out)
    assert cli.main(["export", str(model_dir), str(out), "--overwrite"]) == 2
    assert "README.md" in capsys.readouterr().err and snapshot(out) == before

    # an edit that keeps the size (issue 21): only the content hash can tell
    edited = original_card.replace("a", "b", 1)
    assert edited != original_card and len(edited) == len(original_card)
    (out / "README.md").write_text(edited)
    before = snapshot(out)
    assert cli.main(["export", str(model_dir), str(out), "--overwrite"]) == 2
    assert "README.md" in capsys.readouterr().err and snapshot(out) == before


# ---------------------------------------------------------------------------------------------------------------------
# 2. A fresh start over results: refused, or recorded


def test_a_fresh_start_over_results_is_refused_then_recorded(tmp_path, run_env, finished_run, capsys):
    output_dir, config = copy_run(finished_run, tmp_path)
    shutil.rmtree(output_dir / "checkpoints")  # the checkpoints are gone, the results (final/, metrics) are not
    before = snapshot(output_dir)
    assert recipe_main(["--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert "final/, metrics.jsonl (up to step 4)" in error and "--overwrite_output_dir true" in error, error
    assert snapshot(output_dir) == before

    result = run_recipe(run_env, config, "--overwrite_output_dir", "true", "--max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    # Each fresh start logs its unigram reference after the restart line.
    events = [line.get("event") or line["step"] for line in lines]
    assert events == ["reference", 1, 2, 3, 4, "restart", "reference", 1, 2]
    assert lines[5]["step"] == 0 and lines[5]["resumed_from"] is None
    pointer = json.loads((output_dir / "final" / "training_checkpoint.json").read_text())
    assert pointer["checkpoint"].endswith("step-0000002")


def test_a_final_folder_of_the_users_and_a_file_as_output_dir_are_refused(tmp_path, test_mixture, capsys):
    output_dir = tmp_path / "out"
    (output_dir / "final").mkdir(parents=True)
    (output_dir / "final" / "model.safetensors").write_bytes(b"my own model")
    config = write_config(tmp_path / "run.yaml", test_mixture, output_dir=str(output_dir))
    before = snapshot(tmp_path)
    assert recipe_main(["--config", str(config), "--overwrite_output_dir", "true"]) == 1
    assert "without training_checkpoint.json" in capsys.readouterr().err
    assert recipe_main(["--config", str(config), "--output_dir", str(tmp_path / "run.yaml")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------------
# 3. Only checkpoints that validate count


def test_final_of_an_earlier_genesis_hf_is_replaced_and_a_file_of_the_users_in_final_stops_the_export(
    tmp_path, finished_run
):
    from genesis_hf.model.folder import ExportError
    from genesis_hf.pretrain.final import export_final

    output_dir, _ = copy_run(finished_run, tmp_path)
    newest = ckpt.list_checkpoints(output_dir)[-1].path
    final = output_dir / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()  # what genesis-hf wrote before the one model-folder writer: the pointer, no export marker
    (final / "training_checkpoint.json").write_text(json.dumps({"checkpoint": str(newest)}))
    (final / "model.safetensors").write_bytes(b"the earlier export")
    export_final(output_dir, newest)
    assert (final / layout.EXPORT_MARKER_FILE).is_file()
    assert (final / "model.safetensors").read_bytes() != b"the earlier export"
    assert sorted(path.name for path in output_dir.iterdir() if path.name.startswith("final")) == ["final"]
    export_final(output_dir, newest)  # this version's own export is replaced in place
    (final / "notes.txt").write_text("mine")
    before = snapshot(final)
    with pytest.raises(ExportError, match="notes.txt"):
        export_final(output_dir, newest)
    assert snapshot(final) == before


def test_rotation_and_the_final_export_skip_a_stub_checkpoint(tmp_path, run_env, finished_run):
    output_dir, config = copy_run(finished_run, tmp_path)
    stub = output_dir / "checkpoints" / "step-0000009"
    stub.mkdir()
    state = json.loads((output_dir / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    (stub / "trainer_state.json").write_text(json.dumps(dict(state, step=9)))
    stub_before = snapshot(stub)
    result = run_recipe(run_env, config, "--max_steps", "6", "--save_total_limit", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipping checkpoint" in result.stderr and "step-0000009" in result.stderr
    assert steps_of(output_dir) == [6]  # the good checkpoint was kept, the stub was neither counted nor deleted
    assert snapshot(stub) == stub_before
    pointer = json.loads((output_dir / "final" / "training_checkpoint.json").read_text())
    assert pointer["checkpoint"].endswith("step-0000006")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("trainer_state.json", "{}", "has no step count"),
        ("rng_states.json", "[]", "must list 1 rank state"),
        ("trainer_state.json", "[1, 2]", "has no step count"),
    ],
)
def test_structurally_wrong_state_files_fall_back_like_truncated_ones(tmp_path, finished_run, name, content, expected):
    output_dir, _ = copy_run(finished_run, tmp_path)
    newest = output_dir / "checkpoints" / "step-0000004"
    (newest / name).write_text(content)
    choice, warnings = ckpt.select_checkpoint(output_dir)
    assert choice.step == 2 and expected in warnings[0]
    assert steps_of(output_dir) == [2]


def test_a_corrupted_shard_is_caught_by_its_checksum(tmp_path, finished_run, capsys):
    output_dir, _ = copy_run(finished_run, tmp_path)
    newest = output_dir / "checkpoints" / "step-0000004"
    shard = next((newest / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert ckpt.validate_checkpoint(newest) is None
    assert "corrupted" in ckpt.validate_checkpoint(newest, checksums=True)
    choice, warnings = ckpt.select_checkpoint(output_dir)
    assert choice.step == 2 and "corrupted" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.load_model_from_checkpoint(newest)
    assert cli.main(["export", str(newest), str(tmp_path / "export")]) == 2
    assert "corrupted" in capsys.readouterr().err and not (tmp_path / "export").exists()


class _Planted:
    """A pickle that would create a file when unpickled (what a planted `.metadata` could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_planted_metadata_pickle_never_runs(tmp_path, finished_run, capsys):
    output_dir, _ = copy_run(finished_run, tmp_path)
    newest = output_dir / "checkpoints" / "step-0000004"
    ran = tmp_path / "the-pickle-ran"
    (newest / "model" / ".metadata").write_bytes(pickle.dumps(_Planted(ran)))
    problem = ckpt.validate_checkpoint(newest)
    assert "UnpicklingError" in problem and "system is not a DCP metadata class" in problem
    assert steps_of(output_dir) == [2]
    assert ckpt.select_checkpoint(output_dir)[0].step == 2
    assert cli.main(["export", str(newest), str(tmp_path / "export")]) == 2
    assert cli.main(["checkpoints", str(output_dir)]) == 0
    listing = capsys.readouterr().out
    assert "step-0000002" in listing and "step-0000004" not in listing
    assert not ran.exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4, 5 and 9. Bad input: one line, before anything is set up


def _yaml_syntax_error(tmp_path, config):
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text() + "max_steps: [1, 2\n")
    return ["--config", str(broken)], "is not valid YAML at line"


@pytest.mark.parametrize(
    "flags",
    [
        (["--learning_rate", "inf"], "learning_rate=inf must be a finite number > 0"),
        (["--max_grad_norm", "nan"], "max_grad_norm=nan must be a finite number >= 0"),
        (["--adam_beta2", "1.5"], "adam_beta2=1.5 must be a finite number >= 0 and < 1"),
        (["--model_overrides", '{"num_hiden_layers": 1}'], "'num_hiden_layers' (did you mean 'num_hidden_layers'?)"),
        (["--tokenizer_name_or_path", "./outputs/tokenzer"], "'./outputs/tokenzer' does not exist"),
        (["--tokenizer_name_or_path", "someone/no-such-tokenizer"], "is not a local folder with a tokenizer"),
        (_yaml_syntax_error, None),
    ],
)
def test_bad_arguments_stop_with_one_line_before_anything_is_written(
    tmp_path, finished_run, capsys, monkeypatch, flags
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # tests never reach the network
    output_dir, config = copy_run(finished_run, tmp_path)
    flags, expected = flags
    if callable(flags):
        flags, expected = flags(tmp_path, config)
        argv = flags
    else:
        argv = ["--config", str(config), *flags]
    before = snapshot(tmp_path)
    assert recipe_main(argv) == 1
    error = capsys.readouterr().err
    assert expected in error, error
    assert "Traceback" not in error
    assert snapshot(tmp_path) == before


def test_metrics_jsonl_stays_json_and_marks_nonfinite_values_and_restarts(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from genesis_hf.pretrain.trainer import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    try:
        accelerator = Accelerator(cpu=True)
        first = MetricsLogger(path, accelerator, max_steps=4, initial_step=0, logging_steps=100, disable_tqdm=True)
        first.log_step({"step": 1, "loss": 2.5, "lr": 1e-3})
        first.log_step({"step": 2, "loss": float("nan"), "lr": float("inf"), "grad_norm": -math.inf})
        first.close()
        again = MetricsLogger(path, accelerator, max_steps=4, initial_step=1, logging_steps=100, disable_tqdm=True)
        again.close()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    records = [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]
    assert records[1] == {
        "step": 2,
        "loss": None,
        "lr": None,
        "grad_norm": None,
        "nonfinite": ["loss", "lr", "grad_norm"],
    }
    assert records[2]["event"] == "restart" and records[2]["step"] == 1


def test_max_shard_size_and_a_busy_port_are_one_line_errors(tiny_run, tmp_path, capsys):
    model_dir, run_dir = tiny_run
    assert cli.main(["export", str(model_dir), str(tmp_path / "out"), "--max-shard-size", "banana"]) == 2
    assert "--max_shard_size 'banana' is not a size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["playground", "--runs", str(run_dir), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in error and "--port" in error and error.count("\n") == 1


def test_a_mistyped_run_path_and_a_symlinked_checkpoint_are_named(tiny_run, tmp_path, capsys, monkeypatch):
    from genesis_hf.playground import CheckpointSource, Playground, PlaygroundError
    from genesis_hf.publish.space import SpaceError, stage_space

    _, run_dir = tiny_run
    monkeypatch.chdir(run_dir.parent.parent)
    assert cli.main(["checkpoints", "./runx"]) == 2  # can only be a path
    assert "No local directory './runx'" in capsys.readouterr().err
    # `tiny-run0/runx` is a valid Hub repo id, but tiny-run0/ is a folder here: a typo of tiny-run0/run.
    assert cli.main(["checkpoints", f"{run_dir.parent.name}/{run_dir.name}x"]) == 2
    assert f"Did you mean '{run_dir.parent.name}/{run_dir.name}'" in capsys.readouterr().err

    linked = tmp_path / "run"
    (linked / "checkpoints").mkdir(parents=True)
    (linked / "checkpoints" / "step-0000003").symlink_to(run_dir / "checkpoints" / "step-0000003")
    playground = Playground(CheckpointSource(runs=linked))
    with pytest.raises(PlaygroundError, match="is a symlink to .* outside the run folder"):
        playground.model("step-0000003")
    # Shipping a run in a Space follows the same rule: a linked model folder is not copied from outside the run.
    model_dir, _ = tiny_run
    (linked / "final").symlink_to(model_dir)
    (tmp_path / "space").mkdir()
    with pytest.raises(SpaceError, match="final.* is a symlink to .* outside the run folder"):
        stage_space(tmp_path / "space", runs=linked)
    assert not (tmp_path / "space" / "run" / "final").exists()


def test_a_non_utf8_text_file_is_named(tmp_path):
    from genesis_hf.data import MixtureConfig, SourceConfig, build_pretrain_loader
    from genesis_hf.tokenizer import train_tokenizer

    (tmp_path / "notes.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    mixture = MixtureConfig(name="bad", sources=[SourceConfig(name="notes", location=str(tmp_path), weight=1.0)])
    tokenizer = train_tokenizer(["some text to learn from"] * 4, 260)
    with pytest.raises(ConfigError, match=r"notes\.txt:1 .* is not UTF-8 text: byte 3"):
        loader = build_pretrain_loader(mixture, tokenizer, seq_len=8, batch_size=1)
        loader.next_batch()


# ---------------------------------------------------------------------------------------------------------------------
# 6. A document without newlines: pieces, same ids, bounded memory


def test_a_long_one_line_document_is_cut_safely_with_bounded_memory():
    from genesis_hf import corpus
    from genesis_hf.data.tokens import MAX_PIECE_CHARACTERS, TokenEncoder, _pieces
    from genesis_hf.tokenizer import add_chat_tokens, train_tokenizer

    documents = [document for _, document in zip(range(40), corpus.default_corpus())]
    tokenizer = train_tokenizer(documents, 400)
    add_chat_tokens(tokenizer)
    line = " ".join(document.replace("\n", " ") for document in documents)
    line = (line * (600_000 // len(line) + 1))[:600_000]  # one line, no newline anywhere
    encoder = TokenEncoder(tokenizer)
    pieces = _pieces(line)
    assert "".join(pieces) == line and len(pieces) > 8
    assert max(len(piece) for piece in pieces) <= MAX_PIECE_CHARACTERS
    in_pieces, _ = encoder.encode([line])
    whole = encoder.backend.encode_batch_fast([line], add_special_tokens=False)[0].ids
    assert in_pieces[:-1].tolist() == whole  # the cuts at spaces change no id

    # Without any space or newline there is no safe cut: pieces are cut at the bound, so memory stays bounded.
    assert max(len(piece) for piece in _pieces("x" * 5 * MAX_PIECE_CHARACTERS)) == MAX_PIECE_CHARACTERS

    # 8 MB in one line: encoded whole, the encoder's alignment data alone would take ~0.9 GB.
    big = (line * 14)[:8_000_000]
    with PeakRss() as memory:
        tokens, lengths = encoder.encode([big])
    assert lengths.tolist() == [len(tokens)] and tokens[-1] == encoder.eos_token_id
    assert memory.growth_mib < 400, f"{memory.growth_mib:.0f} MiB"
