"""The pretraining data pipeline: exact resume, rank split, mixing, streaming == pre-tokenized, sharding, bad input.

Everything runs on tiny data written by the fixtures (JSON lines, parquet, a `datasets` parquet folder read through
the Hub code path) plus the embedded corpus, with a 512-token tokenizer and 64-token rows.
"""

import copy
import json
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch

from genesis_hf import cli, corpus
from genesis_hf.args import ConfigError
from genesis_hf.data import (
    MixtureConfig,
    SourceConfig,
    build_pretrain_loader,
    build_validation_batches,
    load_mixture,
    prepare_tokenized,
)
from genesis_hf.data import loader as loader_module
from genesis_hf.data.sharing import ChunkEncoder, share_bounds
from genesis_hf.data.tokenized import TokenizedData
from genesis_hf.data.tokens import SPLIT_CHARACTERS, TokenEncoder, _pieces, splits_losslessly
from genesis_hf.tokenizer import add_chat_tokens, train_tokenizer

SEQ_LEN = 64
BATCH = 4
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _document(rng: np.random.Generator, label: str) -> str:
    return f"<{label}> " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40))))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(list(corpus.default_corpus(max_documents_per_source=30)), 512)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Three local sources: JSON lines, a folder of parquet files, and a parquet dataset folder read with `datasets`
    (the `hub:` code path, no network)."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    with (root / "prose.jsonl").open("w") as handle:
        for index in range(30):
            handle.write(json.dumps({"id": index, "text": _document(rng, f"prose {index}")}) + "\n")
            if index % 7 == 3:
                handle.write("\n")  # blank lines are not documents
    (root / "code").mkdir()
    for part in range(2):
        rows = [{"content": f"def f{part}_{i}():\n    return {i}  # " + _document(rng, "code")} for i in range(15)]
        datasets.Dataset.from_list(rows).to_parquet(root / "code" / f"part-{part}.parquet", batch_size=4)
    hub = root / "hub" / "data"
    hub.mkdir(parents=True)
    for part in range(2):
        rows = [{"text": _document(rng, f"hub {part}-{i}"), "score": i} for i in range(20)]
        datasets.Dataset.from_list(rows).to_parquet(hub / f"train-{part:05d}-of-00002.parquet", batch_size=8)
    return root


@pytest.fixture(scope="module")
def mixture(data_dir):
    return MixtureConfig(
        name="test-mix",
        holdout_every=5,
        sources=[
            # One embedded document (~570 tokens), so that every source restarts within a few dozen batches.
            SourceConfig(name="docs", location="embedded:stdlib-docs", weight=1.0, max_documents=1),
            SourceConfig(name="prose", location=str(data_dir / "prose.jsonl"), weight=2.0),
            SourceConfig(name="code", location=str(data_dir / "code"), text_field="content", weight=1.5),
            SourceConfig(name="hub", location=f"hub:{data_dir / 'hub'}", weight=1.5),
        ],
    )


@pytest.fixture(scope="module")
def tokenized_dir(mixture, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokens")
    prepare_tokenized(mixture, tokenizer, directory, num_proc=2)
    return str(directory)


def _take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(count)]


def _same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a) for a, b in zip(batches_a, batches_b)
    )


def _roundtrip(state: dict) -> dict:
    # The trainer stores the state in JSON (trainer_state.json) and in DCP; both must give it back unchanged.
    return json.loads(json.dumps(state))


@pytest.mark.parametrize(
    "mode, chunk_documents",
    [("streaming", 256), ("streaming", 3), ("tokenized", None)],
    ids=["stream", "stream-small-chunks", "tokenized"],
)
def test_resume_is_exact_twice_in_a_row(mixture, tokenizer, tokenized_dir, monkeypatch, mode, chunk_documents):
    if chunk_documents is not None:
        # Small chunks put resume positions in the middle of files, parquet batches and the `datasets` stream.
        monkeypatch.setattr(loader_module, "CHUNK_DOCUMENTS", chunk_documents)
    kwargs = dict(
        seq_len=SEQ_LEN, batch_size=BATCH, seed=3, tokenized_dir=tokenized_dir if mode == "tokenized" else None
    )
    reference_loader = build_pretrain_loader(mixture, tokenizer, **kwargs)
    reference = _take(reference_loader, 60)
    # Long enough that every source restarts at least once (exercising epochs in the state).
    assert min(reference_loader.epochs_per_source.values()) >= 1, reference_loader.epochs_per_source

    first = build_pretrain_loader(mixture, tokenizer, **kwargs)
    assert _same(_take(first, 17), reference[:17])
    state = _roundtrip(first.state_dict())

    second = build_pretrain_loader(mixture, tokenizer, **kwargs)
    second.load_state_dict(state)
    assert _same(_take(second, 24), reference[17:41])
    state = _roundtrip(second.state_dict())

    third = build_pretrain_loader(mixture, tokenizer, **kwargs)
    third.load_state_dict(state)
    assert _same(_take(third, 19), reference[41:60])
    assert third.tokens_per_source == reference_loader.tokens_per_source
    assert third.state_dict() == _roundtrip(reference_loader.state_dict())


