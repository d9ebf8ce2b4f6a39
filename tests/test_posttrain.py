"""Post-training: chat setup, assistant-only labels against TRL's own pipeline, mixtures, bad input, LoRA, and the SFT
then DPO recipes through `accelerate launch` as the README runs them.

The base model is a `debug`-preset Genesis trained for a few steps (`genesis_hf.testing.build_tiny_model_folder`)
with a 300-token tokenizer and no chat tokens, exactly the state of a pretraining output before SFT.
"""

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from genesis_hf.tokenizer import CHATML_TOKENS

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IM_START, IM_END = CHATML_TOKENS[:2]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 6 times 7?"},
    {"role": "assistant", "content": "<think>6 * 7 = 42.</think>It is 42."},
    {"role": "user", "content": "And 6 times 8?"},
    {"role": "assistant", "content": "48."},
]
SHORT_CONVERSATION = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from genesis_hf.testing import build_tiny_model_folder

    folder = tmp_path_factory.mktemp("posttrain") / "base"
    build_tiny_model_folder(folder, chat_tokens=False, metrics=False)
    return folder


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe_in_process(name: str, argv: list[str]) -> int:
    from accelerate.state import AcceleratorState

    try:
        return load_recipe(name).main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def chat_base(base_dir: Path):
    from genesis_hf.posttrain.model import chat_model

    model, tokenizer, setup, _ = chat_model(str(base_dir))
    return model, tokenizer, setup


def expected_ids_and_labels(tokenizer, messages) -> tuple[list[int], list[int]]:
    """ChatML rendered by hand, piece by piece: the labels are each assistant reply and its <|im_end|>, nothing else."""
    start, end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, labels = [], []
    for message in messages:
        header = [start, *encode(message["role"] + "\n")]
        ids += header
        labels += [-100] * len(header)
        body = [*encode(message["content"]), end]
        ids += body
        labels += body if message["role"] == "assistant" else [-100] * len(body)
        ids += encode("\n")
        labels += [-100] * len(encode("\n"))
    return ids, labels


