"""`genesis-hf eval`, `eval_tasks` and `report` on a tiny trained run, with small local benchmarks in the real formats
of HellaSwag, PIQA, ARC, Winogrande, LAMBADA and GSM8K (generate_until), made here; the `lm_eval` CLI is the peer."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genesis_hf import GenesisConfig, GenesisForCausalLM, cli, corpus
from genesis_hf.evaluate import sanity
from genesis_hf.tokenizer import add_chat_tokens, train_tokenizer

LOGLIKELIHOOD_TASKS = ["hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai"]
LIMIT = "3"
TRAIN_STEPS = 160
VENV_BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def write_local_benchmarks(data_dir: Path) -> None:
    """A few documents of each benchmark, with the fields (and field types) of its Hub dataset."""
    sentences = [
        ("The function returns", "the value of the argument.", "a purple elephant on the moon."),
        ("Open the file and", "read its lines.", "paint the river loudly."),
        ("The module defines", "a class for parsing.", "nothing but silent bananas."),
    ]
    hellaswag, piqa, arc, winogrande, lambada = [], [], [], [], []
    for index, (context, good, bad) in enumerate(sentences):
        hellaswag.append(
            {
                "ind": index,
                "activity_label": "Programming",
                "ctx_a": context,
                "ctx_b": "then",
                "ctx": context + " then",
                "endings": [good, bad, "the " + bad, good.upper()],
                "source_id": f"doc-{index}",
                "split": "val",
                "split_type": "indomain",
                "label": str(index % 2),
            }  # fmt: skip
        )
        piqa.append({"goal": f"How do you {context.lower()}?", "sol1": good, "sol2": bad, "label": index % 2})
        arc.append(
            {
                "id": f"q{index}",
                "question": f"What does {context.lower()}?",
                "choices": {"text": [good, bad, "none", "all of these"], "label": ["A", "B", "C", "D"]},
                "answerKey": "ABCD"[index % 4],
            }  # fmt: skip
        )
        winogrande.append(
            {"sentence": f"{context} _ quickly.", "option1": good, "option2": bad, "answer": "12"[index % 2]}
        )
        lambada.append({"text": f"{context} {good} {context} the value"})
    _write_jsonl(data_dir / "hellaswag" / "validation.jsonl", hellaswag)
    _write_jsonl(data_dir / "piqa" / "validation.jsonl", piqa)
    _write_jsonl(data_dir / "arc_easy" / "test.jsonl", arc)
    _write_jsonl(data_dir / "arc_challenge" / "test.jsonl", arc[::-1])
    _write_jsonl(data_dir / "winogrande" / "validation.jsonl", winogrande)
    _write_jsonl(data_dir / "lambada_openai" / "test.jsonl", lambada)
    gsm8k = [
        {"question": f"What is {a} plus {a}?", "answer": f"{a} plus {a} is {2 * a}.\n#### {2 * a}"}
        for a in range(1, 8)
    ]
    _write_jsonl(data_dir / "gsm8k" / "test.jsonl", gsm8k[:2])
    truthfulqa = [
        {"question": f"What does {context.lower()}?", "mc1_targets": {"choices": [good, bad], "labels": [1, 0]},
         "mc2_targets": {"choices": [good, good.upper(), bad], "labels": [1, 1, 0]}}
        for context, good, bad in sentences
    ]  # fmt: skip
    _write_jsonl(data_dir / "truthfulqa_mc2" / "validation.jsonl", truthfulqa)
    ifeval = [{"key": 1, "prompt": "Write one sentence without commas.", "instruction_id_list": ["punctuation:no_comma"],
               "kwargs": [{}]}]  # fmt: skip
    _write_jsonl(data_dir / "ifeval" / "train.jsonl", ifeval)
    _write_jsonl(data_dir / "gsm8k" / "train.jsonl", gsm8k[2:])


def _documents(source: str, count: int) -> list[str]:
    return [doc for index, doc in enumerate(corpus.iter_documents(source, max_documents=count)) if index % 20 != 19]


def train_tiny_run(run_dir: Path) -> Path:
    """Train a tiny model on embedded-corpus documents the sanity gate holds out none of; save a DCP checkpoint."""
    from genesis_hf.pretrain.checkpoint import CheckpointManager, capture_rng_state

    # The run's mixture, written as local files: the sanity gate reads its validation split (documents 19, 39, ...).
    sources = []
    for source, count in (("stdlib-docs", 60), ("stdlib-code", 20)):
        _write_jsonl(run_dir / f"{source}.jsonl", [{"text": text} for text in corpus.iter_documents(source, count)])
        sources.append({"name": source, "location": str(run_dir / f"{source}.jsonl"), "weight": 0.5})
    mixture = run_dir / "mixture.yaml"
    mixture.write_text(json.dumps({"name": "eval-test", "holdout_every": 20, "sources": sources}))
    documents = _documents("stdlib-docs", 60) + _documents("stdlib-code", 20)
    tokenizer = train_tokenizer(documents, 300)
    add_chat_tokens(tokenizer)
    ids = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    torch.manual_seed(0)
    config = GenesisConfig.from_preset(
        "debug", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, max_position_embeddings=512
    )
    model = GenesisForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        batch = rows[torch.randint(0, len(rows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    manager = CheckpointManager(
        run_dir, save_total_limit=None, milestone_steps=None, async_save=False,
        run_config={"model": "debug", "mixture": str(mixture)}, model_config=config, tokenizer=tokenizer,
    )  # fmt: skip
    state = {"step": TRAIN_STEPS, "tokens_seen": TRAIN_STEPS * 16 * 64, "loss": loss.item()}
    manager.save(TRAIN_STEPS, model, optimizer, state, {"data_loader": {}, "rng": capture_rng_state()})
    manager.close()
    return run_dir / "checkpoints" / f"step-{TRAIN_STEPS:07d}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("eval-home")
    values = {"HF_HOME": str(home / "hf"), "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_OFFLINE": "1"}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    yield {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def run(tmp_path_factory, env):
    """The tiny run's checkpoint, its hf/llama/gguf exports (fp32) and a local task folder."""
    from genesis_hf.publish.export import export_checkpoint

    root = tmp_path_factory.mktemp("eval-run")
    checkpoint = train_tiny_run(root / "run")
    exports = {}
    for export_format in ("hf", "llama", "gguf"):
        result = export_checkpoint(checkpoint, root / export_format, export_format=export_format, dtype="fp32")
        exports[export_format] = root / export_format / (result.gguf_file or "")
    result = export_checkpoint(checkpoint, root / "gguf-bf16", export_format="gguf", dtype="bf16")
    exports["gguf_bf16"] = root / "gguf-bf16" / result.gguf_file
    write_local_benchmarks(root / "data")
    assert cli.main(["eval_tasks", "--data_dir", str(root / "data"), "--output_dir", str(root / "tasks")]) == 0
    return {"checkpoint": checkpoint, **exports, "tasks": root / "tasks", "root": root}


