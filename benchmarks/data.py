"""Throughput and memory of the pretraining data pipeline; prints one JSON object.

    .venv/bin/python benchmarks/data.py [--vocab-size 8192] [--seq-len 2048] [--batch-size 8] [--repeats 5]
    .venv/bin/python benchmarks/data.py --only rank_scaling      # just the last measurement below

Measures, on the embedded stdlib corpus with the same tokenizer (`default_tokenizer(vocab_size)`) and the same text:

- `tokenize_and_pack`: tokens/s of `build_pretrain_loader` in streaming mode (read, encode, eos-separate, pack, mix,
  batch), against the `run_clm.py` approach of transformers' language-modeling example (tokenize with
  `datasets.map(batched=True)`, concatenate and chunk with a `group_texts` map, read torch batches), re-implemented
  here with an eos appended to every document so that both yield the same tokens. The two alternate `--repeats`
  times, each run in a fresh process; best and median wall-clock rates are reported, plus tokens per CPU-second
  (all threads), which a busy machine disturbs less. Both use the same Rust BPE encoder: ours spends ~95% of its
  time in it (most of that in the byte-level pre-tokenizer's regex), so the encoder's own speed bounds the ratio.
- `pack_only`: the same comparison from already-encoded documents, i.e. the packing stage itself.
- `tokenized`: tokens/s of `data prepare` (2 processes), and of reading the prepared shards (`np.memmap` slices).
- `memory`: streaming one epoch of a JSON-lines copy of the corpus and of a 4x larger copy, each in a fresh process:
  RSS growth (sampled after every batch) and the Python/numpy peak seen by `tracemalloc`.
- `long_one_line_document`: one document of `--long-document-mb` MB without a newline (the corpus's text with its
  newlines turned into spaces), encoded by `TokenEncoder` as the loader does: seconds and peak RSS growth, in a fresh
  process; and a 2 MB one encoded in pieces and whole (one encoder call, as before pieces), side by side.
- `rank_scaling`: the streaming loader on 1, 2 and 4 ranks of one machine (real processes joined by gloo), each run
  over the same `--scaling-tokens` global tokens: what each rank encoded (documents, characters, tokens, seconds and
  CPU seconds in the encoder, with the encoder on one thread) and its ratio to 1 rank, plus 4 ranks without sharing
  (`share_tokenization=False`, how every rank worked before sharing). The rows of every rank are checked against
  the single process's.

The consumer to beat: Genesis 1B on 2x RTX 4090 trains at ~19,000 tokens/s in all.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from itertools import chain
from pathlib import Path

import numpy as np

TRAINING_TOKENS_PER_SECOND = 19_000


def _tokenizer(vocab_size: int):
    from genesis_hf.tokenizer import default_tokenizer

    return default_tokenizer(vocab_size)


def _documents() -> list[str]:
    from genesis_hf.corpus import EMBEDDED_SOURCES, iter_documents

    return [document for source in EMBEDDED_SOURCES for document in iter_documents(source)]


def bench_packing(tokenizer, seq_len: int, batch_size: int, corpus_tokens: int) -> tuple[float, float]:
    """Tokens/s of our streaming loader over the default mixture, for as many tokens as the corpus holds (about one
    pass), building the loader included (it reads and encodes the first chunk of every source)."""
    from genesis_hf.data import build_pretrain_loader

    batches = max(1, corpus_tokens // (seq_len * batch_size))
    started, cpu_started = time.perf_counter(), time.process_time()
    loader = build_pretrain_loader("default", tokenizer, seq_len=seq_len, batch_size=batch_size)
    for _ in range(batches):
        loader.next_batch()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    loader.close()
    tokens = batches * seq_len * batch_size
    return tokens / wall, tokens / cpu


def bench_group_texts(tokenizer, seq_len: int, batch_size: int) -> tuple[float, float]:
    """Tokens/s of the run_clm.py recipe: `Dataset.map` to tokenize, `Dataset.map` to concatenate and cut blocks,
    then torch batches. Re-implemented here, with the eos our packer adds after every document."""
    import datasets

    datasets.disable_progress_bars()
    # A fresh copy, so the BPE word cache starts cold as it does for our loader (which copies the backend).
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = 1 << 30  # documents are longer than a row; silence the truncation warning
    eos = tokenizer.eos_token_id
    documents = _documents()

    def tokenize(examples):
        encoded = tokenizer(examples["text"])
        return {
            "input_ids": [ids + [eos] for ids in encoded["input_ids"]],
            "attention_mask": [mask + [1] for mask in encoded["attention_mask"]],
        }

    started, cpu_started = time.perf_counter(), time.process_time()
    texts = datasets.Dataset.from_dict({"text": documents})
    tokenized = texts.map(tokenize, batched=True, remove_columns=["text"])
    tokens = _read_batches(tokenized.map(_group_texts(seq_len), batched=True), batch_size)
    return tokens / (time.perf_counter() - started), tokens / (time.process_time() - cpu_started)


def _read_batches(grouped, batch_size: int) -> int:
    import torch

    grouped = grouped.with_format("torch")
    tokens = 0
    for start in range(0, len(grouped), batch_size):
        batch = grouped[start : start + batch_size]
        tokens += batch["input_ids"].numel()
        assert batch["labels"].dtype == torch.long
    return tokens


def _group_texts(seq_len: int):
    def group(examples):
        joined = {key: list(chain.from_iterable(examples[key])) for key in examples}
        usable = len(joined["input_ids"]) // seq_len * seq_len
        blocks = {key: [values[i : i + seq_len] for i in range(0, usable, seq_len)] for key, values in joined.items()}
        blocks["labels"] = list(blocks["input_ids"])
        return blocks

    return group


def bench_pack_only(tokenizer, seq_len: int, batch_size: int) -> dict:
    """The packing stage alone, both sides starting from the same per-document token ids (eos included): our
    chunk/row/mix/batch code (the real `StreamingSourceTokens` and `PackedLoader`, with encoding looked up instead of
    computed) against the `group_texts` map plus torch batches."""
    import datasets

    from genesis_hf.data import load_mixture
    from genesis_hf.data.loader import PackedLoader, StreamingSourceTokens, is_validation_document
    from genesis_hf.data.sharing import ChunkEncoder
    from genesis_hf.data.tokens import TokenEncoder

    documents = _documents()
    encoder = TokenEncoder(tokenizer)
    ids = {document: encoder.encode([document])[0] for document in documents}

    class LookupEncoder(TokenEncoder):
        def encode(self, texts):
            arrays = [ids[text] for text in texts]
            return np.concatenate(arrays), np.asarray([len(array) for array in arrays])

    lookup = LookupEncoder(tokenizer)
    mixture = load_mixture("default")
    corpus_tokens = sum(len(array) for array in ids.values())

    def make_stream(source, state):
        def keep(index):
            return not is_validation_document(index, mixture.holdout_every)

        return StreamingSourceTokens(source, ChunkEncoder(lookup), keep, "training", mixture.holdout_every, state)

    started = time.perf_counter()
    loader = PackedLoader(
        mixture,
        make_stream,
        eos_token_id=encoder.eos_token_id,
        mode="streaming",
        seq_len=seq_len,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        seed=0,
        document_masking=False,
        fingerprint="lookup",
    )
    batches = corpus_tokens // (seq_len * batch_size)
    for _ in range(batches):
        loader.next_batch()
    ours = batches * seq_len * batch_size / (time.perf_counter() - started)

    lists = [array.tolist() for array in ids.values()]
    started = time.perf_counter()
    table = datasets.Dataset.from_dict({"input_ids": lists, "attention_mask": [[1] * len(item) for item in lists]})
    tokens = _read_batches(table.map(_group_texts(seq_len), batched=True), batch_size)
    theirs = tokens / (time.perf_counter() - started)
    return {
        "genesis": round(ours),
        "run_clm_group_texts": round(theirs),
        "ratio_genesis_over_run_clm_group_texts": round(ours / theirs, 3),
    }


def bench_tokenized(tokenizer, seq_len: int, batch_size: int, directory: Path) -> dict:
    from genesis_hf.data import build_pretrain_loader, prepare_tokenized

    started = time.perf_counter()
    index = prepare_tokenized("default", tokenizer, directory, num_proc=2)
    prepare_seconds = time.perf_counter() - started
    loader = build_pretrain_loader(
        "default", tokenizer, seq_len=seq_len, batch_size=batch_size, tokenized_dir=directory
    )
    batches = 2000
    started = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    read_seconds = time.perf_counter() - started
    return {
        "prepare_tokens_per_second": round(index["tokens"] / prepare_seconds),
        "read_tokens_per_second": round(batches * batch_size * seq_len / read_seconds),
        "dtype": index["dtype"],
    }


def _write_corpus(path: Path, copies: int) -> None:
    documents = _documents()
    with path.open("w") as handle:
        for _ in range(copies):
            for document in documents:
                handle.write(json.dumps({"text": document}) + "\n")


def _memory_probe(corpus: str, vocab_size: int, seq_len: int, batch_size: int) -> None:
    """Runs in a fresh process: stream one epoch of `corpus`; print the RSS growth (sampled after every batch) and
    the tracemalloc peak (Python objects and numpy buffers), in MiB."""
    from genesis_hf.data import MixtureConfig, SourceConfig, build_pretrain_loader
    from genesis_hf.testing.memory import rss_mib

    tokenizer = _tokenizer(vocab_size)
    mixture = MixtureConfig(name="probe", sources=[SourceConfig(name="corpus", location=corpus, weight=1.0)])
    baseline = peak_rss = rss_mib()
    tracemalloc.start()
    loader = build_pretrain_loader(mixture, tokenizer, seq_len=seq_len, batch_size=batch_size)
    batches = 0
    while loader.epochs_per_source["corpus"] == 0:
        loader.next_batch()
        batches += 1
        peak_rss = max(peak_rss, rss_mib())
    _, peak = tracemalloc.get_traced_memory()
    result = {
        "tokens": batches * batch_size * seq_len,
        "rss_growth_mib": round(peak_rss - baseline, 1),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
    }
    print(json.dumps(result))


def _long_document_probe(megabytes: float, vocab_size: int, whole: bool) -> None:
    """Runs in a fresh process: encode one `megabytes` MB document without a newline, in pieces (`TokenEncoder`) or
    whole; print its tokens, seconds and peak RSS growth in MiB (RSS sampled every 5 ms by a thread, minus before)."""
    from genesis_hf.data.tokens import TokenEncoder
    from genesis_hf.testing.memory import PeakRss

    encoder = TokenEncoder(_tokenizer(vocab_size))
    text = " ".join(document.replace("\n", " ") for document in _documents()[:300])
    size = int(megabytes * 1e6)
    text = (text * (size // len(text) + 1))[:size]
    with PeakRss() as memory:
        started = time.perf_counter()
        if whole:
            tokens = len(encoder.backend.encode_batch_fast([text], add_special_tokens=False)[0].ids)
        else:
            tokens = len(encoder.encode([text])[0]) - 1
        seconds = time.perf_counter() - started
    growth = memory.growth_mib
    print(
        json.dumps(
            {"mb": megabytes, "tokens": tokens, "seconds": round(seconds, 2), "peak_rss_growth_mib": round(growth)}
        )
    )


def bench_long_document(args: argparse.Namespace) -> dict:
    long = _in_fresh_process(["--long-document-probe", str(args.long_document_mb)], args)
    pieces = _in_fresh_process(["--long-document-probe", "2"], args)
    whole = _in_fresh_process(["--long-document-probe", "2", "--whole"], args)
    return {
        f"pieces_{args.long_document_mb:g}mb": long,
        "pieces_2mb": pieces,
        "whole_2mb": whole,
        "whole_over_pieces_2mb_memory": round(whole["peak_rss_growth_mib"] / max(pieces["peak_rss_growth_mib"], 1), 1),
    }


def _in_fresh_process(probe: list[str], args: argparse.Namespace):
    """Run this script with `probe` arguments in a new interpreter; its last stdout line, parsed as JSON."""
    command = [sys.executable, __file__, *probe]
    for option in ("vocab_size", "seq_len", "batch_size"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


def bench_memory(args: argparse.Namespace, directory: Path) -> dict:
    results = {}
    for label, copies in (("1x", 1), ("4x", 4)):
        path = directory / f"corpus-{label}.jsonl"
        _write_corpus(path, copies)
        measured = _in_fresh_process(["--memory-probe", str(path)], args)
        results[label] = {"corpus_mib": round(path.stat().st_size / 2**20, 1), **measured}
    return results


def _rank_probe(rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    """Runs in one of `world_size` fresh processes: stream `--scaling-tokens` global tokens of the default mixture, one
    row per rank and batch; print this rank's encoding work, loop seconds and a hash of its rows."""
    import hashlib

    import torch.distributed as dist

    from genesis_hf.data import build_pretrain_loader

    tokenizer = _tokenizer(args.vocab_size)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    started = time.perf_counter()
    loader = build_pretrain_loader(
        "default",
        tokenizer,
        seq_len=args.seq_len,
        batch_size=1,
        rank=rank,
        world_size=world_size,
        share_tokenization=not args.no_share,
    )
    rows = _scaling_rows(args) // world_size
    digest = hashlib.sha256()
    for _ in range(rows):
        digest.update(loader.next_batch()["input_ids"].numpy().tobytes())
    loader.close()
    seconds = time.perf_counter() - started
    dist.destroy_process_group()
    print(json.dumps({**loader.tokenization_work, "loop_seconds": round(seconds, 2), "rows": digest.hexdigest()}))


