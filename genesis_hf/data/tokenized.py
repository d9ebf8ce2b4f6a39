"""On-disk layout of pre-tokenized data: flat token files, per-document indexes, JSON indexes, and merging.

One `genesis-hf data prepare --shard i/N` run writes, for every source and split (`train`, `validation`):

    DIR/index-0000i-of-0000N.json          this shard's index (dtype, tokenizer fingerprint, token counts, files)
    DIR/<source>/<split>-0000i-of-0000N.bin    the tokens, raw `uint16` (vocab <= 65536) or `uint32`, eos after
                                                every document, documents in source order
    DIR/<source>/<split>-0000i-of-0000N.docs   int64 pairs (raw document index, end offset in the .bin)

and a run with `N == 1` also writes `DIR/index.json`, the index the loader reads. Shard `i` holds documents
`i, i + N, i + 2N, ...` of every source. `genesis-hf data merge DIR1 [DIR2 ...] --output_dir OUT` reads only the
small per-shard indexes and `.docs` files, never the tokens: it writes `OUT/index.json` pointing at the shards' files
where they are, plus, when `N > 1`, one `OUT/<source>/<split>-order.npy` per source and split: a (3, documents)
int64 table (file number, start in that file, cumulative end) listing the documents in raw order. Reading the
merged data then yields exactly the token stream of a single unsharded run, which is what streaming mode yields too.
"""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from genesis_hf.args import ConfigError

FORMAT = "genesis-hf-tokenized"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "validation")


def shard_suffix(shard_index: int, num_shards: int) -> str:
    return f"{shard_index:05d}-of-{num_shards:05d}"


def shard_index_name(shard_index: int, num_shards: int) -> str:
    return f"index-{shard_suffix(shard_index, num_shards)}.json"


class TokenFileWriter:
    """Appends the documents of one source split of one shard to its `.bin` and `.docs` files.

    Args:
        output_dir: the tokenized directory.
        source_name: the source's name (the sub-folder).
        split: `"train"` or `"validation"`.
        shard_index: this shard's number `i`.
        num_shards: the number of shards `N`.
        dtype: the token dtype of the files.
    """

    def __init__(
        self, output_dir: Path, source_name: str, split: str, shard_index: int, num_shards: int, dtype: np.dtype
    ) -> None:
        folder = Path(output_dir) / source_name
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{split}-{shard_suffix(shard_index, num_shards)}"
        self.tokens_path = folder / f"{stem}.bin"
        self.documents_path = folder / f"{stem}.docs"
        self.relative_tokens = f"{source_name}/{stem}.bin"
        self.relative_documents = f"{source_name}/{stem}.docs"
        self.dtype = np.dtype(dtype)
        self._tokens_file = self.tokens_path.open("wb")
        self._documents_file = self.documents_path.open("wb")
        self.tokens = 0
        self.documents = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray, raw_indices: np.ndarray) -> None:
        """Append documents.

        Args:
            tokens: (sum(lengths),) the documents' tokens, eos included.
            lengths: (documents,) token count of each document.
            raw_indices: (documents,) each document's raw index in its source.
        """
        if len(lengths) == 0:
            return
        self._tokens_file.write(tokens.astype(self.dtype, copy=False).tobytes())
        ends = self.tokens + np.cumsum(lengths, dtype=np.int64)
        # (documents, 2): raw index, end offset; interleaved so one append keeps the file consistent.
        pairs = np.stack([np.asarray(raw_indices, dtype=np.int64), ends], axis=1)
        self._documents_file.write(pairs.tobytes())
        self.tokens = int(ends[-1])
        self.documents += len(lengths)

    def close(self) -> dict[str, Any]:
        """Flush and return this file pair's index entry."""
        self._tokens_file.close()
        self._documents_file.close()
        return {
            "tokens_file": self.relative_tokens,
            "documents_file": self.relative_documents,
            "tokens": self.tokens,
            "documents": self.documents,
        }


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename): a reader never sees half an index."""
    temporary = Path(f"{path}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(values, indent=1, sort_keys=False) + "\n")
    os.replace(temporary, path)


def read_documents_file(path: Path) -> np.ndarray:
    """(documents, 2) int64: raw index and end offset of each document of a `.docs` file."""
    if path.stat().st_size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return np.fromfile(path, dtype=np.int64).reshape(-1, 2)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"Cannot read the tokenized index {str(path)!r}: {error}.") from None
    if values.get("format") != FORMAT or values.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{str(path)!r} is not a {FORMAT} v{FORMAT_VERSION} index (format={values.get('format')!r}, "
            f"version={values.get('version')!r}); re-run `genesis-hf data prepare`."
        )
    return values


def _shard_indexes(directory: Path) -> list[Path]:
    return sorted(directory.glob("index-*-of-*.json"))


# Keys that every shard of one prepared dataset must agree on.
_SHARED_KEYS = ("dtype", "vocab_size", "eos_token_id", "tokenizer_fingerprint", "mixture", "max_tokens")


def merge_tokenized(input_dirs: list[str | Path], output_dir: str | Path) -> dict[str, Any]:
    """Merge the per-shard indexes found in `input_dirs` into `output_dir/index.json`, without copying tokens.

    Args:
        input_dirs: directories written by `prepare --shard i/N` runs (one directory may hold several shards).
        output_dir: where `index.json` (and the order tables) go; may be one of the input directories.

    Returns:
        The merged index.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shards = _read_shard_indexes(input_dirs)
    ordered = _check_shards_agree(shards)
    first = ordered[0][1]
    source_names = [source["name"] for source in first["mixture"]["sources"]]
    merged_sources = {
        name: {split: _merge_split(name, split, ordered, output_dir) for split in SPLITS} for name in source_names
    }
    merged = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **{key: first[key] for key in _SHARED_KEYS},
        "num_shards": len(ordered),
        "tokens_per_shard": [values["tokens"] for _, values in ordered],
        "tokens_per_source": {name: merged_sources[name]["train"]["tokens"] for name in source_names},
        "validation_tokens_per_source": {name: merged_sources[name]["validation"]["tokens"] for name in source_names},
        "sources": merged_sources,
    }
    empty = [name for name in source_names if merged["tokens_per_source"][name] == 0]
    if empty:
        raise ConfigError(
            f"Source(s) {', '.join(empty)} have no training tokens in any shard: the source is empty (or every "
            "document is held out). Fix the source's location, or remove it from the mixture."
        )
    write_json(output_dir / INDEX_NAME, merged)
    return merged