@pytest.mark.parametrize("mode", ["streaming", "tokenized"])
def test_two_ranks_are_disjoint_and_cover_the_stream(mixture, tokenizer, tokenized_dir, mode):
    directory = tokenized_dir if mode == "tokenized" else None
    single = _take(
        build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=2 * BATCH, tokenized_dir=directory), 10
    )
    ranks = [
        build_pretrain_loader(
            mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, rank=rank, world_size=2, tokenized_dir=directory
        )
        for rank in range(2)
    ]
    per_rank = [_take(loader, 10) for loader in ranks]
    for step in range(10):
        # Rank r takes global rows r, r + 2, ...: interleaving the ranks' rows gives back the single-process batch.
        for rank in range(2):
            assert torch.equal(per_rank[rank][step]["input_ids"], single[step]["input_ids"][rank::2])
    # The state is a global position: identical on both ranks, and resumable with another world size.
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    assert ranks[0].tokens_per_source == ranks[1].tokens_per_source
    reference = build_pretrain_loader(
        mixture, tokenizer, seq_len=SEQ_LEN, batch_size=2 * BATCH, tokenized_dir=directory
    )
    expected = _take(reference, 13)[10:]
    resumed = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=2 * BATCH, tokenized_dir=directory)
    resumed.load_state_dict(_roundtrip(state))
    assert _same(_take(resumed, 3), expected)


