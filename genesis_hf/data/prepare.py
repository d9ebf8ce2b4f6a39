"""Pre-tokenized mode: tokenize a mixture once, then train with near-zero data-loading CPU.

    genesis-hf data prepare --mixture genesis-1b --tokenizer ./tokenizer --output_dir /data/genesis-1b-tokens \\
        --num_proc 16 --max_tokens 60000000000

reads every source once, encodes documents on `--num_proc` worker processes (in order, so the result does not
depend on the process count), and writes flat token files plus JSON indexes (see `genesis_hf.data.tokenized`). Train
with `build_pretrain_loader(..., tokenized_dir=DIR)` (the trainer's `tokenized_dir` option): rows are `np.memmap`
slices, and the stream is token for token the one streaming mode yields from the same mixture (with the tokens cut
at the `--max_tokens` budget, if one is given).

Each source's documents go to `train` or `validation` by the mixture's hold-out rule; `--max_tokens` is a total
training-token budget split by the weights (each source stops after the document that reaches its share, so its
validation split only holds the held-out documents read until then). Write each preparation to a fresh directory:
`merge` joins every per-shard index it finds there.

Fanning out (SLURM array, one task per slice; `--shard i/N` takes documents `i, i + N, ...` of every source, and
each task streams the whole source but only encodes its slice):

    #SBATCH --array=0-31 --cpus-per-task=16
    genesis-hf data prepare --mixture genesis-1b --tokenizer ./tokenizer --output_dir /data/tokens \\
        --shard ${SLURM_ARRAY_TASK_ID}/32 --num_proc 16 --max_tokens 60000000000

then once, after the array: `genesis-hf data merge /data/tokens --output_dir /data/tokens`. Merging reads only the
small per-document indexes: shards stay where they were written (several directories may be merged), and the merged
directory reads exactly like one unsharded run. For corpus-scale work (deduplication, quality filters, dozens of
nodes) use datatrove (https://github.com/huggingface/datatrove) upstream and point the mixture at its jsonl/parquet
output: this command only tokenizes.
"""

import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genesis_hf.args import ConfigError
from genesis_hf.data.loader import is_validation_document
from genesis_hf.data.mixture import MixtureConfig, SourceConfig, load_mixture
from genesis_hf.data.sources import open_reader
from genesis_hf.data.tokenized import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    TokenFileWriter,
    merge_tokenized,
    shard_index_name,
    write_json,
)
from genesis_hf.data.tokens import TokenEncoder, token_dtype

# Documents per encoding task: big enough to amortise inter-process transfer, small enough to keep workers busy.
TASK_CHARACTERS = 1 << 20
TASK_DOCUMENTS = 1024

_worker_encoder: TokenEncoder | None = None


def _init_worker(backend_json: str, eos_token_id: int) -> None:
    global _worker_encoder
    # One process per core already: the Rust thread pool inside each would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = TokenEncoder(backend_json, eos_token_id)


def _encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder.encode(texts)


def parse_shard(value: str) -> tuple[int, int]:
    """`"i/N"` -> `(i, N)`, checking `0 <= i < N`."""
    try:
        index_text, count_text = str(value).split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"--shard {value!r} is not of the form i/N (e.g. 3/32 for task 3 of 32).") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {value!r}: need 0 <= i < N, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.")
    return index, count


