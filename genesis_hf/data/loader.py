"""The pretraining loader: weighted, packed, rank-split and resumable to the exact token.

How a stream is built (the same in streaming and pre-tokenized mode, so both yield the same tokens):

1. **Per source**, the training documents (every raw document except the held-out ones, see `MixtureConfig`) are
   encoded in order without special tokens, each followed by one eos, and concatenated into one endless token
   stream. When a source runs out it restarts from its first document and its `epoch` counter goes up (the order is
   the same every epoch): the loader is infinite, and `tokens_per_source` / the epochs in `state_dict()` show when a
   source repeats. The trainer decides when to stop.
2. **Rows**: that stream is cut into consecutive rows of exactly `seq_len` tokens, without padding; a document may
   straddle two rows. `input_ids` is a row, `labels` is the same row (the HF convention: the model shifts labels
   internally), so no token is dropped and every row is full.
3. **Mixing** happens per row, as in Megatron's blended datasets: global row `g` comes from source `s` drawn with
   probability `weight_s` by a seeded sampler (`default_rng([seed, g // 8192])` for each block of 8192 rows). A row
   never mixes sources, so it never joins two documents without their eos, and the token shares match the weights.
4. **Ranks**: the global row sequence does not depend on the number of ranks; rank `r` of `N` takes rows `r, r + N,
   r + 2N, ...` (counted from where the loader started or resumed), `batch_size` of them per batch. Ranks are
   disjoint, and together they cover the stream exactly: batch `i` of all ranks holds global rows
   `[i * batch_size * N, (i + 1) * batch_size * N)`. In streaming mode every rank reads the whole stream and keeps
   its rows; in a `torch.distributed` run the ranks share the encoding, each encoding about 1/N of every chunk and
   exchanging the tokens (`genesis_hf.data.sharing`), so the stream, and the state, are the same on every rank and
   for every N. In pre-tokenized mode skipping a row costs nothing.
5. **Document masking** (optional): `position_ids` restart at 0 after every eos, so each document gets its own
   rotary positions; with `attn_implementation="flash_attention_2"`, transformers also reads the packed documents
   from `position_ids` and stops attention at their boundaries (sdpa and eager still attend across them). Off by
   default.

The state is a small JSON dict (ints, floats, strings, lists): the number of global rows handed out to all ranks
together, and per source its epoch, its tokens read, and (streaming mode) the reader position of the chunk being
packed. It is the same on every rank and does not depend on the world size: store one copy (e.g. in
`trainer_state.json`), and resume with any number of ranks. `load_state_dict` on a fresh loader continues with
exactly the batch that would have come next.
"""

import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from genesis_hf.args import ConfigError
from genesis_hf.data.mixture import MixtureConfig, SourceConfig, load_mixture
from genesis_hf.data.sharing import ChunkEncoder, EncodingWork, TokenizationShare, tokenization_share
from genesis_hf.data.sources import DocumentReader, open_reader
from genesis_hf.data.tokenized import TokenArray, TokenizedData
from genesis_hf.data.tokens import TokenEncoder

STATE_FORMAT = "genesis-hf-packed-loader"
STATE_VERSION = 1
# Rows per block of the source sampler; each block has its own generator, so jumping to any row is O(1).
SAMPLER_BLOCK_ROWS = 8192
# A streaming chunk (the unit of tokenization and of resume) is at most this much text or this many documents.
CHUNK_CHARACTERS = 1 << 18
CHUNK_DOCUMENTS = 256
# How long `close()` waits for the other ranks' part of an exchange in flight before leaving it to finish on its own.
CLOSE_WAIT_SECONDS = 30.0


def is_validation_document(index: int, holdout_every: int) -> bool:
    """Document `index` of a source is held out for validation: one in every `holdout_every`, the last of each run."""
    return index % holdout_every == holdout_every - 1