def genesis_eval(model, output: Path, tasks: str, include_path, *extra: str) -> tuple[int, dict | None]:
    argv = ["eval", str(model), "--tasks", tasks, "--include_path", str(include_path), "--limit", LIMIT]
    rc = cli.main(argv + ["--batch_size", "2", "--output_path", str(output), "--log_samples", *extra])
    return rc, (json.loads(output.read_text()) if output.is_file() else None)


def _loglikelihoods(results: dict) -> dict[str, list[float]]:
    return {
        task: [response[0] for sample in samples for response in sample["filtered_resps"]]
        for task, samples in results["samples"].items()
    }


def test_checkpoint_hf_llama_gguf_give_equal_loglikelihoods(run, tmp_path, capsys):
    scores = {}
    for kind in ("checkpoint", "hf", "llama", "gguf", "gguf_bf16"):
        rc, results = genesis_eval(run[kind], tmp_path / f"{kind}.json", ",".join(LOGLIKELIHOOD_TASKS), run["tasks"])
        assert rc == 0, capsys.readouterr()
        scores[kind] = results
    reference = scores["checkpoint"]
    assert set(reference["results"]) == set(LOGLIKELIHOOD_TASKS)
    for task in LOGLIKELIHOOD_TASKS:
        assert reference["n-samples"][task]["effective"] == int(LIMIT)
    assert all(math.isfinite(value) for value in _loglikelihoods(reference)["lambada_openai"])
    for kind in ("hf", "llama", "gguf"):
        for task, values in _loglikelihoods(scores[kind]).items():
            expected = _loglikelihoods(reference)[task]
            assert max(abs(a - b) for a, b in zip(values, expected, strict=True)) < 1e-3, (kind, task)
        for task in LOGLIKELIHOOD_TASKS:
            assert scores[kind]["results"][task]["acc,none"] == reference["results"][task]["acc,none"], (kind, task)

    # A BF16 GGUF differs by its rounding only: measurably, and by far less than a mismatched export would.
    bf16_diff = max(
        abs(a - b)
        for task, values in _loglikelihoods(scores["gguf_bf16"]).items()
        for a, b in zip(values, _loglikelihoods(reference)[task], strict=True)
    )
    assert 1e-6 < bf16_diff < 0.1, bf16_diff

    genesis = reference["genesis"]
    assert genesis["kind"] == "training-checkpoint" and genesis["model_path"] == str(run["checkpoint"].resolve())
    assert (genesis["step"], genesis["tokens_seen"]) == (TRAIN_STEPS, TRAIN_STEPS * 16 * 64)
    assert genesis["lm_eval_version"] == __import__("lm_eval").__version__
    assert genesis["sanity_gate"]["ok"] and not genesis["sanity_gate"]["problems"]
    assert genesis["sanity_gate"]["held_out_source"].startswith("the run's validation split")
    assert genesis["scores_at_chance"] is None  # 3 documents per task: too few to call anything chance
    assert scores["hf"]["genesis"]["sanity_gate"]["held_out_source"].startswith("held-out documents of the embedded")
    assert reference["versions"]["hellaswag"] == 1.0 and reference["versions"]["lambada_openai"] == 1.0
    assert scores["gguf"]["genesis"]["gguf_file"] == run["gguf"].name
    # The file is what `genesis-hf export --eval-results` puts in the model card's model-index.
    from genesis_hf.model.card import read_eval_results

    card_results = {(r.dataset_type, r.metric_type): r.metric_value for r in read_eval_results(tmp_path / "hf.json")}
    assert card_results[("piqa", "acc")] == round(scores["hf"]["results"]["piqa"]["acc,none"], 4)
    # Nothing is overwritten: the same output path again is refused before any work.
    assert genesis_eval(run["hf"], tmp_path / "hf.json", "piqa", run["tasks"])[0] == 2
    assert "already exists" in capsys.readouterr().err