def _tasks(
    source: SourceConfig, holdout_every: int, shard_index: int, num_shards: int
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Batches of this shard's documents of `source`: (texts, raw indices, is-validation flags)."""
    reader = open_reader(source)
    try:
        texts: list[str] = []
        indices: list[int] = []
        characters = 0
        while True:
            index = reader.index
            mine = index % num_shards == shard_index
            try:
                text = reader.next_document(mine)
            except StopIteration:
                break
            if not (mine and text):
                continue
            texts.append(text)
            indices.append(index)
            characters += len(text)
            if characters >= TASK_CHARACTERS or len(texts) >= TASK_DOCUMENTS:
                yield texts, np.asarray(indices, dtype=np.int64), _flags(indices, holdout_every)
                texts, indices, characters = [], [], 0
        if texts:
            yield texts, np.asarray(indices, dtype=np.int64), _flags(indices, holdout_every)
    finally:
        reader.close()


def _flags(indices: list[int], holdout_every: int) -> np.ndarray:
    return np.asarray([is_validation_document(index, holdout_every) for index in indices], dtype=bool)


def _ordered_results(
    tasks: Iterator[tuple[list[str], np.ndarray, np.ndarray]], encode: Callable, pool, window: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, lengths, raw indices, flags) per task, in task order, with at most `window` tasks in flight (a lazy
    `imap`: `Pool.imap` would read a whole Hub source into memory ahead of the workers)."""
    if pool is None:
        for texts, indices, flags in tasks:
            yield (*encode(texts), indices, flags)
        return
    pending: deque = deque()
    for texts, indices, flags in tasks:
        pending.append((pool.apply_async(_encode_task, (texts,)), indices, flags))
        if len(pending) >= window:
            result, indices_done, flags_done = pending.popleft()
            yield (*result.get(), indices_done, flags_done)
    while pending:
        result, indices_done, flags_done = pending.popleft()
        yield (*result.get(), indices_done, flags_done)


def prepare_tokenized(
    mixture: MixtureConfig | str,
    tokenizer,
    output_dir: str | Path,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    num_proc: int = 1,
    max_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokenize this shard of every source into `output_dir`; with `num_shards == 1` also write `index.json`.

    Args:
        mixture: a `MixtureConfig`, a shipped mixture name or a YAML path.
        tokenizer: a `PreTrainedTokenizerFast` (the one training will use).
        output_dir: the tokenized directory (created if needed).
        shard_index: this shard `i` (documents `i, i + N, ...` of each source).
        num_shards: the number of shards `N`.
        num_proc: encoding processes (1: encode in this process).
        max_tokens: total training-token budget over all sources and shards, split by the weights; `None` reads
            every source to its end.
        log: called with one progress line per source.

    Returns:
        This shard's index (also written to `output_dir/index-XXXXX-of-XXXXX.json`).
    """
    mixture = mixture if isinstance(mixture, MixtureConfig) else load_mixture(mixture)
    _check_prepare_arguments(shard_index, num_shards, num_proc, max_tokens)
    output_dir = Path(output_dir)
    _check_not_prepared(output_dir, shard_index, num_shards)
    encoder = TokenEncoder(tokenizer)
    dtype = token_dtype(encoder.vocab_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    pool = _encoding_pool(encoder, num_proc)
    sources_index: dict[str, Any] = {}
    try:
        for source, weight in zip(mixture.sources, mixture.weights):
            started = time.perf_counter()
            budget = None if max_tokens is None else math.ceil(max_tokens * weight / num_shards)
            writers = {
                split: TokenFileWriter(output_dir, source.name, split, shard_index, num_shards, dtype)
                for split in SPLITS
            }
            tasks = _tasks(source, mixture.holdout_every, shard_index, num_shards)
            results = _ordered_results(tasks, encoder.encode, pool, 2 * num_proc)
            for tokens, lengths, indices, flags in results:
                if _write_documents(writers, tokens, lengths, indices, flags, budget):
                    break
            # Closing the generators closes the source reader now, also when the budget stopped it early.
            results.close()
            tasks.close()
            sources_index[source.name] = {split: writer.close() for split, writer in writers.items()}
            if log is not None:
                log(_source_summary(source.name, sources_index[source.name], time.perf_counter() - started))
    finally:
        if pool is not None:
            # close + join, never terminate: terminate kills the workers while the pool's task thread may still be
            # sending them a task, and that thread then blocks on the full pipe forever (CPython's Pool.terminate
            # hang). At most `2 * num_proc` tasks are in flight, so letting the workers finish them is quick.
            pool.close()
            pool.join()
    index = _shard_index(encoder, dtype, mixture, max_tokens, shard_index, num_shards, sources_index)
    write_json(output_dir / shard_index_name(shard_index, num_shards), index)
    if num_shards == 1:
        merge_tokenized([output_dir], output_dir)
    return index


def _check_prepare_arguments(shard_index: int, num_shards: int, num_proc: int, max_tokens: int | None) -> None:
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}.")
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ConfigError(f"num_proc must be a positive integer, got {num_proc!r}.")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive (or unset for no budget), got {max_tokens!r}.")


def _check_not_prepared(output_dir: Path, shard_index: int, num_shards: int) -> None:
    """Refuse to prepare a shard over a finished one: its index is written last, so a shard without one was cut off
    and is written again, while a finished shard (or a merged folder) is never replaced."""
    names = [shard_index_name(shard_index, num_shards)] + ([INDEX_NAME] if num_shards == 1 else [])
    finished = [str(output_dir / name) for name in names if (output_dir / name).exists()]
    if finished:
        raise ConfigError(
            f"{finished[0]} exists: {output_dir} already holds prepared tokens for shard {shard_index}/{num_shards}; "
            "pass a new --output-dir (prepared tokens are never replaced)."
        )


def _encoding_pool(encoder: TokenEncoder, num_proc: int):
    """`num_proc` encoding worker processes, or `None` to encode in this process."""
    if num_proc == 1:
        return None
    # Never plain fork: this process may run threads (the loader's, the tokenizer's, torch's), and a forked child
    # inherits any lock one of them held at that moment and can wait on it forever. The fork server is a fresh
    # process that imports this module once and forks the workers from there; spawn where it is missing.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context.Pool(num_proc, initializer=_init_worker, initargs=(encoder.backend_json, encoder.eos_token_id))


def _write_documents(
    writers: dict[str, TokenFileWriter],
    tokens: np.ndarray,
    lengths: np.ndarray,
    indices: np.ndarray,
    flags: np.ndarray,
    budget: int | None,
) -> bool:
    """Append one task's documents to the train and validation files; True when the training budget is reached.

    Args:
        writers: the source's writer of each split.
        tokens: (sum(lengths),) the documents' tokens, eos included.
        lengths: (documents,) token count of each document.
        indices: (documents,) raw document indices.
        flags: (documents,) whether each document is held out for validation.
        budget: this shard's training tokens for the source, or `None`.
    """
    # (documents + 1,) token offsets of each document in `tokens`.
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    keep = np.ones(len(lengths), dtype=bool)
    if budget is not None:
        # Stop after the training document that reaches the budget; validation documents read before it stay.
        train_ends = writers["train"].tokens + np.cumsum(np.where(flags, 0, lengths))
        reached = np.flatnonzero((train_ends >= budget) & ~flags)
        if len(reached):
            keep[reached[0] + 1 :] = False
    for split, mask in (("train", ~flags & keep), ("validation", flags & keep)):
        if mask.any():
            pieces = [tokens[offsets[i] : offsets[i + 1]] for i in np.flatnonzero(mask)]
            writers[split].write(np.concatenate(pieces), lengths[mask], indices[mask])
    return not keep.all()


def _source_summary(name: str, entries: dict[str, Any], seconds: float) -> str:
    return (
        f"{name}: {entries['train']['tokens']:,} training tokens in {entries['train']['documents']:,}"
        f" documents, {entries['validation']['tokens']:,} validation tokens ({seconds:.1f}s, "
        f"{entries['train']['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)"
    )


def _shard_index(
    encoder: TokenEncoder,
    dtype: np.dtype,
    mixture: MixtureConfig,
    max_tokens: int | None,
    shard_index: int,
    num_shards: int,
    sources_index: dict[str, Any],
) -> dict[str, Any]:
    """The shard's `index-XXXXX-of-XXXXX.json` (see `genesis_hf.data.tokenized`)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": encoder.vocab_size,
        "eos_token_id": encoder.eos_token_id,
        "tokenizer_fingerprint": encoder.fingerprint,
        "mixture": mixture.to_dict(),
        "max_tokens": max_tokens,
        "shard": {"index": shard_index, "count": num_shards},
        "tokens": sum(entry["train"]["tokens"] for entry in sources_index.values()),
        "tokens_per_source": {name: entry["train"]["tokens"] for name, entry in sources_index.items()},
        "sources": sources_index,
    }


__all__ = ["parse_shard", "prepare_tokenized"]