class WeightedRowSampler:
    """Draws the source of every global row: row `g` comes from source `s` with probability `weights[s]`.

    Block `b` of `SAMPLER_BLOCK_ROWS` rows uses `np.random.default_rng([seed, b])`, so the sampler's whole state is
    the row counter (kept by the loader): no 128-bit generator state to checkpoint, and any row is reachable at once.

    Args:
        weights: the normalised source weights.
        seed: the mixing seed (>= 0).
    """

    def __init__(self, weights: list[float], seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
        self.seed = seed
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
        self.cumulative /= self.cumulative[-1]
        self._block_number = -1
        self._block = np.zeros(0, dtype=np.int64)

    def source_of(self, row: int) -> int:
        block_number, offset = divmod(row, SAMPLER_BLOCK_ROWS)
        if block_number != self._block_number:
            uniform = np.random.default_rng([self.seed, block_number]).random(SAMPLER_BLOCK_ROWS)
            # (SAMPLER_BLOCK_ROWS,) source numbers; the clip guards a uniform that rounds onto the last edge.
            self._block = np.minimum(np.searchsorted(self.cumulative, uniform, side="right"), len(self.cumulative) - 1)
            self._block_number = block_number
        return int(self._block[offset])


class _Chunk(NamedTuple):
    tokens: np.ndarray  # the chunk's tokens, eos after each document
    position: dict[str, Any]  # the reader position at the chunk's first document
    documents: int  # kept documents in the chunk
    epoch: int  # the epoch the chunk belongs to


class StreamingSourceTokens:
    """The endless token stream of one source in streaming mode, read chunk by chunk from its documents.

    A chunk is the tokens of up to `CHUNK_DOCUMENTS` consecutive kept documents (at most `CHUNK_CHARACTERS` of
    text). The position is (reader position at the chunk's first document, number of kept documents in the chunk,
    tokens of the chunk already read): resuming re-reads and re-encodes that one chunk, nothing before it.

    While the current chunk is consumed, a background thread reads and encodes the next one (the Rust encoder
    releases the GIL), so a training step rarely waits for tokenization. The thread only runs ahead: the state
    describes the chunk being consumed, and an error in the next chunk is raised when that chunk is needed. With a
    shared `ChunkEncoder` the ranks encode a slice of each chunk each and exchange them (`genesis_hf.data.sharing`).

    Args:
        source: the source.
        encoder: the `ChunkEncoder` of this source (which may share the encoding with the other ranks).
        keep: whether a raw document index belongs to this stream (training or validation documents).
        purpose: `"training"` or `"validation"`, for error messages.
        holdout_every: the mixture's hold-out period, for error messages.
        state: a `state_dict()` saved earlier, or `None` to start at the beginning.
    """

    def __init__(
        self,
        source: SourceConfig,
        encoder: ChunkEncoder,
        keep: Callable[[int], bool],
        purpose: str,
        holdout_every: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.chunk_encoder = encoder
        self.source, self.keep = source, keep
        self.purpose, self.holdout_every = purpose, holdout_every
        state = state or {}
        self.tokens_read = int(state.get("tokens", 0))
        position = state.get("position")
        # The reader's own epoch bookkeeping; it runs one chunk ahead of what is consumed.
        self._reader_epoch = int(state.get("epoch", 0))
        # An epoch read from its first document without finding a document means the source is empty.
        self._epoch_from_start = position is None or int(position.get("index", 0)) == 0
        self._documents_in_epoch = 0
        self._reader: DocumentReader = open_reader(source, position)
        share = self.chunk_encoder.share
        # Shared encoding reads every source's chunks in the loader's one exchange thread; else each source has its own.
        self._prefetch = share.thread if share is not None else ThreadPoolExecutor(1, f"genesis-data-{source.name}")
        self._next: Future | None = None
        # The first chunk is read now, so a bad source fails when the loader is built.
        first = self._prefetch.submit(self._read_chunk, max_documents=state.get("chunk_documents"))
        self._install(first.result())
        self._chunk_offset = int(state.get("offset", 0))
        if self._chunk_offset > len(self._chunk):
            self.close()
            raise ConfigError(
                f"The saved position of the {source.describe()} points past its data (offset {self._chunk_offset} "
                f"of a {len(self._chunk)}-token chunk): the source changed since the checkpoint."
            )

    def _install(self, chunk: _Chunk) -> None:
        """Make `chunk` the one being consumed, and start reading the one after it in the background."""
        self._chunk, self._chunk_position, self._chunk_documents, self.epoch = chunk
        self._chunk_offset = 0
        self._next = self._prefetch.submit(self._read_chunk)

    def _load_chunk(self) -> None:
        self._install(self._next.result())

    def _read_chunk(self, max_documents: int | None = None) -> _Chunk:
        """Read and encode the next chunk, moving to the next epoch when the source is exhausted."""
        limit = CHUNK_DOCUMENTS if max_documents is None else int(max_documents)
        while True:
            position = self._reader.position()
            texts: list[str] = []
            characters = 0
            exhausted = False
            while len(texts) < limit and (max_documents is not None or characters < CHUNK_CHARACTERS):
                wanted = self.keep(self._reader.index)
                try:
                    text = self._reader.next_document(wanted)
                except StopIteration:
                    exhausted = True
                    break
                if wanted and text:
                    texts.append(text)
                    characters += len(text)
            if texts:
                self._documents_in_epoch += len(texts)
                return _Chunk(self.chunk_encoder.encode(texts), position, len(texts), self._reader_epoch)
            if not exhausted:
                continue
            if self._epoch_from_start and self._documents_in_epoch == 0:
                raise ConfigError(self._empty_message())
            self._reader.close()
            self._reader = open_reader(self.source, None)
            self._reader_epoch += 1
            self._epoch_from_start, self._documents_in_epoch = True, 0

    def _empty_message(self) -> str:
        read = self._reader.index
        if self.purpose == "validation":
            return (
                f"The {self.source.describe()} has no validation documents: {read} document(s), and only documents "
                f"i with i % holdout_every == holdout_every - 1 (holdout_every={self.holdout_every}) are held out. "
                f"Lower `holdout_every` in the mixture to at most {max(read, 2)}, or add documents."
            )
        return (
            f"The {self.source.describe()} is empty: it yielded no training documents ({read} document(s) read; "
            f"empty texts are skipped and one in {self.holdout_every} is held out for validation). Point the source "
            "at data, or remove it from the mixture."
        )

    def take(self, count: int) -> np.ndarray:
        """The next `count` tokens, (count,) int32."""
        pieces: list[np.ndarray] = []
        self._advance(count, pieces)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def skip(self, count: int) -> None:
        """Move past `count` tokens (another rank's row); in streaming mode they still have to be encoded."""
        self._advance(count, None)

    def _advance(self, count: int, pieces: list[np.ndarray] | None) -> None:
        """Move `count` tokens on, loading chunks as needed; append the tokens passed to `pieces` unless `None`."""
        needed = count
        while needed:
            available = len(self._chunk) - self._chunk_offset
            if available == 0:
                self._load_chunk()
                continue
            taken = min(available, needed)
            if pieces is not None:
                pieces.append(self._chunk[self._chunk_offset : self._chunk_offset + taken])
            self._chunk_offset += taken
            needed -= taken
        self.tokens_read += count

    @property
    def work(self) -> EncodingWork:
        return self.chunk_encoder.work

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "tokens": self.tokens_read,
            "position": self._chunk_position,
            "chunk_documents": self._chunk_documents,
            "offset": self._chunk_offset,
        }

    def close(self) -> None:
        """Stop reading ahead (waiting for a chunk being encoded) and close the reader.

        With shared encoding the chunk being read ahead is not cancelled, since every rank asked for it and the others
        may already wait in its exchange; it may also wait for ranks that stopped reading earlier (they never ask for
        it): after `CLOSE_WAIT_SECONDS` this warns and returns, and the exchange ends when those ranks' processes exit
        (or after the exchange timeout), closing the reader then. The loader's exchange thread stays for the other
        sources (it ends with the loader).
        """
        shared = self.chunk_encoder.shared
        if not shared:
            self._prefetch.shutdown(wait=True, cancel_futures=True)
        elif self._next is not None:
            if wait_for_futures([self._next], timeout=CLOSE_WAIT_SECONDS).not_done:
                warnings.warn(
                    f"The {self.source.describe()} still waits for the other ranks' part of its next chunk after "
                    f"{CLOSE_WAIT_SECONDS:g} s: a rank stopped reading before this one (every rank must take as many "
                    "batches). The exchange ends when that rank's process exits.",
                    stacklevel=2,
                )
                self._next.add_done_callback(lambda _: self._reader.close())
                return
        self._reader.close()


class TokenizedSourceTokens:
    """The endless token stream of one source in pre-tokenized mode: `np.memmap` slices, wrapping at the end.

    Args:
        array: the source split's tokens.
        source: the source (for messages).
        purpose: `"training"` or `"validation"`.
        state: a `state_dict()` saved earlier, or `None`.
    """

    def __init__(
        self, array: TokenArray, source: SourceConfig, purpose: str, state: dict[str, Any] | None = None
    ) -> None:
        if array.length == 0:
            raise ConfigError(
                f"The tokenized data holds no {purpose} tokens for the {source.describe()}; prepare it again with "
                "documents (and, for validation, a `holdout_every` smaller than the source's document count)."
            )
        self.array = array
        self.tokens_read = int((state or {}).get("tokens", 0))
        self.work = EncodingWork()  # nothing to encode

    @property
    def epoch(self) -> int:
        return self.tokens_read // self.array.length

    def take(self, count: int) -> np.ndarray:
        tokens = self.array.read(self.tokens_read, count)
        self.tokens_read += count
        return tokens

    def skip(self, count: int) -> None:
        self.tokens_read += count

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "tokens": self.tokens_read}

    def close(self) -> None:
        pass