def test_the_seeds_lm_eval_command_gives_the_same_numbers(run, tmp_path, env):
    rc, ours = genesis_eval(run["hf"], tmp_path / "ours.json", ",".join(LOGLIKELIHOOD_TASKS), run["tasks"])
    assert rc == 0
    command = [
        str(VENV_BIN / "lm_eval"), "--model", "hf",
        "--model_args", f"pretrained={run['hf']},dtype=float32,trust_remote_code=True",
        "--tasks", ",".join(LOGLIKELIHOOD_TASKS), "--include_path", str(run["tasks"]), "--limit", LIMIT,
        "--batch_size", "auto:2", "--device", "cpu", "--output_path", str(tmp_path / "cli"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "cli").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())
    for task in LOGLIKELIHOOD_TASKS:
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                # Relative 1e-5: float32 sums over differently padded batches differ in the last bits, which a
                # perplexity near 1e6 turns into ~0.5 absolute; a wrong tokenizer or model is off by orders more.
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-9), (task, metric)
        assert ours["versions"][task] == theirs["versions"][task]


def test_generate_until_task_matches_greedy_transformers(run, tmp_path):
    rc, results = genesis_eval(run["hf"], tmp_path / "gsm8k.json", "gsm8k", run["tasks"], "--num_fewshot", "1")
    assert rc == 0
    assert set(results["results"]["gsm8k"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    model = AutoModelForCausalLM.from_pretrained(run["hf"], trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(run["hf"])
    sample = results["samples"]["gsm8k"][0]
    ((prompt, generation_kwargs),) = sample["arguments"]
    assert prompt.startswith("<|im_start|>"), "generative tasks run with the chat template"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    # The peer: greedy decoding without a KV cache, so a cache bug in the model cannot hide in both.
    until = generation_kwargs["until"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=32, do_sample=False, use_cache=False)
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    assert sample["resps"][0][0][: len(text)] == text[: len(sample["resps"][0][0])]


def shifted_tokenizer(tokenizer):
    """The same tokenizer with every id moved up by one (the last wraps to 0): the bug of a special token inserted
    at the front. Every id stays valid and the text still round-trips, but each id now names another embedding row."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    size = len(tokenizer)
    data["model"]["vocab"] = {token: (index + 1) % size for token, index in data["model"]["vocab"].items()}
    for token in data["added_tokens"]:
        token["id"] = (token["id"] + 1) % size
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token=tokenizer.eos_token
    )


def _load(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_sanity_gate_is_quiet_on_the_good_model_and_fires_on_broken_ones(run, tmp_path):
    model, tokenizer = _load(run["hf"])
    recorded = json.loads((run["hf"] / "genesis_checkpoint.json").read_text())["loss"]
    good = sanity.run_sanity_gate(model, tokenizer, recorded_loss=recorded)
    assert good.ok, good.message()

    other = shifted_tokenizer(tokenizer)
    mismatched = sanity.run_sanity_gate(model, other, recorded_loss=recorded)
    assert not mismatched.ok and "does not match its tokenizer or its export" in mismatched.message()

    # Q/K stored with llama.cpp's pairing but loaded as HF halves (a converter without the permutation).
    with torch.no_grad():
        for layer in model.model.layers:
            for projection, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, 2)):
                projection.weight.copy_(sanity._pair_interleaved(projection.weight.clone(), heads))
    interleaved = sanity.run_sanity_gate(model, tokenizer, recorded_loss=recorded)
    assert not interleaved.ok and "rotary layout" in interleaved.message(), interleaved.message()

    # Q/K rotated the other way (the sign of the sine flipped) on the good weights.
    model, _ = _load(run["hf"])
    with torch.no_grad():
        for layer in model.model.layers:
            for projection, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, 2)):
                projection.weight.copy_(sanity._reverse_rotation(projection.weight.clone(), heads))
    reversed_rotation = sanity.run_sanity_gate(model, tokenizer, recorded_loss=recorded)
    assert not reversed_rotation.ok and "rotated the other way the held-out loss drops" in reversed_rotation.message()


def test_what_the_gate_says_about_the_seeds_base_model():
    # The seed's numbers: training loss 1.93 at step 40,000, LAMBADA perplexity 3,360,048, vocabulary 49,152.
    report = sanity.SanityReport(
        held_out_loss=math.log(3_360_048), held_out_source="held-out text", num_tokens=2048, vocab_size=49_152,
        recorded_loss=1.93, recorded_loss_kind="loss",
    )  # fmt: skip
    message = sanity.judge(report).message()
    assert message.startswith("This model does not match its tokenizer or its export: held-out perplexity 3,360,048.0")
    assert "its scores will sit at chance, yet the run recorded loss 1.930 (perplexity 6.9)" in message
    # Perplexity in the thousands fires even without a recorded loss; a healthy model's does not.
    assert not sanity.judge(dataclasses.replace(report, held_out_loss=math.log(2500), recorded_loss=None)).ok
    assert sanity.judge(dataclasses.replace(report, held_out_loss=math.log(25), recorded_loss=None)).ok


def test_eval_exits_non_zero_when_the_gate_fires_unless_told_not_to(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in run["hf"].iterdir():
        if item.is_file() and not item.name.startswith("tokenizer"):
            (broken / item.name).write_bytes(item.read_bytes())
    shifted_tokenizer(AutoTokenizer.from_pretrained(run["hf"])).save_pretrained(broken)
    rc, results = genesis_eval(broken, tmp_path / "broken.json", "piqa", run["tasks"])
    output = capsys.readouterr().out
    assert rc == 1 and results is None and "does not match its tokenizer or its export" in output
    rc, results = genesis_eval(broken, tmp_path / "forced.json", "piqa", run["tasks"], "--no_sanity_gate")
    assert rc == 0 and results["genesis"]["sanity_gate"] == {**results["genesis"]["sanity_gate"], "ok": False}
    assert results["genesis"]["sanity_gate"]["ignored"] is True


def test_report_table_and_chart(run, tmp_path):
    base = {
        "results": {"piqa": {"acc,none": 0.5, "acc_stderr,none": 0.05}, "lambada_openai": {"perplexity,none": 3e6}}
    }
    sft = {
        "results": {"piqa": {"acc,none": 0.625, "acc_stderr,none": 0.04}, "lambada_openai": {"perplexity,none": 20.0}}
    }
    engagement = {"results": {"engagement": {"curiosity,none": 0.7}}}  # the constitution stage's benchmark shape
    for name, data in (("base", base), ("sft", sft), ("engagement", engagement)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    files = [str(tmp_path / f"{name}.json") for name in ("base", "sft", "engagement")]
    assert cli.main(["report", *files, "--output_dir", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| piqa | acc | sft | 0.6250 | 0.0400 | 0.5000 | +0.1250 |" in table
    assert "| lambada_openai | perplexity | base | 3,000,000 |  |  |  |" in table
    assert "| engagement | curiosity | engagement | 0.7000 |" in table
    from PIL import Image

    with Image.open(tmp_path / "report" / "report.png") as image:
        assert image.format == "PNG" and image.width >= 600
    # A second report into the same folder would overwrite it: refused.
    assert cli.main(["report", *files, "--output_dir", str(tmp_path / "report")]) == 2


@pytest.mark.parametrize(
    ("layout", "message"),
    [({"hellaswag/train.txt": ""}, "one format"), ({"arc_easy/validation.jsonl": "{}"}, "test.jsonl"),
     ({"gsm8k/test.jsonl": "{}"}, "train"), ({"squad/test.jsonl": "{}"}, "unknown: squad")],
)  # fmt: skip
def test_eval_tasks_rejects_bad_layouts(tmp_path, capsys, layout, message):
    for name, text in layout.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text(text)
    assert cli.main(["eval_tasks", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "t")]) == 2
    assert message in capsys.readouterr().err


def test_a_hub_repo_at_a_revision(run, tmp_path):
    from huggingface_hub import HfApi

    from genesis_hf.testing import HubServer

    server = HubServer().start()
    try:
        api = HfApi(endpoint=server.endpoint, token=server.write_token)
        repo = "alice/genesis-tiny"
        api.create_repo(repo)
        api.create_branch(repo, branch=f"step-{TRAIN_STEPS:07d}")
        api.upload_folder(repo_id=repo, folder_path=run["hf"], revision=f"step-{TRAIN_STEPS:07d}")
        command = [str(VENV_BIN / "genesis-hf"), "eval", f"{repo}@step-{TRAIN_STEPS:07d}", "--tasks", "piqa"]
        command += ["--include_path", str(run["tasks"]), "--limit", LIMIT, "--output_path", str(tmp_path / "hub.json")]
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **server.client_env()}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    genesis = json.loads((tmp_path / "hub.json").read_text())["genesis"]
    assert (genesis["kind"], genesis["model_path"], genesis["revision"]) == ("hub", repo, f"step-{TRAIN_STEPS:07d}")
    assert (genesis["step"], genesis["tokens_seen"]) == (TRAIN_STEPS, TRAIN_STEPS * 16 * 64)
    assert genesis["sanity_gate"]["ok"]


def test_run_folders_resolve_to_their_final_model_or_newest_checkpoint(run, tmp_path):
    from genesis_hf.evaluate.harness import export_for_evaluation, resolve_target

    run_dir = run["checkpoint"].parent.parent
    target = resolve_target(str(run_dir), tmp_path / "work", log=print)
    assert (target.kind, target.step, target.pretrained) == (
        "training-checkpoint",
        TRAIN_STEPS,
        str(run["checkpoint"]),
    )
    export_for_evaluation(target, tmp_path / "work", export_dtype="fp32", log=print)
    assert Path(target.pretrained, "config.json").is_file() and target.checkpoint == str(run["checkpoint"])
    # A pretraining run's final/ (save_pretrained + the checkpoint it came from) is preferred over re-exporting.
    finished = tmp_path / "finished"
    (finished / "final").mkdir(parents=True)
    for item in run["hf"].iterdir():
        (finished / "final" / item.name).write_bytes(item.read_bytes())
    (finished / "final" / "genesis_checkpoint.json").unlink()
    (finished / "final" / "training_checkpoint.json").write_text(json.dumps({"checkpoint": str(run["checkpoint"])}))
    target = resolve_target(str(finished), tmp_path / "work2", log=print)
    assert (target.kind, target.pretrained) == ("hf", str((finished / "final").resolve()))
    assert (target.step, target.recorded_loss_kind, target.mixture) == (
        TRAIN_STEPS,
        "loss",
        str(run_dir / "mixture.yaml"),
    )


def _bad_eval_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "typo.yaml").write_text("model: x\nlimt: 3\n")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    return [
        (["eval"], "MODEL is required"),
        (["eval", "--config", str(tmp_path / "typo.yaml")], "'limt' (did you mean 'limit'?)"),
        (["eval", "m", "--batch_size", "lots"], "--batch_size 'lots'"),
        (["eval", "m", "--limit", "0"], "--limit 0"),
        (["eval", "m", "--include_path", str(tmp_path / "nowhere")], "is not a folder"),
        (["eval", str(tmp_path / "missing-step"), "--tasks", "aligned"], "does not exist"),
        (["eval", str(tmp_path / "not-a-model"), "--tasks", "aligned"], "is a folder but not a model"),
    ]


def test_bad_eval_input_fails_early_with_the_value_and_the_fix(tmp_path, capsys):
    for argv, message in _bad_eval_inputs(tmp_path):
        assert cli.main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("genesis-hf eval: error:") and message in error, (argv, error)


def test_eval_reads_a_config_file_and_flags_override_it(run, tmp_path, capsys):
    config = {
        "model": str(run["llama"]),
        "tasks": "piqa,truthfulqa_mc2",
        "include_path": str(run["tasks"]),
        "limit": 2,
    }
    (tmp_path / "eval.yaml").write_text(json.dumps({**config, "output_path": str(tmp_path / "unused.json")}))
    argv = ["eval", "--config", str(tmp_path / "eval.yaml"), "--output_path", str(tmp_path / "llama.json")]
    assert cli.main(argv + ["--batch_size", "1"]) == 0, capsys.readouterr()
    results = json.loads((tmp_path / "llama.json").read_text())
    assert not (tmp_path / "unused.json").exists()
    assert set(results["results"]) == {"piqa", "truthfulqa_mc2"} and results["n-samples"]["piqa"]["effective"] == 2
    assert 0.0 <= results["results"]["truthfulqa_mc2"]["acc,none"] <= 1.0
    assert results["genesis"]["kind"] == "llama" and "trust_remote_code" not in results["config"]["model_args"]


def test_the_aligned_group_splits_into_raw_text_and_chat_template_tasks(run):
    from genesis_hf.evaluate.harness import load_task_manager, split_by_output_type

    task_manager = load_task_manager(["aligned", "hellaswag"], [str(run["tasks"])])
    assert split_by_output_type(task_manager, ["hellaswag", "aligned", "gsm8k"]) == (
        ["hellaswag", "truthfulqa_mc2"],
        ["ifeval", "gsm8k"],
    )


def test_scores_at_chance_with_perplexity_in_the_thousands_are_named():
    from genesis_hf.evaluate.tasks import RANDOM_BASELINES

    def results(hellaswag: float, piqa: float, perplexity: float, documents: int = 10_042) -> dict:
        return {
            "results": {
                "hellaswag": {"acc_norm,none": hellaswag, "acc_norm_stderr,none": 0.0044},
                "piqa": {"acc,none": piqa, "acc_stderr,none": 0.0116},
                "lambada_openai": {"acc,none": 0.0, "perplexity,none": perplexity, "perplexity_stderr,none": 1.0},
            },
            "n-samples": {task: {"effective": documents} for task in ("hellaswag", "piqa", "lambada_openai")},
        }

    seed = sanity.scores_at_chance(results(0.2604, 0.5359, 3_360_048.0), RANDOM_BASELINES)
    assert seed.startswith("This model does not match its tokenizer or its export: every multiple-choice score")
    assert "hellaswag acc_norm 0.2604 (chance 0.25)" in seed and "lambada_openai perplexity 3,360,048" in seed
    assert sanity.scores_at_chance(results(0.41, 0.66, 25.0), RANDOM_BASELINES) is None
    assert sanity.scores_at_chance(results(0.2604, 0.5359, 25.0), RANDOM_BASELINES) is None  # undertrained, not broken
    # A --limit smoke run cannot tell chance from skill: no verdict (the tiny run here has LAMBADA perplexity ~1e5).
    assert sanity.scores_at_chance(results(0.2604, 0.5359, 3_360_048.0, documents=3), RANDOM_BASELINES) is None


def test_eval_tasks_never_overwrites_a_task_file_it_did_not_write(run, tmp_path, capsys):
    argv = ["eval_tasks", "--data_dir", str(run["root"] / "data"), "--output_dir", str(tmp_path)]
    (tmp_path / "piqa.yaml").write_text("task: piqa\n# the user's own\n")
    assert cli.main(argv) == 2 and "piqa.yaml already exist" in capsys.readouterr().err
    assert (tmp_path / "piqa.yaml").read_text() == "task: piqa\n# the user's own\n"
    (tmp_path / "piqa.yaml").unlink()
    assert cli.main(argv) == 0 and cli.main(argv) == 0  # its own files are rewritten


MMLU_SUBJECTS = ("anatomy", "astronomy", "virology")


def _mmlu_records(subject: str, count: int, offset: int = 0) -> list[dict]:
    """cais/mmlu records: question, subject, choices (4 strings), answer (int 0-3)."""
    words = ["the value of the argument", "a purple elephant", "read its lines", "a class for parsing", "nothing"]
    return [
        {"question": f"What does the {subject} module return, case {index}?", "subject": subject,
         "choices": [words[(index + k) % 5] for k in range(4)], "answer": (index + offset) % 4}
        for index in range(count)
    ]  # fmt: skip


def _mmlu_loglikelihoods(model, tokenizer, subject: str, doc: dict) -> list[float]:
    """Independent of lm-eval: log P(" A".." D" | lm-eval's MMLU prompt), tokenized as whole string minus context."""
    letters = "ABCD"
    context = f"The following are multiple choice questions (with answers) about {subject}.\n\n{doc['question']}\n"
    context += "".join(f"{letter}. {choice}\n" for letter, choice in zip(letters, doc["choices"])) + "Answer:"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for letter in letters:
        ids = tokenizer(context + " " + letter, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(logits[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return scores


def test_mmlu_offline_subjects_score_as_computed_independently(run, tmp_path, capsys):
    data = tmp_path / "data" / "mmlu"
    for offset, subject in enumerate(MMLU_SUBJECTS):
        _write_jsonl(data / subject / "test.jsonl", _mmlu_records(subject, 3, offset))
        _write_jsonl(data / subject / "dev.jsonl", _mmlu_records(subject, 2))
    argv = ["eval_tasks", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "tasks")]
    assert cli.main(argv) == 2
    assert "lacks 54 of the 57 MMLU subjects: abstract_algebra," in capsys.readouterr().err
    assert cli.main([*argv, "--subjects", ",".join(MMLU_SUBJECTS)]) == 0
    # A subset is not the mmlu group: no group YAML, and its tasks join none of the group's tags.
    from lm_eval.tasks import TaskManager

    index = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).task_index
    assert set(index) == {f"mmlu_{subject}" for subject in MMLU_SUBJECTS}
    tasks = ",".join(f"mmlu_{subject}" for subject in MMLU_SUBJECTS)
    rc, results = genesis_eval(run["hf"], tmp_path / "mmlu.json", tasks, tmp_path / "tasks", "--no_sanity_gate")
    assert rc == 0, capsys.readouterr()
    model, tokenizer = _load(run["hf"])
    for offset, subject in enumerate(MMLU_SUBJECTS):
        docs = _mmlu_records(subject, 3, offset)
        scores = [_mmlu_loglikelihoods(model, tokenizer, subject, doc) for doc in docs]
        samples = sorted(results["samples"][f"mmlu_{subject}"], key=lambda sample: sample["doc_id"])
        logged = [[response[0] for response in sample["filtered_resps"]] for sample in samples]
        assert logged == [pytest.approx(values, abs=1e-4) for values in scores], subject
        accuracy = sum(max(range(4), key=row.__getitem__) == doc["answer"] for row, doc in zip(scores, docs)) / 3
        assert results["results"][f"mmlu_{subject}"]["acc,none"] == pytest.approx(accuracy), subject


def test_mmlu_group_offline_from_one_file_per_split(run, tmp_path, capsys):
    from datasets import Dataset

    from genesis_hf.evaluate.mmlu import mmlu_subjects

    subjects = list(mmlu_subjects())
    assert len(subjects) == 57
    records = [record for index, s in enumerate(subjects) for record in _mmlu_records(s, 1, index)]
    # As in a Hub snapshot of cais/mmlu: its `all/` config, parquet shards.
    (tmp_path / "data" / "mmlu" / "all").mkdir(parents=True)
    Dataset.from_list(records).to_parquet(tmp_path / "data" / "mmlu" / "all" / "test-00000-of-00001.parquet")
    argv = ["eval_tasks", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "tasks")]
    assert cli.main(argv) == 0
    split = (tmp_path / "tasks" / "mmlu_data" / "virology" / "test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in split] == [r for r in records if r["subject"] == "virology"]
    rc, results = genesis_eval(run["hf"], tmp_path / "mmlu.json", "mmlu", tmp_path / "tasks", "--no_sanity_gate")
    assert rc == 0, capsys.readouterr()
    assert {f"mmlu_{s}" for s in subjects} <= set(results["results"])
    assert {"mmlu", "mmlu_stem", "mmlu_humanities"} <= set(results["results"])
    accuracies = [results["results"][f"mmlu_{s}"]["acc,none"] for s in subjects]
    assert results["results"]["mmlu"]["acc,none"] == pytest.approx(sum(accuracies) / 57)


def test_results_that_appear_during_the_run_are_kept(run, tmp_path):
    """Issue 21: the results file is created exclusively when written; one that appeared meanwhile is kept and the
    results go beside it under a timestamped name (the run says where)."""
    from genesis_hf.evaluate.cli import EvalArguments, run_eval

    output = tmp_path / "R.json"
    lines = []

    def log(line):
        lines.append(str(line))
        if "sanity" in str(line).lower() and not output.exists():  # another writer, while the suite runs
            output.write_text("the user's file\n")

    arguments = EvalArguments(
        model=str(run["hf"]), tasks="piqa", include_path=str(run["tasks"]), limit=3, batch_size="2",
        output_path=str(output),
    )  # fmt: skip
    code, results = run_eval(arguments, log=log)
    assert code == 0 and output.read_text() == "the user's file\n"
    written = [path for path in tmp_path.glob("R.*.json")]
    assert len(written) == 1 and json.loads(written[0].read_text())["genesis"]["model"] == str(run["hf"])
    assert any(f"wrote the results to {written[0]}" in line for line in lines)


def test_a_truncated_safetensors_file_is_one_line(run, tmp_path, capsys):
    broken = tmp_path / "truncated"
    shutil.copytree(run["hf"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert cli.main(["eval", str(broken), "--tasks", "piqa", "--include_path", str(run["tasks"]),
                     "--output_path", str(tmp_path / "r.json")]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "model.safetensors" in error and "truncated" in error, error
    assert not (tmp_path / "r.json").exists()
