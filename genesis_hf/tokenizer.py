"""Byte-level BPE tokenizer training, ChatML chat tokens and mean-initialised embedding rows.

The tokenizer is trained from scratch with the `tokenizers` library and returned as a `PreTrainedTokenizerFast`, so it
saves with `save_pretrained` and loads back with `AutoTokenizer.from_pretrained` like any Hub tokenizer.

Layout of the vocabulary (for `vocab_size=49152`):

    0             <|endoftext|>   eos, bos and pad: pretraining packs documents separated by it
    1 .. 256      the 256 byte symbols, so any UTF-8 text encodes without an unknown token
    257 .. 49151  learned merges
    49152 ..      <|im_start|> <|im_end|> <think> </think>, appended by `add_chat_tokens` before fine-tuning

Command line: `genesis-hf tokenizer train --output_dir DIR --vocab_size N [--files F ...] [--chat_tokens]`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from genesis_hf import corpus
from genesis_hf.args import add_command
from genesis_hf.layout import CHATML_TEMPLATE, CHATML_TOKENS, EOS_TOKEN

# `<|im_start|>`/`<|im_end|>` are special: they frame messages and vanish with `skip_special_tokens=True`.
# `<think>`/`</think>` are plain added tokens: one id each, but they stay in decoded text, because the reasoning
# trace is part of the answer a user reads (and a chat UI folds it), not a control token.
_SPECIAL_CHAT_TOKENS = frozenset(CHATML_TOKENS[:2])

# Every byte has a symbol (1..256) and the eos takes id 0, so smaller vocabularies learn no merge at all.
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = NUM_BYTE_TOKENS + 2

# Context length of the genesis presets; only a default for truncation warnings, the model config is authoritative.
DEFAULT_MODEL_MAX_LENGTH = 2048

# Standard ChatML. The assistant's content and its `<|im_end|>` sit inside `{% generation %}`, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True, return_dict=True)` marks exactly the tokens the model
# must learn to produce (TRL's `assistant_only_loss`); the role header and the newline after `<|im_end|>` are
# prompt. Content must be a string; reasoning goes inline as `<think>...</think>` at the start of it.

# Text budget of `default_tokenizer`: at least 1 MB, more for bigger vocabularies (a merge needs a pair seen at least
# `min_frequency` times, and rarer pairs need more text). Falls back to the whole embedded corpus when short.
_MIN_DEFAULT_TEXT_CHARS = 1_000_000
_DEFAULT_TEXT_CHARS_PER_TOKEN = 300


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: the 256 byte tokens and {EOS_TOKEN} already take "
            f"{NUM_BYTE_TOKENS + 1} ids. Use a vocab size of at least {MIN_VOCAB_SIZE} (the genesis presets use "
            "49152, tiny test models 512 to 4096)."
        )


def _byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits one by one (as SmolLM and Llama 2 do) so numbers tokenize uniformly, then GPT-2's byte-level split: words
    # with their leading space, punctuation runs, whitespace runs. `add_prefix_space=False`: no space is invented
    # before the text, so decode(encode(text)) == text exactly. No normalizer either, for the same reason.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with exactly `vocab_size` tokens, `<|endoftext|>` being id 0.

    Every UTF-8 byte has a token, so nothing is ever unknown and `decode(encode(text)) == text` for any text. Encoding
    adds no bos/eos: pretraining packs documents and places the `<|endoftext|>` separators itself.

    Args:
        texts: the training documents; consumed once, in order (same order, same vocabulary).
        vocab_size: the exact number of tokens, `<|endoftext|>` and the 256 byte tokens included.
        min_frequency: a pair is merged only if it occurs at least this many times.
        show_progress: show the `tokenizers` progress bars.
        model_max_length: the context length stored in the tokenizer config.

    Raises:
        ValueError: `vocab_size` is below 258, or the text holds too few distinct frequent pairs to reach it.
    """
    _check_vocab_size(vocab_size)
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} must be a positive integer (2 is the usual value).")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = _byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        # Special tokens come first in the vocabulary, which puts the eos at id 0.
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols, even those the text never uses: that is what makes unknown tokens impossible.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    reached = backend.get_vocab_size(with_added_tokens=True)
    if reached != vocab_size:
        raise ValueError(
            f"The tokenizer reached only {reached} tokens of the requested vocab_size={vocab_size}: the training text "
            f"has too few pairs occurring at least {min_frequency} times. Train on more text, or ask for a vocab size "
            f"of at most {reached}."
        )
    return _wrap(backend, model_max_length)


