import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from genesis_hf import cli, corpus
from genesis_hf.tokenizer import (
    CHATML_TEMPLATE,
    CHATML_TOKENS,
    EOS_TOKEN,
    add_chat_tokens,
    default_tokenizer,
    resize_embeddings_mean,
    train_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 1000

ROUND_TRIP_TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo(Bar):\n\tpass\n",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "emoji 😀🎉 and a family 👨\u200d👩\u200d👧 and flags 🇫🇷",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "e\u0301 (combining acute), n\u0303, \u00e9 precomposed, Ångström, ﬁ ligature",
    "   leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces\t\ttabs\r\nCRLF\n\n\n",
    " ",
    "\n",
    "",
    "\x00\x01\x7f control characters \u200b zero width",
    "a" * 300,
    "1234567890 + 0.5e-10 = x",
    "<think>not a chat tokenizer yet</think> <|endoftext|> inline",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>Add them.</think>4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus.default_corpus(max_documents_per_source=30), VOCAB_SIZE)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    add_chat_tokens(chat)
    assert len(tokenizer) == VOCAB_SIZE, "the base tokenizer must stay without chat tokens"
    return chat


def test_vocab_size_is_exact_and_eos_is_id_zero(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == 0
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 2048


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= token_id < VOCAB_SIZE for token_id in ids)
    assert tokenizer.decode(ids) == text


def test_round_trip_on_random_unicode(tokenizer):
    generator = random.Random(0)
    # ASCII, whitespace, Latin, CJK, emoji and astral planes; surrogates (U+D800..U+DFFF) are not valid UTF-8.
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    for _ in range(50):
        text = "".join(chr(generator.randint(*generator.choice(ranges))) for _ in range(generator.randint(0, 80)))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_every_byte_has_a_token(tokenizer):
    # Each byte symbol maps to one of ids 1..256, so any UTF-8 text (here every Latin-1 code point) encodes.
    text = "".join(chr(code_point) for code_point in range(1, 256))
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.unk_token_id is None
    assert set(tokenizer.convert_ids_to_tokens(list(range(1, 257)))) == set(pre_tokenizers.ByteLevel.alphabet())


def test_encode_adds_no_bos_or_eos(tokenizer):
    ids = tokenizer("hello world")["input_ids"]
    assert 0 not in ids
    assert tokenizer.encode("hello world") == ids
    # The eos typed in text is the eos token, which is how packed pretraining documents are separated.
    assert tokenizer.encode(f"a{EOS_TOKEN}b").count(0) == 1


def test_learned_merges_compress_text(tokenizer):
    text = "def function(self, argument):\n    return self.value\n"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_training_is_deterministic():
    texts = list(corpus.default_corpus(max_documents_per_source=5))
    first = train_tokenizer(texts, 400)
    second = train_tokenizer(texts, 400)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_unreachable_vocab_size_names_sizes_and_fix():
    with pytest.raises(ValueError, match=r"reached only \d+ tokens of the requested vocab_size=5000") as error:
        train_tokenizer(["tiny corpus, tiny corpus"] * 3, 5000)
    assert "more text" in str(error.value)


@pytest.mark.parametrize("vocab_size", [0, 256, 257, -3])
def test_too_small_vocab_size_is_an_error(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size} is too small.*at least 258"):
        train_tokenizer(["some text"], vocab_size)


def test_chat_tokens_are_the_next_four_ids():
    tokenizer = train_tokenizer(corpus.default_corpus(max_documents_per_source=5), 400)
    assert add_chat_tokens(tokenizer) == [400, 401, 402, 403]
    assert len(tokenizer) == 404
    assert tokenizer.convert_ids_to_tokens([400, 401, 402, 403]) == list(CHATML_TOKENS)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    # Idempotent: a second call adds nothing and returns the same ids.
    assert add_chat_tokens(tokenizer) == [400, 401, 402, 403]
    assert len(tokenizer) == 404


def test_chat_tokens_encode_as_single_ids(chat_tokenizer):
    start, end, think, end_think = (chat_tokenizer.convert_tokens_to_ids(token) for token in CHATML_TOKENS)
    ids = chat_tokenizer.encode("<|im_start|>user\nhi<|im_end|><think>x</think>")
    assert ids[0] == start and end in ids and think in ids and ids[-1] == end_think
    # <|im_start|>/<|im_end|> are special and vanish when skipped; <think>/</think> are kept in the text.
    assert chat_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi<think>x</think>"
    assert chat_tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|><think>x</think>"


def test_chat_template_renders_chatml(chat_tokenizer):
    rendered = chat_tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>Add them.</think>4<|im_end|>\n"
    )
    prompt = chat_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(chat_tokenizer):
    output = chat_tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    input_ids, mask = output["input_ids"], output["assistant_masks"]
    assert len(mask) == len(input_ids)
    assert input_ids == chat_tokenizer.encode(chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False))

    # The masked tokens are, in order, the two assistant contents each followed by <|im_end|>, and nothing else.
    expected = [
        chat_tokenizer.encode("<think>Add them.</think>4") + [chat_tokenizer.convert_tokens_to_ids("<|im_end|>")],
        chat_tokenizer.encode("6") + [chat_tokenizer.convert_tokens_to_ids("<|im_end|>")],
    ]
    spans, current = [], []
    for token_id, flag in zip(input_ids, mask):
        if flag:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    assert spans == expected


def test_template_passes_trl_assistant_only_loss_checks(chat_tokenizer):
    from trl import chat_template_utils

    # SFTTrainer(assistant_only_loss=True) keeps a template with generation markers, and warns unless the
    # assistant's <|im_end|> is inside the mask (the model would never learn to stop).
    assert chat_template_utils.has_generation_markers(chat_tokenizer.chat_template)
    assert chat_template_utils.is_chat_template_stop_token_trained(chat_tokenizer)