def sft_trainer(model, tokenizer, dataset, tmp_path: Path, **overrides):
    from trl import SFTConfig, SFTTrainer

    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        assistant_only_loss=True,
        max_length=512,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=2,
        max_steps=1,
        shuffle_dataset=False,
    )
    return SFTTrainer(
        model=model,
        args=SFTConfig(**{**settings, **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Chat setup


def test_chat_setup_appends_tokens_with_mean_rows_and_stops_at_im_end(base_dir):
    from transformers import AutoModelForCausalLM

    from genesis_hf.posttrain.chat import prepare_chat_model

    old = AutoModelForCausalLM.from_pretrained(base_dir).get_input_embeddings().weight.detach().clone()
    model, tokenizer, setup = chat_base(base_dir)
    assert setup.added_tokens == {IM_START: 300, IM_END: 301, "<think>": 302, "</think>": 303}
    assert "<|im_end|> = 301" in setup.describe() and "mean" in setup.describe()
    rows = model.get_input_embeddings().weight.detach()
    assert rows.shape == (304, old.shape[1])
    assert torch.equal(rows[:300], old)
    for row in rows[300:]:
        assert torch.equal(row, old.mean(dim=0))
    assert model.get_output_embeddings().weight.data_ptr() == rows.data_ptr()  # tied: the head has the same rows
    assert tokenizer.eos_token == IM_END and model.generation_config.eos_token_id[0] == 301
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id == 0 != tokenizer.eos_token_id
    # A second call changes nothing.
    again = prepare_chat_model(model, tokenizer)
    assert again.added_tokens == {} and len(tokenizer) == 304 and model.get_input_embeddings().weight.shape[0] == 304


def test_template_without_generation_markers_is_an_error():
    from genesis_hf.posttrain.chat import ChatSetupError, check_generation_markers
    from genesis_hf.tokenizer import CHATML_TEMPLATE

    plain = CHATML_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(ChatSetupError, match="no \\{% generation %\\}"):
        check_generation_markers(plain)
    with pytest.raises(ChatSetupError, match="has none"):
        check_generation_markers(None)
    check_generation_markers(CHATML_TEMPLATE)
    check_generation_markers(plain, assistant_only_loss=False)


# ---------------------------------------------------------------------------------------------------------------------
# Assistant-only labels, checked token by token against TRL's own dataset preparation and collator


def test_assistant_labels_token_by_token_without_packing(base_dir, tmp_path):
    from datasets import Dataset

    model, tokenizer, _ = chat_base(base_dir)
    expected_ids, expected_labels = expected_ids_and_labels(tokenizer, CONVERSATION)
    trainer = sft_trainer(model, tokenizer, Dataset.from_list([{"messages": CONVERSATION}]), tmp_path)
    row = trainer.train_dataset[0]
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels
    batch = trainer.data_collator([row])
    assert batch["labels"][0].tolist() == expected_labels
    trained = tokenizer.decode([token for token in expected_labels if token != -100])
    assert trained == "<think>6 * 7 = 42.</think>It is 42.<|im_end|>48.<|im_end|>"


def test_assistant_labels_token_by_token_with_packing_and_no_attention_across(base_dir, tmp_path):
    from datasets import Dataset

    model, tokenizer, _ = chat_base(base_dir)
    conversations = [CONVERSATION, SHORT_CONVERSATION]
    expected = [expected_ids_and_labels(tokenizer, messages) for messages in conversations]
    dataset = Dataset.from_list([{"messages": messages} for messages in conversations])
    trainer = sft_trainer(model, tokenizer, dataset, tmp_path, packing=True, packing_strategy="bfd")
    (row,) = list(trainer.train_dataset)
    # Best-fit-decreasing packing puts the longer conversation first.
    assert row["seq_lengths"] == [len(expected[0][0]), len(expected[1][0])]
    assert row["input_ids"] == expected[0][0] + expected[1][0]
    assert row["labels"] == expected[0][1] + expected[1][1]
    batch = trainer.data_collator([row])
    assert batch["labels"][0].tolist() == expected[0][1] + expected[1][1]
    positions = batch["position_ids"][0].tolist()
    assert positions == list(range(len(expected[0][0]))) + list(range(len(expected[1][0])))
    # Packed logits equal each conversation's own logits: nothing attends across the boundary.
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in expected]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_sft_learns_to_answer_and_generation_stops_at_im_end(base_dir, tmp_path):
    from datasets import Dataset

    model, tokenizer, _ = chat_base(base_dir)
    dataset = Dataset.from_list([{"messages": SHORT_CONVERSATION}] * 16)
    trainer = sft_trainer(
        model, tokenizer, dataset, tmp_path, max_steps=40, learning_rate=1e-2, per_device_train_batch_size=8,
        lr_scheduler_type="constant", logging_steps=40, disable_tqdm=True,
    )  # fmt: skip
    trainer.train()
    model = trainer.model.eval()
    prompt = tokenizer.apply_chat_template(SHORT_CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt")
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        output = model.generate(prompt_ids, max_new_tokens=20, do_sample=False)
    new_tokens = output[0, prompt_ids.shape[1] :].tolist()
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.decode(new_tokens, skip_special_tokens=True) == "hi"
    assert len(new_tokens) < 20


# ---------------------------------------------------------------------------------------------------------------------
# An SFT run's outputs: listed by `genesis-hf checkpoints` and the playground, and chatted with in the playground


@pytest.fixture(scope="module")
def sft_run(base_dir, tmp_path_factory) -> Path:
    """`recipes/sft.py` trained on one short conversation ("Say hi." -> "hi"): TRL's checkpoint-15 and checkpoint-30,
    then final/."""
    root = tmp_path_factory.mktemp("sft-run")
    data = write_jsonl(root / "hi.jsonl", [{"messages": SHORT_CONVERSATION}] * 16)
    out = root / "run"
    argv = ["--model_name_or_path", str(base_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "30", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
            "--max_length", "64", "--save_strategy", "steps", "--save_steps", "15", "--logging_steps", "5",
            "--disable_tqdm", "true"]  # fmt: skip
    assert run_recipe_in_process("sft", argv) == 0
    return out


def test_checkpoints_lists_an_sft_runs_trainer_checkpoints_and_final(sft_run, capsys):
    from genesis_hf.cli import main as cli_main
    from genesis_hf.playground import CheckpointSource

    history = json.loads((sft_run / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    logged = {record["step"]: record for record in history if "loss" in record}
    assert cli_main(["checkpoints", str(sft_run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(entry["name"], entry["step"], entry["kind"]) for entry in listed] == [
        ("checkpoint-15", 15, "hf"),
        ("checkpoint-30", 30, "hf"),
        ("final", 30, "hf"),
    ]
    assert [entry["loss"] for entry in listed] == [logged[15]["loss"], logged[30]["loss"], logged[30]["loss"]]
    # TRL counts the tokens it trained on (`num_tokens`); the Trainer's own counter stays 0 unless asked for.
    assert [entry["tokens_seen"] for entry in listed[:2]] == [logged[15]["num_tokens"], logged[30]["num_tokens"]]
    source = CheckpointSource(runs=sft_run)
    assert [(entry.name, entry.step) for entry in source.list_checkpoints()] == [
        (entry["name"], entry["step"]) for entry in listed
    ]


def test_playground_chat_on_an_sft_run_answers_through_chatml_and_stops_at_im_end(sft_run):
    import socket

    from gradio_client import Client
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genesis_hf.playground import CheckpointSource, Playground, build_app, launch_app

    demo = build_app(Playground(CheckpointSource(runs=sft_run), cache_size=2, concurrency=1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch_app(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        # checkpoint, message, system prompt, history, max_new_tokens, temperature 0 (greedy), top_p, top_k, rep, seed
        replies = {
            name: client.predict(name, "Say hi.", "", [], 20, 0.0, 1.0, 0, 1.0, 0, api_name="/chat")
            for name in ("final", "checkpoint-30")
        }
    finally:
        demo.close()
    model = AutoModelForCausalLM.from_pretrained(sft_run / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(sft_run / "final")
    prompt = tokenizer.apply_chat_template(
        SHORT_CONVERSATION[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    assert tokenizer.decode(prompt[0]) == f"{IM_START}user\nSay hi.{IM_END}\n{IM_START}assistant\n"
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=20, do_sample=False)
    new_tokens = output[0, prompt.shape[1] :].tolist()
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids(IM_END) and len(new_tokens) < 20
    # The reply is what transformers' greedy generate() says up to <|im_end|> (no template text, no second turn).
    assert replies["final"] == replies["checkpoint-30"] == tokenizer.decode(new_tokens[:-1])
    assert replies["final"].strip() and IM_START not in replies["final"] and "user" not in replies["final"]


# ---------------------------------------------------------------------------------------------------------------------
# Data: conversion, mixtures and statistics, embedded data, bad input


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_mixture_converts_each_schema_dedups_shuffles_and_counts_tokens(base_dir, tmp_path):
    from datasets import Dataset

    from genesis_hf.posttrain.data import build_sft_dataset, load_sft_mixture, mixture_statistics

    sharegpt = [
        {"conversations": [{"from": "human", "value": f"Hello {i}"}, {"from": "gpt", "value": f"Hi {i}!"}]}
        for i in range(5)
    ]
    instruction = [{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"} for i in range(4)]
    instruction.append(dict(instruction[0]))  # an exact duplicate
    query = [{"query": f"What is {i} squared?", "response": f"{i * i}"} for i in range(3)]
    constitution = [{"messages": CONVERSATION, "principle": "be honest"}]
    write_jsonl(tmp_path / "hermes.jsonl", sharegpt)
    write_jsonl(tmp_path / "alpaca.jsonl", instruction)
    Dataset.from_list(query).to_parquet(str(tmp_path / "math.parquet"))
    write_jsonl(tmp_path / "sft.jsonl", constitution)
    sources = [
        {"name": "hermes", "location": str(tmp_path / "hermes.jsonl"), "count": 4},
        {"name": "alpaca", "location": str(tmp_path / "alpaca.jsonl")},
        {"name": "math", "location": str(tmp_path / "math.parquet"), "schema": "query"},
        {"name": "constitutional", "location": str(tmp_path / "sft.jsonl")},
    ]
    (tmp_path / "mixture.yaml").write_text(yaml.safe_dump({"name": "test", "seed": 3, "sources": sources}))
    mixture = load_sft_mixture(tmp_path / "mixture.yaml")
    dataset, skipped = build_sft_dataset(mixture)
    assert skipped == {"alpaca: duplicate": 1}
    assert sorted(dataset["source"]) == sorted(["hermes"] * 4 + ["alpaca"] * 4 + ["math"] * 3 + ["constitutional"])
    assert dataset["source"] != sorted(dataset["source"])  # shuffled ...
    assert build_sft_dataset(mixture)[0]["messages"] == dataset["messages"]  # ... with the seed
    by_text = {messages[0]["content"]: messages for messages in dataset["messages"]}
    assert by_text["Hello 0"] == [{"role": "user", "content": "Hello 0"}, {"role": "assistant", "content": "Hi 0!"}]
    assert by_text["What is 2 squared?"][1] == {"role": "assistant", "content": "4"}

    _, tokenizer, _ = chat_base(base_dir)
    stats = mixture_statistics(dataset, tokenizer, max_length=40)
    for name in ("hermes", "alpaca", "math", "constitutional"):
        conversations = [
            messages for messages, source in zip(dataset["messages"], dataset["source"]) if source == name
        ]
        counted = [expected_ids_and_labels(tokenizer, messages) for messages in conversations]
        tokens = sum(len(ids) for ids, _ in counted)
        trainable = sum(sum(label != -100 for label in labels) for _, labels in counted)
        entry = stats["sources"][name]
        assert entry["conversations"] == len(conversations)
        assert (entry["tokens"], entry["trainable_tokens"]) == (tokens, trainable)
        assert entry["overlong"] == sum(len(ids) > 40 for ids, _ in counted)
    assert stats["total"]["tokens"] == sum(entry["tokens"] for entry in stats["sources"].values())


def test_shipped_mixtures_have_the_seed_sources():
    from genesis_hf.posttrain.data import load_sft_mixture

    seed = load_sft_mixture("genesis-1b")
    counts = {source.name: source.count for source in seed.sources}
    assert counts == {
        "constitutional": 10_000,
        "smoltalk-magpie-ultra": 100_000,
        "openhermes-2.5": 200_000,
        "tulu-3-sft-mixture": 100_000,
        "metamathqa": 50_000,
    }
    assert {source.schema for source in seed.sources} == {"messages", "sharegpt", "query"}
    assert load_sft_mixture("default").sources[0].location == "embedded:sft"


def test_embedded_data_is_a_few_hundred_valid_conversations_and_pairs():
    from genesis_hf.posttrain import embedded
    from genesis_hf.posttrain.conversations import conversation_key, conversation_problem

    conversations = embedded.sft_conversations()
    assert 200 <= len(conversations) <= 1000
    assert all(conversation_problem(messages) is None for messages in conversations)
    assert len({conversation_key(messages) for messages in conversations}) > 0.95 * len(conversations)
    assert any(messages[0]["role"] == "system" for messages in conversations)
    assert any(len(messages) >= 4 for messages in conversations)
    assert sum("<think>" in messages[-1]["content"] for messages in conversations) > 50
    # The same in every process: no memory address of a default argument (`<function copy2 at 0x...>`) in the text,
    # which made the default SFT run's token count differ from run to run.
    assert not [m["content"] for c in conversations for m in c if re.search(r" at 0x[0-9a-fA-F]+", m["content"])]
    pairs = embedded.preference_pairs()
    assert len(pairs) >= 200
    assert all(pair["chosen"] != pair["rejected"] and pair["prompt"][0]["role"] == "user" for pair in pairs)


BAD_CONVERSATIONS = {
    "unknown role": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}],
    "empty assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
    "ends with": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}],
}  # fmt: skip


@pytest.mark.parametrize("reason", sorted(BAD_CONVERSATIONS))
def test_bad_conversations_raise_or_are_counted(reason):
    from genesis_hf.posttrain.conversations import ConversationError, SkipCounter, convert_rows

    rows = [{"messages": SHORT_CONVERSATION}, {"messages": BAD_CONVERSATIONS[reason]}]
    with pytest.raises(ConversationError, match=f"src row 1: .*{reason}.*--on_bad_example skip"):
        list(convert_rows(rows, "messages", source="src"))
    skipped = SkipCounter()
    kept = list(convert_rows(rows, "messages", source="src", on_bad_example="skip", skipped=skipped))
    assert kept == [SHORT_CONVERSATION] and skipped == {f"src: {reason}": 1}


def test_unconvertible_schema_names_the_columns(tmp_path):
    from genesis_hf.posttrain.conversations import ConversationError
    from genesis_hf.posttrain.data import SFTMixture, SFTSource, build_sft_dataset

    write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    mixture = SFTMixture(name="odd", sources=[SFTSource(name="odd", location=str(tmp_path / "odd.jsonl"))])
    with pytest.raises(ConversationError, match="columns \\['answer', 'question'\\]") as raised:
        build_sft_dataset(mixture)
    # Whatever mixture key the message suggests, the mixture parser accepts.
    assert "`columns:`" not in str(raised.value)


def test_overlong_conversations_are_dropped_or_kept_for_truncation_and_counted():
    from datasets import Dataset

    from genesis_hf.posttrain.data import apply_length_policy

    dataset = Dataset.from_list([{"messages": SHORT_CONVERSATION, "source": "s"}] * 4)
    kept, count = apply_length_policy(dataset, [10, 50, 20, 70], 30, "truncate")
    assert (len(kept), count) == (4, 2)
    dropped, count = apply_length_policy(dataset, [10, 50, 20, 70], 30, "drop")
    assert (len(dropped), count) == (2, 2)


def test_preference_pairs_plain_or_conversational_and_bad_pairs(tmp_path):
    from genesis_hf.posttrain.conversations import ConversationError
    from genesis_hf.posttrain.data import build_preference_dataset

    # The constitution pipeline's dpo.jsonl: chosen = the revision, rejected = the original.
    rows = [
        {"prompt": "Is the sky green?", "chosen": "No, it is blue.", "rejected": "Maybe.", "principle": "honest"},
        {"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"},
    ]
    path = write_jsonl(tmp_path / "dpo.jsonl", rows)
    with pytest.raises(ConversationError, match="row 1: chosen equals rejected"):
        build_preference_dataset(str(path))
    dataset, skipped = build_preference_dataset(str(path), on_bad_example="skip")
    assert dataset.column_names == ["prompt", "chosen", "rejected"] and len(dataset) == 1
    assert sum(skipped.values()) == 1
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(ConversationError, match="columns \\['bad', 'good', 'question'\\]"):
        build_preference_dataset(str(wrong))
    embedded_pairs, _ = build_preference_dataset("embedded:dpo")
    assert isinstance(embedded_pairs[0]["prompt"], list)


BAD_PAIRS = {
    "chosen unknown role": {"chosen": [{"role": "robot", "content": "beep"}]},
    "rejected empty assistant": {"rejected": [{"role": "assistant", "content": "  "}]},
    "chosen ends with": {"chosen": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]},
}


@pytest.mark.parametrize("reason", sorted(BAD_PAIRS))
def test_bad_preference_pairs_are_checked_like_sft_rows(reason, tmp_path):
    from genesis_hf.posttrain.conversations import ConversationError
    from genesis_hf.posttrain.data import build_preference_dataset

    good = {
        "prompt": [{"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    path = write_jsonl(tmp_path / "dpo.jsonl", [good, {**good, **BAD_PAIRS[reason]}])
    key, _, short = reason.partition(" ")
    with pytest.raises(ConversationError, match=f"row 1: prompt \\+ {key}: .*{short}.*--on_bad_example skip"):
        build_preference_dataset(str(path))
    dataset, skipped = build_preference_dataset(str(path), on_bad_example="skip")
    assert len(dataset) == 1 and skipped == {f"{path}: {reason}": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: bad input before expensive setup


def test_recipe_errors_are_one_line_and_come_first(tmp_path, capsys, monkeypatch):
    # The recipes' default paths (outputs/genesis-tiny/final, outputs/sft-tiny) are relative: resolve them in tmp_path,
    # never in the checkout, whose outputs/ may hold the main job's model (the README's first command).
    monkeypatch.chdir(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": BAD_CONVERSATIONS["empty assistant"]}])
    # The data is checked before the (missing) model is loaded.
    assert run_recipe_in_process("sft", ["--dataset_name", str(bad), "--output_dir", str(tmp_path / "o")]) == 1
    assert "row 0: message 1 is an empty assistant turn" in capsys.readouterr().err
    missing = ["--model_name_or_path", "outputs/genesis-tiny/final", "--output_dir", str(tmp_path / "o")]
    assert run_recipe_in_process("sft", missing) == 1
    assert "Run `.venv/bin/accelerate launch recipes/pretrain.py` first" in capsys.readouterr().err
    assert run_recipe_in_process("dpo", ["--learning_rte", "1e-5"]) == 1
    assert "Unknown command-line argument" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("learning_rte: 1.0e-5\n")
    assert run_recipe_in_process("sft", ["--config", str(tmp_path / "typo.yaml")]) == 1
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


BAD_LAUNCHES = {
    "malformed line": (["--dataset_name", "{bad}"], "line 2 is not valid JSON"),
    "empty file": (["--dataset_name", "{empty}"], "is empty"),
    "negative learning rate": (["--learning_rate", "-1e-3"], "learning_rate=-0.001"),
    "nan learning rate": (["--learning_rate", "nan"], "learning_rate=nan"),
    "zero max_steps": (["--max_steps", "0"], "max_steps=0"),
    "zero epochs": (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs=0"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAUNCHES))
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bad_data_and_settings_stop_with_one_line_and_leave_nothing(kind, case, tmp_path, capsys):
    row = {"messages": SHORT_CONVERSATION} if kind == "sft" else {"prompt": "a", "chosen": "b", "rejected": "c"}
    files = {
        "bad": (tmp_path / "bad.jsonl", json.dumps(row) + '\n{"messages": [oops\n'),
        "empty": (tmp_path / "empty.jsonl", ""),
        "good": (tmp_path / "good.jsonl", json.dumps(row) + "\n"),
    }
    for path, text in files.values():
        path.write_text(text)
    flags, expected = BAD_LAUNCHES[case]
    flags = [flag.format(**{name: path for name, (path, _) in files.items()}) for flag in flags]
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tmp_path / "never-loaded"), "--dataset_name", str(files["good"][0]),
            "--output_dir", str(out), "--max_steps", "2", *flags]  # fmt: skip
    assert run_recipe_in_process(kind, argv) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and expected in error.strip().splitlines()[-1], error[-2000:]
    assert error.strip().splitlines()[-1].startswith(f"recipes/{kind}.py: error:")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_targets_every_projection_and_merged_logits_equal_base_plus_adapter(base_dir):
    from peft import get_peft_model
    from trl import ModelConfig

    from genesis_hf.posttrain.model import LORA_TARGET_MODULES, lora_config, merge_lora

    model, _, setup = chat_base(base_dir)
    config = lora_config(ModelConfig(use_peft=True, lora_r=4), setup, tied_embeddings=True)
    assert set(config.target_modules) == set(LORA_TARGET_MODULES)
    assert config.modules_to_save == ["embed_tokens", "lm_head"]
    peft_model = get_peft_model(model, config)
    wrapped = {name.split(".")[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(LORA_TARGET_MODULES)
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter: LoRA B starts at zero
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    ids = torch.tensor([[300, 5, 17, 301, 9, 302, 40, 303, 301]])
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_adapter_config_names_the_hub_revision_it_was_trained_from(base_dir, tmp_path):
    """An adapter trained from `--model_name_or_path ORG/NAME --model_revision BRANCH` says so: stock PEFT loads the
    base at `base_model_name_or_path` and `revision` (main otherwise, which may hold another model or none)."""
    from peft import get_peft_model
    from trl import ModelConfig

    from genesis_hf.posttrain.model import lora_config

    model, _, setup = chat_base(base_dir)
    for revision, saved in (("step-0000004", "step-0000004"), ("main", None)):
        config = lora_config(ModelConfig(use_peft=True, lora_r=4, model_revision=revision), setup)
        get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path / revision)
        assert json.loads((tmp_path / revision / "adapter_config.json").read_text())["revision"] == saved


def test_sft_recipe_with_lora_saves_adapter_and_a_merged_model_equal_to_base_plus_adapter(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft-lora"
    argv = ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4",
            "--max_steps", "3", "--max_length", "64", "--learning_rate", "1e-2", "--disable_tqdm", "true"]  # fmt: skip
    assert run_recipe_in_process("sft", argv) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True, dtype=torch.float32).eval()
    base, _, _ = chat_base(base_dir)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[300, 5, 17, 301, 9, 302, 40, 303, 301]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        with adapted.disable_adapter():
            assert (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# SFT then DPO through `accelerate launch`, as the README runs them


README_SFT = ".venv/bin/accelerate launch recipes/sft.py"
README_DPO = ".venv/bin/accelerate launch recipes/dpo.py --model_name_or_path outputs/sft-tiny/final"


def launch(command: str, extra: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    words = command.split()
    words[0] = str(VENV_BIN / "accelerate")
    words[2] = str(REPO / words[2])
    result = subprocess.run([*words, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_readme_sft_then_dpo_through_accelerate_launch(base_dir, tmp_path, run_env):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    readme = " ".join((REPO / "README.md").read_text().replace("\\\n", " ").split())
    assert README_SFT in readme and README_DPO in readme
    shutil.copytree(base_dir, tmp_path / "outputs" / "genesis-tiny" / "final")
    tiny = [
        "--max_length",
        "96",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    sft = launch(README_SFT, ["--max_steps", "16", "--learning_rate", "3e-3", *tiny], tmp_path, run_env)
    assert "added <|im_start|> = 300, <|im_end|> = 301" in sft.stderr
    assert "genesis-embedded" in sft.stderr and "trainable" in sft.stderr
    sft_metrics = [
        record for record in metrics(tmp_path / "outputs" / "sft-tiny" / "metrics.jsonl") if "loss" in record
    ]
    assert sft_metrics[-1]["loss"] < sft_metrics[0]["loss"] - 0.3
    assert all("mean_token_accuracy" in record for record in sft_metrics)

    final = tmp_path / "outputs" / "sft-tiny" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == 304 and tokenizer.chat_template and "generation" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids(IM_END), 0]  # <|endoftext|>

    dpo = launch(README_DPO, ["--max_steps", "8", "--learning_rate", "2e-4", *tiny], tmp_path, run_env)
    assert "already has the ChatML tokens" in dpo.stderr
    dpo_metrics = [r for r in metrics(tmp_path / "outputs" / "dpo-tiny" / "metrics.jsonl") if "rewards/margins" in r]
    assert dpo_metrics[-1]["rewards/margins"] > dpo_metrics[0]["rewards/margins"]
    assert dpo_metrics[-1]["rewards/margins"] > 0 and "rewards/accuracies" in dpo_metrics[-1]
    assert (tmp_path / "outputs" / "dpo-tiny" / "final" / "model.safetensors").is_file()

    # `transformers serve`-style chat from the exported plain Llama folder: the template renders the prompt and the
    # Llama model answers with the same tokens as the Genesis model.
    from genesis_hf.publish.export import export_checkpoint

    export_checkpoint(final, tmp_path / "llama", export_format="llama", dtype="fp32")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    llama_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    prompt = llama_tokenizer.apply_chat_template(
        SHORT_CONVERSATION[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    header = llama_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert prompt[0, -len(header) :].tolist() == header
    with torch.no_grad():
        answer = llama.generate(prompt, max_new_tokens=8, do_sample=False)
        reference = model.eval().generate(prompt, max_new_tokens=8, do_sample=False)
    assert answer.tolist() == reference.tolist()

    listing = subprocess.run(
        [str(VENV_BIN / "genesis-hf"), "checkpoints", str(tmp_path / "outputs" / "sft-tiny")],
        capture_output=True, text=True, env=run_env, timeout=120,
    )  # fmt: skip
    assert listing.returncode == 0 and "final" in listing.stdout


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_configs_use_only_known_keys_and_the_seed_values(kind):
    from trl import DPOConfig, ModelConfig, SFTConfig

    from genesis_hf.args import check_keys, load_yaml
    from genesis_hf.posttrain.config import DPODataArguments, SFTDataArguments

    types = (SFTDataArguments, SFTConfig, ModelConfig) if kind == "sft" else (DPODataArguments, DPOConfig, ModelConfig)
    for name in ("genesis-tiny", "genesis-1b"):
        check_keys(load_yaml(REPO / "recipes" / "configs" / kind / f"{name}.yaml"), types, source=name)
    seed = load_yaml(REPO / "recipes" / "configs" / kind / "genesis-1b.yaml")
    if kind == "sft":
        # 2 per GPU x 2 GPUs x accumulation 8, sequence 2048, LR 2e-5 -> 2e-6 cosine, warmup 200, AdamW 0.9/0.95.
        assert (seed["per_device_train_batch_size"], seed["gradient_accumulation_steps"]) == (2, 8)
        assert (seed["max_length"], seed["learning_rate"], seed["lr_scheduler_kwargs"]) == (
            2048,
            2e-5,
            {"min_lr": 2e-6},
        )
        assert (seed["warmup_steps"], seed["weight_decay"], seed["num_train_epochs"]) == (200, 0.01, 1)
        assert (seed["adam_beta1"], seed["adam_beta2"], seed["mixture"]) == (0.9, 0.95, "genesis-1b")
    else:
        assert (seed["beta"], seed["loss_type"], seed["learning_rate"]) == (0.1, ["sigmoid"], 5e-7)


def test_plan_counts_sft_and_dpo_memory_for_the_1b_on_two_4090s(capsys):
    from genesis_hf.cli import main as cli_main
    from genesis_hf.pretrain.plan import estimate_memory, resolve_preset

    config = resolve_preset("genesis-1b", {"vocab_size": 49156})
    settings = dict(gpus=2, micro_batch=1, seq_len=2048, activation_checkpointing=True, gpu="RTX 4090")
    sft, dpo = estimate_memory(config, **settings, stage="sft"), estimate_memory(config, **settings, stage="dpo")
    pairs_as_sequences = estimate_memory(config, **{**settings, "micro_batch": 2}, stage="sft")
    # bf16 reference: half of 2 bytes per parameter on each of the 2 GPUs, plus the gathered embeddings and blocks.
    assert sft.reference_model_bytes == 0 and dpo.num_parameters < dpo.reference_model_bytes < 2 * dpo.num_parameters
    assert dpo.activations_bytes == pairs_as_sequences.activations_bytes
    assert dpo.logits_bytes == pairs_as_sequences.logits_bytes
    assert dpo.total_bytes > pairs_as_sequences.total_bytes + dpo.reference_model_bytes
    argv = [
        "plan",
        "--stage",
        "dpo",
        "--config",
        str(REPO / "recipes/configs/dpo/genesis-1b.yaml"),
        "--gpu",
        "RTX 4090",
    ]
    assert cli_main(argv) == 0
    report = capsys.readouterr().out
    assert report.startswith("DPO genesis-1b") and "reference model (bf16, no gradients)" in report
    assert "vocab 49156" in report and "RTX 4090" in report


def test_readme_sft_benchmark_shortened(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/python benchmarks/sft.py" in readme
    command = [sys.executable, str(REPO / "benchmarks" / "sft.py"), "--preset", "debug", "--steps", "2",
               "--rounds", "1", "--batch-size", "4", "--max-length", "64", "--threads", "1"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["tokens_per_second"]) == {"recipe", "plain_trl", "plain_trl_padded"}
    assert report["ratio_recipe_over_plain_trl_tokens_per_cpu_second"] > 0
    assert report["ratio_packed_over_padded_tokens_per_second"] > 0
    # Same data and settings: the recipe and the plain TRL run train on the same tokens (TRL's best-fit packing can
    # differ by a token or two between runs).
    assert abs(report["runs"]["recipe"][0]["tokens"] - report["runs"]["plain_trl"][0]["tokens"]) <= 2


def test_sft_push_to_hub_publishes_one_branch_per_checkpoint(base_dir, tmp_path):
    import os

    from genesis_hf.layout import HUB_STAGING_DIR as STAGING_DIR
    from genesis_hf.testing import HubServer

    server = HubServer().start()
    try:
        env = {**os.environ, **server.client_env(), "HF_TOKEN": server.write_token, "HF_HOME": str(tmp_path / "hf"),
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        flags = ["--model_name_or_path", str(base_dir), "--output_dir", str(tmp_path / "run"), "--max_steps", "4",
                 "--max_length", "64", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true",
                 "--push_to_hub", "true", "--hub_model_id", "alice/genesis-sft"]  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(REPO / "recipes" / "sft.py"), *flags],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        for step in (2, 4):
            files = server.branch_files("alice/genesis-sft", f"step-{step:07d}")
            assert {"model.safetensors", "config.json", "modeling_genesis.py", "chat_template.jinja"} <= set(files)
            assert json.loads(files["genesis_checkpoint.json"])["step"] == step
            # Each branch's card is the SFT model's: its stage and base, not a model trained from scratch.
            card = files["README.md"].decode()
            assert "Stage: SFT" in card and "sft" in card.split("---")[1] and "pretraining" not in card.split("---")[1]
        assert json.loads(server.branch_files("alice/genesis-sft", "main")["genesis_checkpoint.json"])["step"] == 4
        assert server.write_token not in result.stdout + result.stderr
        # The pusher's copies of checkpoint-2 and checkpoint-4 are gone, checkpoint-4's too although final/ was then
        # submitted for the same step; the Trainer's own folders are still there.
        assert not any((tmp_path / "run" / STAGING_DIR).iterdir())
        assert (tmp_path / "run" / "checkpoint-4" / "model.safetensors").is_file()
    finally:
        server.stop()


def test_checkpoints_the_trainer_rotates_away_before_their_upload_still_reach_the_hub(base_dir, tmp_path):
    import threading

    from datasets import Dataset
    from safetensors.torch import load, load_file

    from genesis_hf.events import TrainerEvents
    from genesis_hf.layout import HUB_STAGING_DIR as STAGING_DIR
    from genesis_hf.publish.export import export_checkpoint
    from genesis_hf.publish.listing import list_run_checkpoints
    from genesis_hf.publish.push import CheckpointPusher
    from genesis_hf.testing import HubServer

    model, tokenizer, _ = chat_base(base_dir)
    out = tmp_path / "trainer"
    trained = threading.Event()

    def upload_slower_than_training(checkpoint_dir: Path, out_dir: Path, step: int, branch: str) -> None:
        trained.wait(timeout=120)  # by now the Trainer has deleted checkpoint-1 and checkpoint-2 (save_total_limit 1)
        export_checkpoint(checkpoint_dir, out_dir, dtype="fp32", step=step, revision=branch, overwrite=True)

    saved = {}
    with HubServer() as server:
        pusher = CheckpointPusher(
            "alice/rotated", server.write_token, out, endpoint=server.endpoint, export_fn=upload_slower_than_training
        )
        trainer = sft_trainer(
            model, tokenizer, Dataset.from_list([{"messages": SHORT_CONVERSATION}] * 16), tmp_path, max_steps=3,
            learning_rate=1e-2, save_strategy="steps", save_steps=1, save_total_limit=1, disable_tqdm=True,
        )  # fmt: skip
        record = lambda folder, step: saved.__setitem__(step, load_file(folder / "model.safetensors"))  # noqa: E731
        trainer.add_callback(TrainerEvents([record, pusher]))
        trainer.train()
        assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-3"]
        # The pusher's copies wait in a hidden folder that `genesis-hf checkpoints` does not list.
        assert len(list((out / STAGING_DIR).iterdir())) == 3
        assert [entry.name for entry in list_run_checkpoints(out)] == ["checkpoint-3"]
        trained.set()
        pusher.close()
        for step in (1, 2, 3):
            files = server.branch_files("alice/rotated", f"step-{step:07d}")
            assert json.loads(files["genesis_checkpoint.json"])["step"] == step
            uploaded = load(files["model.safetensors"])
            for name in uploaded.keys() & saved[step].keys():
                assert torch.equal(uploaded[name], saved[step][name]), (step, name)
        assert saved[1]["model.norm.weight"].ne(saved[3]["model.norm.weight"]).any()  # three different models
    assert all(pusher.is_confirmed(step) for step in (1, 2, 3))
    assert not any((out / STAGING_DIR).iterdir())  # the pusher's copies are gone once confirmed
    assert (out / "checkpoint-3" / "optimizer.pt").is_file()  # the Trainer's own folder is untouched


def test_dpo_with_lora_uses_the_disabled_adapter_as_reference(base_dir, tmp_path):
    out = tmp_path / "dpo-lora"
    argv = ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4",
            "--max_steps", "3", "--max_length", "64", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--disable_tqdm", "true"]  # fmt: skip
    assert run_recipe_in_process("dpo", argv) == 0
    records = [record for record in metrics(out / "metrics.jsonl") if "rewards/margins" in record]
    # Step 1: the policy is the reference (LoRA's B starts at zero), so every reward is exactly 0.
    assert records[0]["rewards/chosen"] == records[0]["rewards/rejected"] == 0.0
    assert records[-1]["rewards/margins"] != 0.0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "final" / "config.json").is_file()


def test_starting_point_from_a_hub_repo_and_revision(base_dir, tmp_path):
    import os

    from huggingface_hub import HfApi

    from genesis_hf.testing import HubServer

    server = HubServer().start()
    try:
        api = HfApi(endpoint=server.endpoint, token=server.write_token)
        api.create_repo("alice/genesis-base")
        api.create_branch("alice/genesis-base", branch="step-0000004")
        api.upload_folder(repo_id="alice/genesis-base", folder_path=base_dir, revision="step-0000004")
        script = (
            "from genesis_hf.posttrain.model import chat_model\n"
            "model, tokenizer, setup, source = chat_model('alice/genesis-base', revision='step-0000004')\n"
            "print(source, setup.new_vocab_size, tokenizer.eos_token)\n"
        )
        env = {**os.environ, **server.client_env(), "HF_TOKEN": server.read_token, "HF_HOME": str(tmp_path / "hf")}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == ["alice/genesis-base", "304", IM_END]
        # main has no model: the revision is what was loaded.
        assert "config.json" not in server.branch_files("alice/genesis-base", "main")
    finally:
        server.stop()


def test_starting_points_pretraining_output_and_training_checkpoint(tmp_path, run_env, test_mixture):
    from genesis_hf.posttrain.model import chat_model

    config = {
        "model_preset": "debug", "model_overrides": {"vocab_size": 512}, "mixture": test_mixture, "seq_len": 32,
        "per_device_train_batch_size": 2, "tokens_per_step": 64, "max_steps": 2, "warmup_steps": 1, "save_steps": 1,
        "eval_steps": 0, "eval_batches": 1, "per_device_eval_batch_size": 2, "logging_steps": 1, "report_to": "none",
        "disable_tqdm": True, "output_dir": str(tmp_path / "pretrain"),
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--config", str(tmp_path / "run.yaml")],
        env=run_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.tensor([[512, 5, 17, 513, 9, 40, 513]])
    logits = {}
    for name, start in (
        ("run", tmp_path / "pretrain"),  # a pretraining output folder: its final/
        ("checkpoint", tmp_path / "pretrain" / "checkpoints" / "step-0000002"),  # DCP shards, no process group
    ):
        model, tokenizer, setup, source = chat_model(str(start))
        assert setup.added_tokens[IM_START] == 512 and len(tokenizer) == 516
        assert Path(source).name == ("final" if name == "run" else "step-0000002")
        with torch.no_grad():
            logits[name] = model.eval()(input_ids=ids).logits
    # final/ is exported from the last checkpoint: the same model either way.
    torch.testing.assert_close(logits["run"], logits["checkpoint"])


def test_sft_on_two_cpu_processes_trains_one_model_together(base_dir, tmp_path, run_env):
    out = tmp_path / "ddp"
    command = [
        str(VENV_BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs" / "ddp-cpu.yaml"),
        "--main_process_port", "0", str(REPO / "recipes" / "sft.py"), "--model_name_or_path", str(base_dir),
        "--output_dir", str(out), "--max_steps", "2", "--max_length", "64", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first = metrics(out / "metrics.jsonl")[0]
    # Two packed rows of at most 64 tokens per process: more than 128 tokens in step 1 means both processes counted
    # (without gloo each would train alone and write its own final/).
    assert first["step"] == 1 and first["num_tokens"] > 128
    assert result.stderr.count("Chat model in") == 1 and (out / "final" / "model.safetensors").is_file()