class PackedLoader:
    """Infinite iterator of packed batches, `{"input_ids", "labels"[, "position_ids"]}`, each (batch, seq_len) long.

    Build it with `build_pretrain_loader`. Iterating continues from the current position (iterating twice does not
    restart the stream). See the module docstring for the stream, the rank split and the state.

    Args:
        mixture: the mixture.
        make_stream: builds a source's token stream from its saved state (`None`: from the start).
        eos_token_id: the eos id (for document masking).
        mode: `"streaming"` or `"tokenized"` (stored in the state).
        seq_len: tokens per row.
        batch_size: rows per batch and rank.
        rank: this rank.
        world_size: the number of ranks.
        seed: the mixing seed.
        document_masking: add `position_ids` that restart after every eos.
        fingerprint: identifies the data (tokenizer, tokenized index) so a state is not loaded into other data.
    """

    def __init__(
        self,
        mixture: MixtureConfig,
        make_stream: Callable[[SourceConfig, dict[str, Any] | None], Any],
        *,
        eos_token_id: int,
        mode: str,
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        document_masking: bool,
        fingerprint: str,
    ) -> None:
        for name, value, minimum in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank!r}.")
        self.mixture, self.mode, self.fingerprint = mixture, mode, fingerprint
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.document_masking, self.eos_token_id = seed, document_masking, eos_token_id
        self.sampler = WeightedRowSampler(mixture.weights, seed)
        self._make_stream = make_stream
        self._streams = [make_stream(source, None) for source in mixture.sources]
        self._start_row = 0
        self._rows_consumed = 0
        self._next_row = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank."""
        rows = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            row = self._next_row
            stream = self._streams[self.sampler.source_of(row)]
            if (row - self._start_row) % self.world_size == self.rank:
                rows[filled] = stream.take(self.seq_len)
                filled += 1
            else:
                stream.skip(self.seq_len)
            self._next_row += 1
        self._rows_consumed += self.batch_size * self.world_size
        # Every rank's sources now stand at the same token, so all ranks read the same chunks in the same order (which
        # shared encoding needs: see `genesis_hf.data.sharing`). The rows skipped are encoded already.
        self._catch_up()
        input_ids = torch.from_numpy(rows)
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if self.document_masking:
            batch["position_ids"] = torch.from_numpy(document_position_ids(rows, self.eos_token_id))
        return batch

    def _catch_up(self) -> None:
        """Advance the source streams over the rows other ranks took after this rank's last row, up to the end of
        the last batch of all ranks; the state then describes that global point and is identical on every rank."""
        while self._next_row < self._rows_consumed:
            self._streams[self.sampler.source_of(self._next_row)].skip(self.seq_len)
            self._next_row += 1

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Tokens of each source handed out so far to all ranks together (each rank having consumed as many batches
        as this one), across epochs and resumes."""
        self._catch_up()
        return {source.name: stream.tokens_read for source, stream in zip(self.mixture.sources, self._streams)}

    @property
    def epochs_per_source(self) -> dict[str, int]:
        """How many times each source has been read to its end and restarted."""
        self._catch_up()
        return {source.name: stream.epoch for source, stream in zip(self.mixture.sources, self._streams)}

    @property
    def tokenization_work(self) -> dict[str, float]:
        """What this rank has encoded so far, over all sources and resumes: documents, characters, tokens (eos not
        counted), seconds and cpu_seconds in the encoder. With shared encoding about 1/world_size of the whole; zeros
        in pre-tokenized mode."""
        total = EncodingWork()
        for stream in self._streams:
            total.add(stream.work)
        return total.to_dict()

    def _header(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "mode": self.mode,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": self.mixture.source_names,
            "weights": self.mixture.weights,
            "holdout_every": self.mixture.holdout_every,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch of all ranks, as plain JSON values (see the module docstring)."""
        self._catch_up()
        return {
            **self._header(),
            "rows_consumed": self._rows_consumed,
            "streams": {
                source.name: stream.state_dict() for source, stream in zip(self.mixture.sources, self._streams)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict()` of a loader over the same data, any rank, any world size)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError("This is not a PackedLoader state (from PackedLoader.state_dict()).")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"Loader state version {state.get('version')!r} is not supported (expected {STATE_VERSION})."
            )
        header = self._header()
        for key, expected in header.items():
            saved = state.get(key)
            # JSON keeps floats exact (repr round trip), so the normalised weights compare equal when unchanged.
            if saved != expected:
                raise ConfigError(
                    f"The loader state was saved with {key}={saved!r}, but this loader has {key}={expected!r}; "
                    f"resume with the same {key} (mixture, tokenizer, data mode, seq_len and seed must match)."
                )
        # The old streams stop before the new ones start: with shared encoding a source's exchanges must come from
        # one reader at a time.
        for stream in self._streams:
            stream.close()
        self._streams = []
        for source in self.mixture.sources:
            self._streams.append(self._make_stream(source, state["streams"][source.name]))
        self._start_row = self._rows_consumed = self._next_row = int(state["rows_consumed"])

    def close(self) -> None:
        """Close the sources' open files and iterators."""
        for stream in self._streams:
            stream.close()


def document_position_ids(rows: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Positions that restart at 0 after every eos (the eos keeps its document's position).

    Args:
        rows: (batch, seq_len) token ids.
        eos_token_id: the document separator.

    Returns:
        (batch, seq_len) int64 positions.
    """
    batch, length = rows.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
    # (batch, seq_len): where a document starts (row start, or right after an eos), its column; elsewhere 0.
    starts = np.zeros((batch, length), dtype=np.int64)
    starts[:, 1:] = np.where(rows[:, :-1] == eos_token_id, positions[:, 1:], 0)
    return positions - np.maximum.accumulate(starts, axis=1)


def _resolve_mixture(mixture: MixtureConfig | str | Path) -> MixtureConfig:
    return mixture if isinstance(mixture, MixtureConfig) else load_mixture(mixture)


def _stream_factory(
    mixture: MixtureConfig,
    encoder: TokenEncoder,
    split: str,
    tokenized_dir: str | Path | None,
    share: TokenizationShare | None = None,
) -> tuple[Callable[[SourceConfig, dict[str, Any] | None], Any], str, str]:
    """The per-source stream builder for a mode and split, plus the mode name and a data fingerprint. `share` shares
    the streaming encoding between ranks."""
    purpose = "training" if split == "train" else "validation"
    if tokenized_dir is None:
        holdout = mixture.holdout_every
        wants_validation = split == "validation"
        # One ChunkEncoder per source for the loader's life: its work counts carry over a `load_state_dict`.
        chunk_encoders = {source.name: ChunkEncoder(encoder, share) for source in mixture.sources}

        def keep(index: int) -> bool:
            return is_validation_document(index, holdout) == wants_validation

        def make_streaming(source: SourceConfig, state: dict[str, Any] | None) -> StreamingSourceTokens:
            return StreamingSourceTokens(source, chunk_encoders[source.name], keep, purpose, holdout, state)

        return make_streaming, "streaming", encoder.fingerprint

    data = TokenizedData(tokenized_dir)
    _check_tokenized_matches(data, mixture, encoder)

    def make_tokenized(source: SourceConfig, state: dict[str, Any] | None) -> TokenizedSourceTokens:
        return TokenizedSourceTokens(data.array(source.name, split), source, purpose, state)

    return make_tokenized, "tokenized", f"{encoder.fingerprint}/{sum(data.index['tokens_per_source'].values())}"


def _check_tokenized_matches(data: TokenizedData, mixture: MixtureConfig, encoder: TokenEncoder) -> None:
    index = data.index
    where = str(data.directory)
    if index["tokenizer_fingerprint"] != encoder.fingerprint:
        raise ConfigError(
            f"The tokenized data in {where!r} was made with another tokenizer ({index['tokenizer_fingerprint']}, this "
            f"one is {encoder.fingerprint}); pass the tokenizer it was prepared with, or prepare it again."
        )
    if index["mixture"]["holdout_every"] != mixture.holdout_every:
        raise ConfigError(
            f"The tokenized data in {where!r} holds out one document in {index['mixture']['holdout_every']}, the "
            f"mixture one in {mixture.holdout_every}; use the same holdout_every, or prepare the data again."
        )
    prepared = {source["name"]: source for source in index["mixture"]["sources"]}
    for source in mixture.sources:
        if source.name not in prepared:
            raise ConfigError(
                f"The mixture's source {source.name!r} is not in the tokenized data in {where!r} (it has "
                f"{', '.join(prepared)}); prepare it, or remove it from the mixture."
            )
        # Weights may change between preparing and training (re-weighting needs no re-tokenizing); data may not.
        for key in ("location", "config", "split", "data_dir", "data_files", "text_field", "max_documents"):
            if prepared[source.name].get(key) != getattr(source, key):
                raise ConfigError(
                    f"Source {source.name!r} was prepared with {key}={prepared[source.name].get(key)!r} but the "
                    f"mixture says {key}={getattr(source, key)!r}; prepare the data again, or fix the mixture."
                )


def _packed_loader(
    mixture: MixtureConfig | str,
    tokenizer,
    split: str,
    tokenized_dir: str | None,
    share_tokenization: bool | None,
    **settings: Any,
) -> PackedLoader:
    """A `PackedLoader` over `split` of the mixture; `settings` are its keyword arguments from `seq_len` on."""
    mixture = _resolve_mixture(mixture)
    encoder = TokenEncoder(tokenizer)
    share = None
    if tokenized_dir is None:
        share = tokenization_share(settings["rank"], settings["world_size"], share_tokenization)
    make_stream, mode, fingerprint = _stream_factory(mixture, encoder, split, tokenized_dir, share)
    return PackedLoader(
        mixture, make_stream, eos_token_id=encoder.eos_token_id, mode=mode, fingerprint=fingerprint, **settings
    )


def build_pretrain_loader(
    mixture: MixtureConfig | str,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    document_masking: bool = False,
    tokenized_dir: str | None = None,
    share_tokenization: bool | None = None,
) -> PackedLoader:
    """The training loader: streaming from the sources, or reading `tokenized_dir` when given.

    Every source is opened and its first documents are read and encoded here, so a bad source (missing path, missing
    text field, empty, unreachable Hub dataset, broken JSON) fails before training starts.

    Args:
        mixture: a `MixtureConfig`, a shipped mixture name (`"default"`, `"genesis-1b"`) or a YAML path.
        tokenizer: a `PreTrainedTokenizerFast`; its `eos_token_id` separates documents.
        seq_len: tokens per row (2048 for Genesis 1B).
        batch_size: rows per batch on this rank (the micro-batch).
        rank: this process's data-parallel rank.
        world_size: the number of data-parallel ranks.
        seed: the mixing seed; the same seed gives the same stream.
        document_masking: also yield `position_ids` that restart at 0 after every eos.
        tokenized_dir: a directory from `genesis-hf data prepare` (merged); pre-tokenized mode when given.
        share_tokenization: in streaming mode, the ranks encode 1/world_size of every chunk each and exchange the
            tokens over a gloo group of the loader's own (see `genesis_hf.data.sharing`); `None` does so when the
            default process group is these `world_size` ranks, `False` encodes everything on every rank. With
            sharing, every rank must build its loader at the same point and take as many batches.
    """
    return _packed_loader(
        mixture,
        tokenizer,
        "train",
        tokenized_dir,
        share_tokenization,
        seq_len=seq_len,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        document_masking=document_masking,
    )


def build_validation_batches(
    mixture: MixtureConfig | str,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    document_masking: bool = False,
    tokenized_dir: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Held-out batches, packed and mixed like training but only from held-out documents.

    Document `i` of every source is held out when `i % holdout_every == holdout_every - 1` (see `MixtureConfig`);
    the training stream never contains it, in either mode. The result is the same list on every call and rank.

    Args:
        mixture: as for `build_pretrain_loader`.
        tokenizer: as for `build_pretrain_loader`.
        seq_len: tokens per row.
        batch_size: rows per batch.
        num_batches: how many batches.
        seed: the mixing seed of the validation stream.
        document_masking: also return `position_ids`.
        tokenized_dir: read the validation split of a prepared directory instead of the sources.
    """
    loader = _packed_loader(
        mixture,
        tokenizer,
        "validation",
        tokenized_dir,
        False,
        seq_len=seq_len,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        seed=seed,
        document_masking=document_masking,
    )
    batches = [loader.next_batch() for _ in range(num_batches)]
    repeated = [name for name, epoch in loader.epochs_per_source.items() if epoch > 0]
    if repeated:
        warnings.warn(
            f"The held-out documents of {', '.join(repeated)} are fewer than {num_batches} validation batches need, "
            "so their validation rows repeat; lower holdout_every or ask for fewer batches.",
            stacklevel=2,
        )
    loader.close()
    return batches


__all__ = [
    "PackedLoader",
    "WeightedRowSampler",
    "build_pretrain_loader",
    "build_validation_batches",
    "document_position_ids",
    "is_validation_document",
]