def _wrap(backend: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=model_max_length,
        # The "cleanup" deletes spaces before punctuation, which breaks the byte-exact round trip (code!).
        clean_up_tokenization_spaces=False,
    )


def add_chat_tokens(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Append the ChatML tokens as the next ids and install `CHATML_TEMPLATE` as the chat template.

    `<|im_start|>` and `<|im_end|>` are special tokens (dropped by `decode(..., skip_special_tokens=True)`);
    `<think>` and `</think>` are ordinary added tokens, one id each but kept in decoded text. Calling this again on
    a tokenizer that has them adds nothing. The model's embeddings must then grow to `len(tokenizer)`, see
    `resize_embeddings_mean`.

    Args:
        tokenizer: a tokenizer from `train_tokenizer` (or any fast tokenizer).

    Returns:
        The ids of `CHATML_TOKENS`, in order (49152..49155 for a 49152-token tokenizer).
    """
    vocab = tokenizer.get_vocab()
    missing = [
        AddedToken(token, special=token in _SPECIAL_CHAT_TOKENS, normalized=False, lstrip=False, rstrip=False)
        for token in CHATML_TOKENS
        if token not in vocab
    ]
    if missing:
        # One call, in order, so the new tokens get consecutive ids right after the current vocabulary.
        tokenizer.add_tokens(missing)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))


@torch.no_grad()
def resize_embeddings_mean(model: torch.nn.Module, new_num_tokens: int) -> None:
    """Resize the input (and untied output) embeddings, setting every new row to the mean of the old rows.

    A new token starting at the mean embedding gets the average logit instead of a random one, so adding chat tokens
    does not disturb the pretrained distribution (Hewitt, 2021). Old rows are left untouched; shrinking just drops
    the last rows. `model.config.vocab_size` is updated.

    Args:
        model: a transformers `PreTrainedModel`.
        new_num_tokens: the new number of rows, usually `len(tokenizer)`.
    """
    old_input = model.get_input_embeddings().weight
    old_output_module = model.get_output_embeddings()
    # Means in fp32 before resizing: resizing reallocates, and a bf16 sum over 50k rows loses precision.
    input_mean = old_input.float().mean(dim=0)
    output_mean = old_output_module.weight.float().mean(dim=0) if old_output_module is not None else None
    output_bias_mean = None
    if old_output_module is not None and getattr(old_output_module, "bias", None) is not None:
        output_bias_mean = old_output_module.bias.float().mean()
    old_input_rows = old_input.shape[0]
    old_output_rows = old_output_module.weight.shape[0] if old_output_module is not None else 0

    model.resize_token_embeddings(new_num_tokens, mean_resizing=False)

    new_input = model.get_input_embeddings().weight
    if new_num_tokens > old_input_rows:
        new_input[old_input_rows:] = input_mean.to(new_input.dtype)
    new_output_module = model.get_output_embeddings()
    # Tied output embeddings share the input weight, whose new rows were just set.
    if new_output_module is not None and new_output_module.weight is not new_input:
        new_output = new_output_module.weight
        if new_num_tokens > old_output_rows:
            new_output[old_output_rows:] = output_mean.to(new_output.dtype)
            if output_bias_mean is not None and new_output_module.bias is not None:
                new_output_module.bias[old_output_rows:] = output_bias_mean.to(new_output_module.bias.dtype)
    model.config.vocab_size = new_num_tokens
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None:
        text_config.vocab_size = new_num_tokens


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$GENESIS_HF_CACHE`, else `~/.cache/genesis_hf`."""
    if cache_dir is None:
        cache_dir = os.environ.get("GENESIS_HF_CACHE") or Path.home() / ".cache" / "genesis_hf"
    return Path(cache_dir).expanduser()


def _take_chars(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    """Whole documents until `max_chars` characters have been yielded (the last one may overshoot)."""
    total = 0
    for document in documents:
        if total >= max_chars:
            return
        yield document
        total += len(document)


def _train_on_embedded_corpus(vocab_size: int, **train_kwargs) -> PreTrainedTokenizerFast:
    """`train_tokenizer` on a prefix of `corpus.default_corpus()` sized for `vocab_size`, or all of it if needed."""
    _check_vocab_size(vocab_size)
    budget = max(_MIN_DEFAULT_TEXT_CHARS, _DEFAULT_TEXT_CHARS_PER_TOKEN * vocab_size)
    try:
        return train_tokenizer(_take_chars(corpus.default_corpus(), budget), vocab_size, **train_kwargs)
    except ValueError:
        # The budget was too small for this vocabulary; retry on the whole embedded corpus before giving up.
        pass
    try:
        return train_tokenizer(corpus.default_corpus(), vocab_size, **train_kwargs)
    except ValueError as error:
        raise ValueError(
            f"{error} The embedded stdlib corpus is the only text used without your own files; for a larger "
            "vocabulary call train_tokenizer (or `genesis-hf tokenizer train --files ...`) with your own text."
        ) from None


def default_tokenizer(vocab_size: int, cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer trained on the embedded stdlib corpus (`corpus.default_corpus()`), cached on disk.

    Trained once per `vocab_size` and saved under `{cache_dir}/tokenizers/stdlib-bpe-{vocab_size}`; later calls load
    it from there. Deterministic for a given Python version. Good for tests, smoke runs and tiny models; the embedded
    corpus reaches about 28,000 tokens, so train larger vocabularies on your own data with `train_tokenizer`.

    Args:
        vocab_size: the exact vocabulary size (see `train_tokenizer`).
        cache_dir: the cache root; `$GENESIS_HF_CACHE` or `~/.cache/genesis_hf` when `None`.
    """
    _check_vocab_size(vocab_size)
    target = cache_root(cache_dir) / "tokenizers" / f"stdlib-bpe-{vocab_size}"
    if (target / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(target)

    tokenizer = _train_on_embedded_corpus(vocab_size)

    # Save to a sibling temporary directory and rename it into place, so a concurrent process never loads a half
    # written tokenizer; if another process won the race, its (identical) tokenizer stays.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Load what was saved, so the first call returns the same object as every later (cached) call.
    return AutoTokenizer.from_pretrained(target)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


class _UsageError(ValueError):
    """Bad command-line input; the message names the value and the fix."""


def _check_files(paths: list[str]) -> None:
    for name in paths:
        if not Path(name).is_file():
            raise _UsageError(
                f"--files: {name!r} does not exist or is not a file; pass paths of text or .jsonl files."
            )


def _iter_file_documents(paths: list[str], text_field: str) -> Iterator[str]:
    """Plain-text files are one document each; `.jsonl` files give the `text_field` of every line.

    Streams line by line, so a corpus larger than memory can train a tokenizer (only pair counts are kept).
    """
    for name in paths:
        path = Path(name)
        try:
            if path.suffix != ".jsonl":
                yield path.read_text(encoding="utf-8")
                continue
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield _jsonl_text(line, text_field, f"{name}:{line_number}")
        except UnicodeDecodeError as error:
            raise _UsageError(f"--files: {name!r} is not valid UTF-8 ({error}); convert it to UTF-8 first.") from None


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise _UsageError(f"--files: {where} is not valid JSON ({error.msg}).") from None
    if not isinstance(record, dict) or text_field not in record:
        found = f"fields: {', '.join(sorted(record))}" if isinstance(record, dict) else type(record).__name__
        raise _UsageError(
            f"--files: {where} has no field {text_field!r} (found {found}); "
            "pass --text_field with the name of the field that holds the text."
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise _UsageError(
            f"--files: {where} field {text_field!r} is of type {type(text).__name__}, not str; "
            "pass --text_field with the name of the field that holds the text."
        )
    return text


def _run_train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        _check_vocab_size(args.vocab_size)
        if args.model_max_length < 1:
            raise _UsageError(f"--model_max_length {args.model_max_length} must be positive, e.g. 2048.")
        if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
            raise _UsageError(f"--output_dir {args.output_dir!r} is a file; pass a directory (it is created).")
        held = [
            name for name in ("tokenizer.json", "tokenizer_config.json") if (Path(args.output_dir) / name).exists()
        ]
        if held:
            raise _UsageError(
                f"--output_dir {args.output_dir!r} already holds a tokenizer ({', '.join(held)}); pass a new folder "
                "(a tokenizer is never replaced: models trained with it need it as it is)."
            )
        train_kwargs = {
            "min_frequency": args.min_frequency,
            "show_progress": args.progress,
            "model_max_length": args.model_max_length,
        }
        if args.files:
            _check_files(args.files)
            documents = _iter_file_documents(args.files, args.text_field)
            tokenizer = train_tokenizer(documents, args.vocab_size, **train_kwargs)
        else:
            tokenizer = _train_on_embedded_corpus(args.vocab_size, **train_kwargs)
    except ValueError as error:
        print(f"genesis-hf tokenizer train: error: {error}", file=sys.stderr)
        return 2
    chat_token_ids = add_chat_tokens(tokenizer) if args.chat_tokens else None
    tokenizer.save_pretrained(args.output_dir)
    summary = {
        "output_dir": str(Path(args.output_dir).resolve()),
        "source": "files" if args.files else "embedded stdlib corpus",
        "vocab_size": args.vocab_size,
        "len_tokenizer": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "chat_token_ids": dict(zip(CHATML_TOKENS, chat_token_ids)) if chat_token_ids else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(summary))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf tokenizer train` to the top-level `subparsers`."""
    description = __doc__.splitlines()[0]
    parser = add_command(subparsers, "tokenizer", help="Train a byte-level BPE tokenizer.", description=description)
    commands = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    description = "Train a byte-level BPE tokenizer on --files (or the embedded stdlib corpus) and save it."
    help = "Train a tokenizer and save it with save_pretrained."
    train = add_command(commands, "train", help=help, description=description, func=_run_train)
    train.add_argument("--output_dir", required=True, help="Directory to save the tokenizer in.")
    train.add_argument("--vocab_size", type=int, required=True, help="Exact vocabulary size, e.g. 49152.")
    train.add_argument(
        "--files",
        nargs="+",
        default=None,
        help="Training files: plain text (one document per file) or .jsonl (one document per line). "
        "Default: the embedded stdlib corpus.",
    )
    train.add_argument("--text_field", default="text", help="Field holding the text in .jsonl files.")
    train.add_argument("--chat_tokens", action="store_true", help="Append the ChatML tokens and chat template.")
    train.add_argument("--min_frequency", type=int, default=2, help="Minimum count of a pair to merge it.")
    train.add_argument("--model_max_length", type=int, default=DEFAULT_MODEL_MAX_LENGTH, help="Context length.")
    train.add_argument("--progress", action="store_true", help="Show training progress bars.")


__all__ = [
    "CHATML_TEMPLATE",
    "CHATML_TOKENS",
    "EOS_TOKEN",
    "add_chat_tokens",
    "default_tokenizer",
    "register_cli",
    "resize_embeddings_mean",
    "train_tokenizer",
]
