"""Ranks share the tokenization of the streaming loader: each encodes a slice of every chunk, all get all of it.

Without sharing, every rank of an N-rank run reads and encodes every document and keeps 1/N of the rows: N times the
encoding work. With sharing, every rank still reads every document of a chunk (which decides the chunk's documents
and its resume position, so the state stays the same on every rank and for every world size), cuts the documents into
the encoder's pieces (`TokenEncoder.split`), and encodes only its contiguous slice of the pieces, about 1/N of the
characters (`share_bounds`). One `all_gather_object` per chunk, on a gloo group of the loader's own, hands every rank
the other slices; joined in rank order they give exactly the tokens of encoding the chunk alone, because a piece's ids
never depend on the other pieces.

The collectives run in one read-ahead thread per loader (`TokenizationShare.thread`), which reads the chunks of all
sources, first chunks included, and is the only user of the group: never the training thread, whose collectives would
otherwise pair up with the loader's in whatever order they arrive, on every rank differently. One group and one thread
for all sources also keeps the sockets per rank at one per peer (30 sources on 64 ranks would otherwise hold ~1,900).
For every rank to issue the same exchanges in the same order, the ranks ask for the same chunks in the same order:
`PackedLoader.next_batch` walks past the rows of every rank up to the end of the global batch (see
`PackedLoader._catch_up`), so after each batch the sources of all ranks stand at the same token, and a rank waiting for
a chunk waits for one that every other rank has asked for too (the ranks call `next_batch` equally often; the
trainer's steps do).
"""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch.distributed as dist

from genesis_hf.args import ConfigError
from genesis_hf.data.tokens import TokenEncoder

# The longest a rank waits in one exchange for the other ranks' slices (they read the same documents at the same time,
# so a long wait means a rank stopped reading; the exchange then fails with gloo's timeout error).
EXCHANGE_TIMEOUT = timedelta(minutes=30)


@dataclass
class EncodingWork:
    """What one rank has encoded: its share of the tokenization (with sharing, a long document may be encoded in
    pieces on several ranks; it counts on the rank that encoded its first piece)."""

    documents: int = 0
    characters: int = 0
    tokens: int = 0  # without the eos
    seconds: float = 0.0  # wall-clock seconds in the encoder
    cpu_seconds: float = 0.0  # CPU seconds of the calling thread in the encoder (all of them without Rust threads)

    def add(self, other: "EncodingWork") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def to_dict(self) -> dict[str, float]:
        values = asdict(self)
        values["seconds"], values["cpu_seconds"] = round(self.seconds, 4), round(self.cpu_seconds, 4)
        return values