def _shared_rank(rank: int, world_size: int, folder, mixture, tokenizer, plan: dict) -> None:
    """One process of `_run_ranks`: a loader (sharing the encoding, since the process group is its ranks) takes
    `plan["batches"][rank]` batches (after loading
    `plan["state"]` if given), then close; writes its rows, state, encoding work and close time to `folder`."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    try:
        loader = build_pretrain_loader(
            mixture,
            tokenizer,
            seq_len=SEQ_LEN,
            batch_size=BATCH,
            rank=rank,
            world_size=world_size,
            seed=3,
        )
        if plan.get("state"):
            loader.load_state_dict(plan["state"])
        batches = _take(loader, plan["batches"][rank])
        state = loader.state_dict()
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader.close()
        result = {
            "rows": [batch["input_ids"].tolist() for batch in batches],
            "state": state,
            "work": loader.tokenization_work,
            "close_seconds": time.perf_counter() - started,
            "warnings": [str(warning.message) for warning in caught],
        }
        (folder / f"rank-{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def _run_ranks(folder, world_size: int, mixture, tokenizer, plan: dict, timeout: float = 120) -> list[dict]:
    """Run `_shared_rank` in `world_size` forked processes joined by gloo; each one's result, in rank order. A hang
    fails the test after `timeout` seconds."""
    folder.mkdir()
    context = torch.multiprocessing.start_processes(
        _shared_rank,
        args=(world_size, folder, mixture, tokenizer, plan),
        nprocs=world_size,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} ranks sharing the encoding did not finish within {timeout} s")
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(world_size)]


def test_ranks_share_the_encoding_and_keep_the_single_process_stream(mixture, tokenizer, tmp_path, monkeypatch):
    # Chunks of 4 documents: a batch of 4 ranks spans several chunks, so ranks wait for exchanges within a batch.
    monkeypatch.setattr(loader_module, "CHUNK_DOCUMENTS", 4)
    monkeypatch.setattr(loader_module, "CLOSE_WAIT_SECONDS", 1.0)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # forked ranks encode on one thread each
    single = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=2 * BATCH, seed=3)
    # (96, SEQ_LEN): the global rows of one process.
    global_rows = torch.cat([batch["input_ids"] for batch in _take(single, 12)])
    # What one process encodes for rows 0-47, and for rows 48-95 after a resume (the ranks below resume too).
    half = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=2 * BATCH, seed=3)
    _take(half, 6)
    half.close()
    second_half = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=4 * BATCH, seed=3)
    second_half.load_state_dict(half.state_dict())
    _take(second_half, 3)
    second_half.close()

    two = _run_ranks(tmp_path / "two", 2, mixture, tokenizer, {"batches": [6, 6]})
    # Rows 48-95 on 4 ranks, resumed from the state of the 2 (the same on both, and a global position).
    assert two[0]["state"] == two[1]["state"] == _roundtrip(half.state_dict())
    four = _run_ranks(tmp_path / "four", 4, mixture, tokenizer, {"batches": [3] * 4, "state": two[0]["state"]})
    for offset, results in ((0, two), (48, four)):
        world_size = len(results)
        for rank, result in enumerate(results):
            # Rank r's row j of batch i is global row offset + (i * BATCH + j) * N + r.
            rows = torch.tensor(result["rows"]).reshape(-1, SEQ_LEN)
            expected = global_rows[offset + rank : offset + world_size * len(rows) : world_size]
            assert torch.equal(rows, expected), (world_size, rank)
            assert not result["warnings"], result["warnings"]
    for results, alone in ((two, half), (four, second_half)):
        world_size = len(results)
        documents = [result["work"]["documents"] for result in results]
        characters = [result["work"]["characters"] for result in results]
        # Every document is encoded once, on one rank (a single process may have cancelled its last read-ahead chunk,
        # 4 documents per source, when it closed), and each rank encodes about 1/N of them and less than all the text.
        assert 0 <= sum(documents) - alone.tokenization_work["documents"] <= 4 * 4, documents
        assert max(documents) <= 1.25 * sum(documents) / world_size, documents
        assert max(characters) < 0.8 * sum(characters), characters


def test_share_bounds_cut_contiguous_slices_of_equal_text():
    assert share_bounds([10] * 8, 4) == [0, 2, 4, 6, 8]
    assert share_bounds([], 3) == [0, 0, 0, 0]
    # A long piece goes to the rank whose half of the text holds its middle character.
    assert share_bounds([1, 1, 100, 1, 1], 2) == [0, 2, 5]
    assert share_bounds([1, 100, 1, 1, 1], 2) == [0, 2, 5]
    sizes = np.random.default_rng(0).integers(1, 50, size=1000).tolist()
    bounds = share_bounds(sizes, 7)
    shares = [sum(sizes[bounds[rank] : bounds[rank + 1]]) for rank in range(7)]
    assert bounds[0] == 0 and bounds[-1] == 1000 and max(shares) - min(shares) <= 2 * 50


def test_a_rank_that_stops_early_fails_the_others_instead_of_hanging(mixture, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(loader_module, "CHUNK_DOCUMENTS", 4)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # Rank 0 ends after one batch; rank 1 then needs chunks that rank 0 never encodes its part of, and fails as soon as
    # rank 0's process is gone.
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="Connection closed by peer"):
        _run_ranks(tmp_path / "ranks", 2, mixture, tokenizer, {"batches": [1, 6]}, timeout=60)


def test_close_does_not_wait_forever_for_an_exchange(mixture, tokenizer, monkeypatch):
    monkeypatch.setattr(loader_module, "CLOSE_WAIT_SECONDS", 0.2)
    released = threading.Event()

    class StuckExchange(ChunkEncoder):
        """Encodes the first chunk, then waits in the next "exchange" until released, like a rank whose peers stopped
        reading while it still runs."""

        def encode(self, texts):
            if self.work.documents:
                released.wait(30)
            self.work.documents += len(texts)
            return self.encoder.encode(texts)[0]

    # The share's exchange thread, without a process group.
    share = SimpleNamespace(thread=ThreadPoolExecutor(1))
    stream = loader_module.StreamingSourceTokens(
        mixture.sources[1], StuckExchange(TokenEncoder(tokenizer), share), lambda index: True, "training", 5
    )
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="a rank stopped reading before this one"):
        stream.close()
    assert time.perf_counter() - started < 5
    released.set()
    stream._next.result(timeout=30)


def test_mixture_proportions_follow_the_weights(mixture, tokenizer, tokenized_dir):
    loader = build_pretrain_loader(
        mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, seed=11, tokenized_dir=tokenized_dir
    )
    _take(loader, 3000)
    counts = loader.tokens_per_source
    total = sum(counts.values())
    assert total == 3000 * BATCH * SEQ_LEN
    for name, weight in zip(mixture.source_names, mixture.weights):
        # 12,000 rows: the standard deviation of a share is below 0.004.
        assert abs(counts[name] / total - weight) < 0.015, (name, counts[name] / total, weight)
    # Streaming mode draws the same sources for the same seed.
    streaming = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, seed=11)
    _take(streaming, 300)
    tokenized = build_pretrain_loader(
        mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, seed=11, tokenized_dir=tokenized_dir
    )
    _take(tokenized, 300)
    assert streaming.tokens_per_source == tokenized.tokens_per_source


def test_streaming_and_tokenized_yield_the_same_tokens(mixture, tokenizer, tokenized_dir):
    streaming = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, document_masking=True)
    tokenized = build_pretrain_loader(
        mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, document_masking=True, tokenized_dir=tokenized_dir
    )
    assert _same(_take(streaming, 80), _take(tokenized, 80))
    assert min(streaming.epochs_per_source.values()) >= 1
    index = TokenizedData(tokenized_dir).index
    assert index["dtype"] == "uint16"
    assert set(index["tokens_per_source"]) == set(mixture.source_names)


def test_long_documents_encode_in_pieces_to_the_same_ids(tokenizer):
    """Long documents are encoded in pieces (for the cores' sake); the ids must be those of the whole document, on
    real long files and on text built to hit every whitespace, digit, Unicode and special-token corner at the cuts."""
    tokenizer = copy.deepcopy(tokenizer)
    add_chat_tokens(tokenizer)
    long_files = sorted(corpus.iter_documents("stdlib-code"), key=len)[-3:]
    rng = np.random.default_rng(0)
    alphabet = [
        "x",
        "y",
        "=",
        "(",
        "\n",
        "\n",
        " ",
        "  ",
        "\t",
        "\r\n",
        "7",
        "42",
        "'s",
        "é",
        "中文",
        "😀",
        "\u00a0",
        "\x1c",
        "\u3000",
        "\u2028",
        "<|im_start|>",
        "<think>",
        "<|endoftext|>",
        " \n",
        "\n\n",
        "\n ",
    ]
    synthetic = ["".join(rng.choice(alphabet, size=12 * SPLIT_CHARACTERS)) for _ in range(3)]
    texts = [*long_files, *synthetic, "short\ntext"]
    assert min(len(text) for text in long_files) > 4 * SPLIT_CHARACTERS

    encoder = TokenEncoder(tokenizer)
    assert encoder.split_long_documents
    in_pieces, lengths = encoder.encode(texts)
    encoder.split_long_documents = False
    whole, whole_lengths = encoder.encode(texts)
    assert np.array_equal(lengths, whole_lengths)
    assert np.array_equal(in_pieces, whole)
    for text in texts:
        assert "".join(_pieces(text)) == text
    assert all(len(_pieces(text)) > 3 for text in texts[:-1])  # the cuts really happened


@pytest.mark.parametrize(
    "change",
    ["normalizer", "prefix_space", "metaspace", "stripping_added_token", "dropout"],
)
def test_documents_stay_whole_when_pieces_could_change_the_ids(tokenizer, change):
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert splits_losslessly(spec)
    if change == "normalizer":
        spec["normalizer"] = {"type": "NFKC"}
    elif change == "prefix_space":
        spec["pre_tokenizer"]["pretokenizers"][-1]["add_prefix_space"] = True
    elif change == "metaspace":
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    elif change == "stripping_added_token":
        spec["added_tokens"][0]["lstrip"] = True
    else:
        spec["model"]["dropout"] = 0.1
    assert not splits_losslessly(spec)


def test_sharded_prepare_merges_to_the_single_run(mixture, tokenizer, tokenized_dir, tmp_path, capsys):
    shards_a, shards_b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    # Three array tasks writing to two directories (as when a SLURM array spans two file systems).
    for shard, directory in ((0, shards_a), (1, shards_b), (2, shards_a)):
        prepare_tokenized(mixture, tokenizer, directory, shard_index=shard, num_shards=3)
    with pytest.raises(ConfigError, match=r"merge them first: `genesis-hf data merge"):
        build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, tokenized_dir=str(shards_a))
    assert cli.main(["data", "merge", str(shards_a), "--output-dir", str(merged)]) == 2
    assert "Shards [1] of 3 are missing" in capsys.readouterr().err
    assert cli.main(["data", "merge", str(shards_a), str(shards_b), "--output-dir", str(merged)]) == 0
    single, sharded = TokenizedData(tokenized_dir), TokenizedData(merged)
    for name in mixture.source_names:
        for split in ("train", "validation"):
            expected, actual = single.array(name, split), sharded.array(name, split)
            assert actual.length == expected.length
            assert np.array_equal(actual.read(0, actual.length), expected.read(0, expected.length))
    kwargs = dict(seq_len=SEQ_LEN, batch_size=BATCH)
    assert _same(
        _take(build_pretrain_loader(mixture, tokenizer, **kwargs, tokenized_dir=str(merged)), 40),
        _take(build_pretrain_loader(mixture, tokenizer, **kwargs, tokenized_dir=tokenized_dir), 40),
    )


def test_prepare_command_line(data_dir, tokenizer, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    config = tmp_path / "prepare.yaml"
    config.write_text(f"mixture: default\ntokenizer: {tokenizer_dir}\nnum_proc: 2\n")
    output = tmp_path / "tokens"
    assert (
        cli.main(["data", "prepare", "--config", str(config), "--output-dir", str(output), "--max-tokens", "20000"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    # The budget is split by the weights (0.6 / 0.4), each source stopping after the document that reaches its share.
    assert summary["tokens_per_source"]["stdlib-docs"] >= 12000
    assert summary["tokens_per_source"]["stdlib-code"] >= 8000
    assert sum(summary["tokens_per_source"].values()) < 200000
    loader = build_pretrain_loader("default", tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, tokenized_dir=str(output))
    assert loader.next_batch()["input_ids"].shape == (BATCH, SEQ_LEN)
    assert (
        cli.main(["data", "prepare", "--tokenizer", str(tokenizer_dir), "--output-dir", str(output), "--shard", "3/2"])
        == 2
    )
    assert "--shard '3/2'" in capsys.readouterr().err
    # Prepared tokens are never replaced: the same command again is refused in one line and leaves them as they were.
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert (
        cli.main(["data", "prepare", "--config", str(config), "--output-dir", str(output), "--max-tokens", "20000"])
        == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already holds prepared tokens for shard 0/1" in error[0], error
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before


def test_validation_documents_are_held_out(data_dir, tokenizer):
    mixture = MixtureConfig(
        name="prose",
        holdout_every=4,
        sources=[SourceConfig(name="prose", location=str(data_dir / "prose.jsonl"), weight=1)],
    )
    loader = build_pretrain_loader(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH)
    training_text = ""
    while loader.epochs_per_source["prose"] == 0:
        training_text += tokenizer.decode(loader.next_batch()["input_ids"].flatten())
    seen = {int(number) for number in re.findall(r"<prose (\d+)>", training_text)}
    assert seen == {index for index in range(30) if index % 4 != 3}
    batches = build_validation_batches(mixture, tokenizer, seq_len=SEQ_LEN, batch_size=2, num_batches=2)
    held_out = {
        int(number)
        for batch in batches
        for number in re.findall(r"<prose (\d+)>", tokenizer.decode(batch["input_ids"].flatten()))
    }
    assert held_out and held_out <= {3, 7, 11, 15, 19, 23, 27}
    assert batches[0]["input_ids"].shape == (2, SEQ_LEN)


def test_document_masking_restarts_positions_after_eos(mixture, tokenizer):
    batch = build_pretrain_loader(
        mixture, tokenizer, seq_len=SEQ_LEN, batch_size=8, document_masking=True
    ).next_batch()
    ids, positions = batch["input_ids"], batch["position_ids"]
    assert torch.equal(batch["labels"], ids) and positions.shape == ids.shape and positions.dtype == torch.long
    eos = tokenizer.eos_token_id
    assert (ids == eos).any()
    for row in range(ids.shape[0]):
        assert positions[row, 0] == 0
        for column in range(1, SEQ_LEN):
            expected = 0 if ids[row, column - 1] == eos else positions[row, column - 1] + 1
            assert positions[row, column] == expected


def test_shipped_mixtures_load():
    default = load_mixture("default")
    assert [source.location for source in default.sources] == ["embedded:stdlib-docs", "embedded:stdlib-code"]
    genesis = load_mixture("genesis-1b")
    assert 55 < sum(source.weight for source in genesis.sources) < 65
    assert all(source.kind == "hub" for source in genesis.sources)
    families = " ".join(source.target for source in genesis.sources)
    for family in (
        "fineweb-edu",
        "dclm",
        "starcoderdata",
        "finemath",
        "wikipedia",
        "CulturaX",
        "OpenHermes",
        "agentinstruct",
        "glaive",
        "gorilla",
        "hermes-function-calling",
        "xlam",
        "cosmopedia",
    ):
        assert family in families
    assert {source.config for source in genesis.sources if "CulturaX" in source.target} == {
        "ar",
        "de",
        "es",
        "fr",
        "ja",
        "ko",
        "pt",
        "zh",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each fails before training starts, saying what is wrong and what to do.


def _source(tmp_path, name="bad", **overrides):
    return MixtureConfig(name="m", sources=[SourceConfig(name=name, weight=1.0, **overrides)])


def test_missing_text_field_names_the_existing_columns(data_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"has no field 'body'; its fields are: id, text\. Set `text_field`"):
        build_pretrain_loader(
            _source(tmp_path, location=str(data_dir / "prose.jsonl"), text_field="body"),
            tokenizer,
            seq_len=8,
            batch_size=1,
        )
    with pytest.raises(ConfigError, match=r"has no column 'text'; its columns are: content\."):
        build_pretrain_loader(_source(tmp_path, location=str(data_dir / "code")), tokenizer, seq_len=8, batch_size=1)
    with pytest.raises(ConfigError, match=r"has no field 'body'; its fields are: text, score"):
        build_pretrain_loader(
            _source(tmp_path, location=f"hub:{data_dir / 'hub'}", text_field="body"),
            tokenizer,
            seq_len=8,
            batch_size=1,
        )


def test_empty_sources_are_rejected(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"source 'bad' .*empty\.jsonl\) is empty: it yielded no training documents"):
        build_pretrain_loader(
            _source(tmp_path, location=str(tmp_path / "empty.jsonl")), tokenizer, seq_len=8, batch_size=1
        )
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"has no documents: it matches no file ending with \.jsonl"):
        build_pretrain_loader(_source(tmp_path, location=str(tmp_path / "folder")), tokenizer, seq_len=8, batch_size=1)
    with pytest.raises(ConfigError, match=r"does not exist.*For a Hub dataset write location: hub:someone/dataset"):
        _ = build_pretrain_loader(_source(tmp_path, location="someone/dataset"), tokenizer, seq_len=8, batch_size=1)
    with pytest.raises(ConfigError, match=r"empty"):
        prepare_tokenized(_source(tmp_path, location=str(tmp_path / "empty.jsonl")), tokenizer, tmp_path / "out")


@pytest.mark.parametrize("weight", [0, -1.5, "heavy"])
def test_non_positive_weights_are_rejected(weight, tmp_path):
    with pytest.raises(
        ConfigError, match=rf"Source 'bad' has weight {re.escape(repr(weight))}; weights must be positive"
    ):
        SourceConfig(name="bad", location="embedded:stdlib-docs", weight=weight)
    path = tmp_path / "mix.yaml"
    path.write_text(f"name: m\nsources:\n  - name: bad\n    location: embedded:stdlib-docs\n    weight: {weight}\n")
    with pytest.raises(ConfigError, match="weights must be positive"):
        load_mixture(str(path))


def test_unreachable_hub_dataset_offline(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # `datasets` and `huggingface_hub` read the variable at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mixture = _source(tmp_path, location="hub:genesis-hf-made-up/no-such-dataset", config="en")
    with pytest.raises(ConfigError) as error:
        build_pretrain_loader(mixture, tokenizer, seq_len=8, batch_size=1)
    message = str(error.value)
    assert "'genesis-hf-made-up/no-such-dataset'" in message and "HF_HUB_OFFLINE is set" in message
    assert "genesis-hf data prepare" in message and "local files" in message


def test_invalid_jsonl_names_file_and_line(tokenizer, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "cut off\n')
    mixture = _source(tmp_path, location=str(broken))
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(broken))}:3 \(line 3 of the source 'bad'.*\) is not valid JSON"
    ):
        build_pretrain_loader(mixture, tokenizer, seq_len=8, batch_size=1)
    not_lines = tmp_path / "array.json"
    not_lines.write_text('[\n {"text": "a"}\n]\n')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(not_lines))}:1 .*one JSON object per line"):
        build_pretrain_loader(_source(tmp_path, location=str(not_lines)), tokenizer, seq_len=8, batch_size=1)


def test_a_bad_line_deep_in_a_source_stops_reading_with_its_location(tokenizer, tmp_path):
    """Later chunks are read ahead in a background thread; an error there still reaches the caller, when the batch
    that needs the chunk is asked for, with the file and line."""
    chunk = loader_module.CHUNK_DOCUMENTS
    deep = tmp_path / "deep.jsonl"
    lines = [json.dumps({"text": f"document {index} " + "word " * 20}) for index in range(3 * chunk)]
    lines[2 * chunk] = '{"text": "cut off'
    deep.write_text("\n".join(lines) + "\n")
    loader = build_pretrain_loader(_source(tmp_path, location=str(deep)), tokenizer, seq_len=32, batch_size=4)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(deep))}:{2 * chunk + 1} .*not valid JSON"):
        for _ in range(10_000):
            loader.next_batch()
    loader.close()


def test_mismatched_state_and_data_are_rejected(mixture, tokenizer, tokenized_dir):
    state = build_pretrain_loader("default", tokenizer, seq_len=SEQ_LEN, batch_size=BATCH).state_dict()
    with pytest.raises(ConfigError, match=r"saved with seq_len=64, but this loader has seq_len=32"):
        build_pretrain_loader("default", tokenizer, seq_len=32, batch_size=BATCH).load_state_dict(state)
    other_tokenizer = train_tokenizer(list(corpus.default_corpus(max_documents_per_source=10)), 300)
    with pytest.raises(ConfigError, match=r"made with another tokenizer"):
        build_pretrain_loader(mixture, other_tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, tokenized_dir=tokenized_dir)
    with pytest.raises(ConfigError, match=r"rank must be in \[0, world_size=2\)"):
        build_pretrain_loader("default", tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, rank=2, world_size=2)


def test_mixture_yaml_errors(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("name: m\nsources:\n  - {name: a, location: 'embedded:stdlib-docs', weight: 1, text_feild: x}\n")
    with pytest.raises(ConfigError, match=r"'text_feild' \(did you mean 'text_field'\?\)"):
        load_mixture(str(path))
    path.write_text(
        "name: m\nsources:\n  - {name: a, location: 'embedded:stdlib-docs', weight: 1}\n  - {name: a, location: 'embedded:stdlib-code', weight: 1}\n"
    )
    with pytest.raises(ConfigError, match="names these sources twice: a"):
        load_mixture(str(path))
    with pytest.raises(ConfigError, match="neither a shipped mixture"):
        load_mixture("no-such-mixture")


def test_local_formats_read_in_order_and_resume_anywhere(tmp_path):
    import gzip

    from genesis_hf.data.sources import open_reader

    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    with gzip.open(folder / "a.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"text": f"gz {i}"}) + "\n" for i in range(3)))
    datasets.Dataset.from_list([{"text": f"parquet {i}"} for i in range(3)]).to_parquet(folder / "b.parquet")
    (folder / "sub" / "c.txt").write_text("a whole file is one document")
    (folder / "notes.csv").write_text("ignored,file\n")
    source = SourceConfig(name="mixed", location=str(folder), weight=1)
    reader = open_reader(source)
    documents, positions = [], []
    while True:
        positions.append(reader.position())
        try:
            documents.append(reader.next_document())
        except StopIteration:
            break
    assert documents == ["gz 0", "gz 1", "gz 2", "parquet 0", "parquet 1", "parquet 2", "a whole file is one document"]
    for start, position in enumerate(positions[:-1]):
        resumed = open_reader(source, _roundtrip(position))
        assert [resumed.next_document() for _ in range(len(documents) - start)] == documents[start:]
        with pytest.raises(StopIteration):
            resumed.next_document()