def test_save_and_reload_with_auto_tokenizer(chat_tokenizer, tmp_path):
    chat_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(chat_tokenizer)
    assert reloaded.chat_template == CHATML_TEMPLATE
    assert reloaded.eos_token_id == reloaded.bos_token_id == reloaded.pad_token_id == 0
    for text in ROUND_TRIP_TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<think>x</think>"]:
        assert reloaded.encode(text) == chat_tokenizer.encode(text)
        assert reloaded.decode(reloaded.encode(text)) == text
    assert reloaded.apply_chat_template(CONVERSATION) == chat_tokenizer.apply_chat_template(CONVERSATION)
    assert add_chat_tokens(reloaded) == add_chat_tokens(chat_tokenizer)


def test_default_tokenizer_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GENESIS_HF_CACHE", str(tmp_path))
    first = default_tokenizer(512)
    cache = tmp_path / "tokenizers" / "stdlib-bpe-512"
    assert (cache / "tokenizer.json").is_file()
    assert len(first) == 512
    # A second call loads from the cache; a fresh training in another directory gives the same vocabulary.
    assert default_tokenizer(512).backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    retrained = default_tokenizer(512, cache_dir=tmp_path / "elsewhere")
    assert retrained.get_vocab() == first.get_vocab()


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_resize_embeddings_mean(tied):
    model = tiny_llama(tied)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()

    resize_embeddings_mean(model, 304)

    new_input = model.get_input_embeddings().weight
    new_output = model.get_output_embeddings().weight
    assert new_input.shape == new_output.shape == (304, 32)
    assert model.config.vocab_size == 304
    assert (new_input.data_ptr() == new_output.data_ptr()) == tied
    assert torch.equal(new_input[:300], old_input)
    assert torch.equal(new_output[:300], old_output)
    assert torch.allclose(new_input[300:], old_input.mean(dim=0).expand(4, -1))
    assert torch.allclose(new_output[300:], old_output.mean(dim=0).expand(4, -1))
    logits = model(torch.tensor([[1, 2, 303]])).logits
    assert logits.shape == (1, 3, 304)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The three command-line runs, each as its own `python -m genesis_hf.cli` process, started together.

    Each process spends seconds importing torch and transformers; running them side by side keeps the suite fast.
    """
    root = tmp_path_factory.mktemp("cli")
    text_file = root / "notes.txt"
    text_file.write_text("\n".join(corpus.iter_documents("stdlib-docs", 10)))
    jsonl_file = root / "docs.jsonl"
    records = [
        {"body": document, "id": index} for index, document in enumerate(corpus.iter_documents("stdlib-code", 5))
    ]
    jsonl_file.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    commands = {
        "files": [
            "--output-dir", str(root / "from-files"), "--vocab-size", "600",
            "--files", str(text_file), str(jsonl_file), "--text-field", "body", "--chat-tokens",
        ],
        "embedded": ["--output-dir", str(root / "embedded"), "--vocab-size", "512"],
        "missing-file": [
            "--output-dir", str(root / "missing"), "--vocab-size", "512", "--files", str(root / "nope.txt"),
        ],
    }  # fmt: skip
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "genesis_hf.cli", "tokenizer", "train", *arguments],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, arguments in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr)
    return root, results


def test_cli_trains_on_files(cli_runs):
    root, results = cli_runs
    returncode, stdout, stderr = results["files"]
    assert returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["source"] == "files"
    assert summary["vocab_size"] == 600 and summary["len_tokenizer"] == 604
    assert summary["eos_token_id"] == 0
    assert summary["chat_token_ids"] == dict(zip(CHATML_TOKENS, [600, 601, 602, 603]))
    reloaded = AutoTokenizer.from_pretrained(root / "from-files")
    assert len(reloaded) == 604 and reloaded.chat_template == CHATML_TEMPLATE


def test_cli_trains_on_embedded_corpus(cli_runs):
    root, results = cli_runs
    returncode, stdout, stderr = results["embedded"]
    assert returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["source"] == "embedded stdlib corpus"
    assert summary["len_tokenizer"] == 512 and summary["chat_token_ids"] is None
    assert len(AutoTokenizer.from_pretrained(root / "embedded")) == 512


def test_cli_missing_file_is_a_clear_error(cli_runs):
    root, results = cli_runs
    returncode, stdout, stderr = results["missing-file"]
    assert returncode == 2
    assert str(root / "nope.txt") in stderr and "does not exist" in stderr
    assert "Traceback" not in stderr
    assert not (root / "missing").exists()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--vocab-size", "200"], "vocab_size=200 is too small"),
        (["--vocab-size", "600", "--text-field", "content"], "no field 'content' (found fields: text)"),
        (["--vocab-size", "5000"], "reached only"),
    ],
    ids=["small-vocab", "missing-field", "unreachable-vocab"],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, arguments, expected):
    jsonl_file = tmp_path / "data.jsonl"
    jsonl_file.write_text(json.dumps({"text": "hello world, hello there"}) + "\n")
    exit_code = cli.main(
        ["tokenizer", "train", "--output-dir", str(tmp_path / "tok"), "--files", str(jsonl_file)] + arguments
    )
    assert exit_code == 2
    stderr = capsys.readouterr().err
    assert expected in stderr and "error:" in stderr


def test_cli_never_replaces_a_trained_tokenizer(cli_runs, capsys):
    root, results = cli_runs
    assert results["embedded"][0] == 0
    folder = root / "embedded"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    exit_code = cli.main(["tokenizer", "train", "--output-dir", str(folder), "--vocab-size", "600"])
    assert exit_code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already holds a tokenizer (tokenizer.json, tokenizer_config.json)" in error[0], error
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