def share_bounds(sizes: list[int], world_size: int) -> list[int]:
    """Cut a list of pieces into `world_size` contiguous slices of about equal characters.

    Piece `j` goes to the rank whose 1/N of the characters holds the piece's middle character, so slices follow the
    order of the pieces (joining them in rank order gives the chunk back) and no rank gets more than its share plus
    one piece.

    Args:
        sizes: each piece's characters, in order.
        world_size: the number of ranks `N`.

    Returns:
        (N + 1,) bounds: rank `r` encodes pieces `bounds[r]:bounds[r + 1]`.
    """
    sizes_array = np.asarray(sizes, dtype=np.int64)
    ends = np.cumsum(sizes_array)
    total = int(ends[-1]) if len(ends) else 0
    # Twice each piece's middle, times N, over twice the total: integers only, the same on every rank.
    owners = np.minimum((2 * ends - sizes_array) * world_size // max(2 * total, 1), world_size - 1)
    return np.searchsorted(owners, np.arange(world_size + 1), side="left").tolist()


class TokenizationShare:
    """What the ranks of one loader share: a gloo group for the exchanges, and the one thread that issues them.

    Every source of the loader reads its chunks in `thread` (a single worker, so chunks are read in the order they
    are asked for, which is the same on every rank), and only that thread uses `group`.

    Args:
        group: a gloo group of the loader's ranks, used by nothing else.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genesis-data-shared")


class ChunkEncoder:
    """Encodes the documents of one source's chunks, alone or together with the other ranks, and counts the work.

    Args:
        encoder: the document encoder.
        share: the loader's `TokenizationShare`; `None` encodes every document here.
    """

    def __init__(self, encoder: TokenEncoder, share: TokenizationShare | None = None) -> None:
        self.encoder, self.share = encoder, share
        self.work = EncodingWork()

    @property
    def shared(self) -> bool:
        return self.share is not None

    def encode(self, texts: list[str]) -> np.ndarray:
        """The tokens of `texts` (eos after each), the same on every rank; this rank encodes its slice only."""
        if self.share is None:
            tokens = self._timed(lambda: self.encoder.encode(texts)[0])
            self._count(len(texts), sum(map(len, texts)), len(tokens) - len(texts))
            return tokens
        pieces = self.encoder.split(texts)
        flat = [piece for document in pieces for piece in document]
        sizes = [len(piece) for piece in flat]
        bounds = share_bounds(sizes, self.share.world_size)
        start, end = bounds[self.share.rank], bounds[self.share.rank + 1]
        ids, lengths = self._timed(lambda: self.encoder.encode_pieces(flat[start:end]))
        # A document counts on the rank that encodes its first piece.
        first_pieces = np.cumsum([0, *map(len, pieces[:-1])])
        self._count(int(((first_pieces >= start) & (first_pieces < end)).sum()), sum(sizes[start:end]), len(ids))
        gathered = self._exchange((len(flat), sum(sizes), ids, lengths))
        return self.encoder.join(
            np.concatenate([slice_ids for _, _, slice_ids, _ in gathered]),
            np.concatenate([slice_lengths for _, _, _, slice_lengths in gathered]),
            [len(document) for document in pieces],
        )[0]

    def _timed(self, encode: Callable[[], Any]) -> Any:
        started, cpu_started = time.perf_counter(), time.thread_time()
        result = encode()
        self.work.seconds += time.perf_counter() - started
        self.work.cpu_seconds += time.thread_time() - cpu_started
        return result

    def _count(self, documents: int, characters: int, tokens: int) -> None:
        self.work.documents += documents
        self.work.characters += characters
        self.work.tokens += tokens

    def _exchange(self, mine: tuple) -> list[tuple]:
        """Every rank's `(pieces, characters, ids, lengths)`, in rank order, checked to describe the same chunk."""
        gathered: list = [None] * self.share.world_size
        dist.all_gather_object(gathered, mine, group=self.share.group)
        for rank, (pieces, characters, _, _) in enumerate(gathered):
            if (pieces, characters) != mine[:2]:
                raise ConfigError(
                    f"Rank {rank} read a chunk of {pieces} pieces and {characters} characters where rank "
                    f"{self.share.rank} "
                    f"read {mine[0]} pieces and {mine[1]} characters: the ranks see different documents. Every rank "
                    "must read the same source files (a shared filesystem, or identical copies on every node)."
                )
        return gathered


def tokenization_share(rank: int, world_size: int, share: bool | None) -> TokenizationShare | None:
    """A new gloo group and exchange thread for sharing the tokenization, or `None` to encode everything on every rank.

    Sharing needs the default process group to be this loader's ranks: `share=None` shares when it is (and the world
    size is above one), `share=True` requires it, `share=False` never shares. Every rank must build its loader at the
    same point (creating a group is a collective of the default group).
    """
    if share is False or world_size == 1:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized or dist.get_world_size() != world_size or dist.get_rank() != rank:
        if share:
            seen = f"world size {dist.get_world_size()}, rank {dist.get_rank()}" if initialized else "no process group"
            raise ConfigError(
                f"share_tokenization=True needs the default process group to hold the loader's ranks (rank {rank} of "
                f"{world_size}), but there is {seen}; call torch.distributed.init_process_group first (accelerate "
                "launch does), or pass share_tokenization=False."
            )
        return None
    return TokenizationShare(dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT))


__all__ = ["ChunkEncoder", "EncodingWork", "TokenizationShare", "share_bounds", "tokenization_share"]