def _scaling_rows(args: argparse.Namespace) -> int:
    """Global rows of the scaling runs: `--scaling-tokens` rounded down to whole rows for 4 ranks."""
    return max(4, args.scaling_tokens // args.seq_len // 4 * 4)


def _run_ranks(world_size: int, args: argparse.Namespace, share: bool = True) -> list[dict]:
    """`_rank_probe` in `world_size` processes started together; each one's result, in rank order."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, __file__, "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len)]
    command += ["--scaling-tokens", str(args.scaling_tokens), "--world-size", str(world_size), "--port", str(port)]
    command += [] if share else ["--no-share"]
    # One encoder thread per rank, so that CPU seconds in the encoder are all of its work.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([*command, "--rank-probe", str(rank)], stdout=subprocess.PIPE, text=True, env=env)
        for rank in range(world_size)
    ]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"A rank of the {world_size}-rank run failed: {[p.returncode for p in processes]}.")
    return [json.loads(output.splitlines()[-1]) for output in outputs]


def _expected_row_hashes(world_sizes: tuple[int, ...], args: argparse.Namespace) -> dict[int, list[str]]:
    """For each world size, the hash `_rank_probe` must print on each rank, computed from one process's rows (this
    also builds the tokenizer's cache before the ranks start)."""
    import hashlib

    from genesis_hf.data import build_pretrain_loader

    loader = build_pretrain_loader("default", _tokenizer(args.vocab_size), seq_len=args.seq_len, batch_size=1)
    rows = [loader.next_batch()["input_ids"].numpy().tobytes() for _ in range(_scaling_rows(args))]
    loader.close()
    expected = {}
    for world_size in world_sizes:
        digests = [hashlib.sha256() for _ in range(world_size)]
        for index, row in enumerate(rows):
            digests[index % world_size].update(row)
        expected[world_size] = [digest.hexdigest() for digest in digests]
    return expected


def bench_rank_scaling(args: argparse.Namespace) -> dict:
    """Per-rank encoding work of the streaming loader on 1, 2 and 4 ranks (and 4 without sharing), side by side."""
    expected = _expected_row_hashes((1, 2, 4), args)
    runs = {f"{n}_ranks": _run_ranks(n, args) for n in (1, 2, 4)}
    runs["4_ranks_unshared"] = _run_ranks(4, args, share=False)
    for label, results in runs.items():
        if [result.pop("rows") for result in results] != expected[len(results)]:
            raise RuntimeError(f"The rows of the {label} run differ from one process's rows.")
    alone = runs["1_ranks"][0]
    keys = ("documents", "characters", "tokens", "seconds", "cpu_seconds")
    report: dict = {"global_tokens": _scaling_rows(args) * args.seq_len, "rows_match_one_process": True}
    for label, results in runs.items():
        report[label] = {
            "per_rank": results,
            "max_rank_over_1_rank": {
                key: round(max(r[key] for r in results) / max(alone[key], 1e-9), 3) for key in keys
            },
            "all_ranks_over_1_rank": {
                key: round(sum(r[key] for r in results) / max(alone[key], 1e-9), 3) for key in keys
            },
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="Runs of each packing recipe (best and median kept).")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--packing-probe", choices=("genesis", "run_clm"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus-tokens", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--long-document-mb",
        type=float,
        default=50,
        help="Size of the one-line document (MB) of long_one_line_document.",
    )
    parser.add_argument("--long-document-probe", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--scaling-tokens", type=int, default=1_000_000, help="Global tokens of each rank_scaling run."
    )
    parser.add_argument("--only", choices=("rank_scaling",), default=None, help="Run one measurement only.")
    parser.add_argument("--rank-probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-share", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_probe is not None:
        _rank_probe(args.rank_probe, args.world_size, args.port, args)
        return
    if args.only == "rank_scaling":
        print(json.dumps({"rank_scaling": bench_rank_scaling(args)}, indent=1))
        return
    if args.long_document_probe:
        _long_document_probe(args.long_document_probe, args.vocab_size, args.whole)
        return
    if args.memory_probe:
        _memory_probe(args.memory_probe, args.vocab_size, args.seq_len, args.batch_size)
        return
    if args.packing_probe:
        tokenizer = _tokenizer(args.vocab_size)
        _documents()  # read the corpus before the clock starts, as both recipes get it in memory
        if args.packing_probe == "genesis":
            rates = bench_packing(tokenizer, args.seq_len, args.batch_size, args.corpus_tokens)
        else:
            rates = bench_group_texts(tokenizer, args.seq_len, args.batch_size)
        print(json.dumps(rates))
        return

    from genesis_hf.data.tokens import TokenEncoder

    tokenizer = _tokenizer(args.vocab_size)
    corpus_tokens = len(TokenEncoder(tokenizer).encode(_documents())[0])
    # The machine may be shared: alternate the two recipes and keep each one's best and median run. Each run is a
    # fresh process, since what one recipe leaves behind in a process (Arrow's allocator and thread pool, a
    # fragmented heap) was measured to slow the other one down by up to a third.
    ours, theirs = [], []
    for _ in range(args.repeats):
        for recipe, runs in (("genesis", ours), ("run_clm", theirs)):
            runs.append(
                tuple(_in_fresh_process(["--packing-probe", recipe, "--corpus-tokens", str(corpus_tokens)], args))
            )
    pack_only = bench_pack_only(tokenizer, args.seq_len, args.batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        tokenized = bench_tokenized(tokenizer, args.seq_len, args.batch_size, Path(scratch) / "tokens")
        memory = bench_memory(args, Path(scratch))
    long_document = bench_long_document(args)
    report = {
        "setup": {
            "vocab_size": args.vocab_size,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "corpus_tokens": corpus_tokens,
            "cpu_cores": len(os.sched_getaffinity(0)),
            "repeats": args.repeats,
        },
        "tokenize_and_pack_tokens_per_second": {
            "genesis_streaming_best": round(max(wall for wall, _ in ours)),
            "run_clm_group_texts_best": round(max(wall for wall, _ in theirs)),
            "ratio_genesis_over_run_clm_best": round(
                max(wall for wall, _ in ours) / max(wall for wall, _ in theirs), 3
            ),
            "genesis_streaming_median": round(statistics.median(wall for wall, _ in ours)),
            "run_clm_group_texts_median": round(statistics.median(wall for wall, _ in theirs)),
            "ratio_genesis_over_run_clm_median": round(
                statistics.median(wall for wall, _ in ours) / statistics.median(wall for wall, _ in theirs), 3
            ),
            "genesis_per_cpu_second_median": round(statistics.median(cpu for _, cpu in ours)),
            "run_clm_per_cpu_second_median": round(statistics.median(cpu for _, cpu in theirs)),
        },
        "pack_only_tokens_per_second": pack_only,
        "tokenized": tokenized,
        "feed_over_training_19k_tokens_per_second": {
            "streaming": round(max(wall for wall, _ in ours) / TRAINING_TOKENS_PER_SECOND, 1),
            "tokenized": round(tokenized["read_tokens_per_second"] / TRAINING_TOKENS_PER_SECOND, 1),
        },
        "memory_streaming_one_epoch": memory,
        "memory_ratio_4x_over_1x": {
            "rss_growth": round(memory["4x"]["rss_growth_mib"] / max(memory["1x"]["rss_growth_mib"], 0.1), 2),
            "tracemalloc_peak": round(memory["4x"]["tracemalloc_peak_mib"] / memory["1x"]["tracemalloc_peak_mib"], 2),
        },
        "long_one_line_document": long_document,
        "rank_scaling": bench_rank_scaling(args),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