def _read_shard_indexes(input_dirs: list[str | Path]) -> dict[int, tuple[Path, dict[str, Any]]]:
    """Every per-shard index in `input_dirs`, by shard number, with its path."""
    shards: dict[int, tuple[Path, dict[str, Any]]] = {}
    for directory in map(Path, input_dirs):
        paths = _shard_indexes(directory)
        if not paths:
            raise ConfigError(
                f"{str(directory)!r} holds no per-shard index (index-XXXXX-of-XXXXX.json); pass directories written "
                "by `genesis-hf data prepare`."
            )
        for path in paths:
            values = _load_json(path)
            shard = values["shard"]["index"]
            if shard in shards:
                raise ConfigError(f"Shard {shard} appears twice: in {str(shards[shard][0])!r} and {str(path)!r}.")
            shards[shard] = (path, values)
    return shards


def _check_shards_agree(shards: dict[int, tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """The shards in order, after checking that they come from one preparation and that none is missing."""
    first = next(iter(shards.values()))[1]
    num_shards = first["shard"]["count"]
    for path, values in shards.values():
        for key in (*_SHARED_KEYS, "shard"):
            reference = first["shard"]["count"] if key == "shard" else first[key]
            value = values["shard"]["count"] if key == "shard" else values[key]
            if value != reference:
                label = "the shard count" if key == "shard" else key
                raise ConfigError(
                    f"{str(path)!r} differs from the other shards in {label} ({value!r} vs {reference!r}): every "
                    "shard must come from the same mixture, tokenizer and `--shard i/N` count."
                )
    missing = sorted(set(range(num_shards)) - set(shards))
    if missing:
        raise ConfigError(
            f"Shards {missing} of {num_shards} are missing; run `genesis-hf data prepare ... --shard i/{num_shards}` "
            "for each of them (e.g. the failed tasks of the SLURM array), then merge again."
        )
    return [shards[index] for index in range(num_shards)]


def _merge_split(
    name: str, split: str, ordered: list[tuple[Path, dict[str, Any]]], output_dir: Path
) -> dict[str, Any]:
    """The merged index entry of one source split; with several shards, also write its document order table."""
    files, file_tokens, file_documents, documents_files = [], [], [], []
    for path, values in ordered:
        entry = values["sources"][name][split]
        files.append(os.path.relpath(path.parent / entry["tokens_file"], output_dir))
        documents_files.append(path.parent / entry["documents_file"])
        file_tokens.append(entry["tokens"])
        file_documents.append(entry["documents"])
    order_file = None
    if len(ordered) > 1:
        order_file = f"{name}/{split}-order.npy"
        (output_dir / name).mkdir(parents=True, exist_ok=True)
        np.save(output_dir / order_file, _document_order(documents_files))
    return {
        "tokens": int(sum(file_tokens)),
        "documents": int(sum(file_documents)),
        "files": files,
        "file_tokens": file_tokens,
        "order": order_file,
    }


def _document_order(documents_files: list[Path]) -> np.ndarray:
    """(3, documents) int64: file number, start offset in that file and cumulative end of each document, in raw
    document order across all shard files."""
    file_numbers, starts, lengths, raw = [], [], [], []
    for number, path in enumerate(documents_files):
        pairs = read_documents_file(path)
        ends = pairs[:, 1]
        begins = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        file_numbers.append(np.full(len(ends), number, dtype=np.int64))
        starts.append(begins)
        lengths.append(ends - begins)
        raw.append(pairs[:, 0])
    raw_all = np.concatenate(raw)
    order = np.argsort(raw_all, kind="stable")
    return np.stack(
        [np.concatenate(file_numbers)[order], np.concatenate(starts)[order], np.cumsum(np.concatenate(lengths)[order])]
    )


class TokenArray:
    """The token stream of one source split, read with `np.memmap` slicing, wrapping around at its end.

    Args:
        directory: the tokenized directory.
        entry: the split's entry of `index.json`.
        dtype: the token dtype.
    """

    def __init__(self, directory: Path, entry: dict[str, Any], dtype: np.dtype) -> None:
        self.length = int(entry["tokens"])
        self.files = []
        for relative, tokens in zip(entry["files"], entry["file_tokens"]):
            path = directory / relative
            if not path.is_file() or path.stat().st_size != tokens * np.dtype(dtype).itemsize:
                raise ConfigError(
                    f"Token file {str(path)!r} is missing or has the wrong size (expected {tokens} tokens); the "
                    "tokenized directory is incomplete or was moved. Re-run prepare (or merge) for it."
                )
            self.files.append(np.memmap(path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype=dtype))
        self.order = None
        if entry.get("order"):
            table = np.load(directory / entry["order"], mmap_mode="r")
            # Rows of a (3, documents) C-ordered table are contiguous, so searchsorted on the ends reads O(log n) pages.
            self.order_files, self.order_starts, self.order_ends = table[0], table[1], table[2]
            self.order = table

    def read(self, start: int, count: int) -> np.ndarray:
        """`count` tokens from offset `start` (taken modulo the length: the stream repeats)."""
        if self.length == 0:
            if count:
                raise ValueError("Cannot read tokens from an empty token array.")
            return np.zeros(0, dtype=self.files[0].dtype if self.files else np.uint16)
        pieces = []
        start %= self.length
        while count > 0:
            piece = self._read_contiguous(start, count)
            pieces.append(piece)
            count -= len(piece)
            start = (start + len(piece)) % self.length
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _read_contiguous(self, start: int, count: int) -> np.ndarray:
        """Up to `count` tokens from `start` that lie in one file without crossing its end (or the stream's end)."""
        if self.order is None:
            # Unsharded: the files (one per shard, here one) are concatenated in order.
            for tokens in self.files:
                if start < len(tokens):
                    return tokens[start : start + count]
                start -= len(tokens)
            raise IndexError(start)
        document = int(np.searchsorted(self.order_ends, start, side="right"))
        document_begin = int(self.order_ends[document - 1]) if document else 0
        within = start - document_begin
        file_start = int(self.order_starts[document]) + within
        length = int(self.order_ends[document]) - document_begin - within
        tokens = self.files[int(self.order_files[document])]
        return tokens[file_start : file_start + min(length, count)]


class TokenizedData:
    """A merged tokenized directory (`index.json`), opened for reading.

    Args:
        directory: the directory holding `index.json`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            shard_files = _shard_indexes(self.directory) if self.directory.is_dir() else []
            if shard_files:
                raise ConfigError(
                    f"{str(self.directory)!r} holds {len(shard_files)} per-shard index file(s) but no {INDEX_NAME}; "
                    f"merge them first: `genesis-hf data merge {self.directory} --output_dir {self.directory}`."
                )
            raise ConfigError(
                f"{str(self.directory)!r} is not a tokenized directory (no {INDEX_NAME}); create one with "
                "`genesis-hf data prepare --mixture M --tokenizer T --output_dir DIR`."
            )
        self.index = _load_json(index_path)
        self.dtype = np.dtype(self.index["dtype"])

    def array(self, source_name: str, split: str) -> TokenArray:
        return TokenArray(self.directory, self.index["sources"][source_name][split], self.dtype)


__all__ = ["TokenArray", "TokenFileWriter", "TokenizedData", "merge_tokenized", "shard_index_name"]
