"""Readers that turn one mixture source into a sequence of document texts, resumable at any document.

Every source is a fixed sequence of raw documents `0, 1, 2, ...` (same order on every read). A reader starts at a
`position` (a small JSON dict, `{"index": i, ...}` plus what it needs to get there without re-reading: a file and a
byte offset for JSON lines, a file and a row for parquet, the `datasets` iterator state for the Hub), and
`position()` always says where the next document starts. Which documents are used for what (training, validation,
a `--shard i/N` slice) is decided above, from the raw index alone, so every reader, every mode and every process
agrees.
"""

import glob
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genesis_hf.args import ConfigError
from genesis_hf.data.mixture import SourceConfig

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
_PARQUET_BATCH_ROWS = 1024


# ---------------------------------------------------------------------------------------------------------------------
# Text extraction


def _render_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        # Chat messages: OpenHermes/ShareGPT use from/value, OpenAI-style sets use role/content.
        lines = []
        for message in value:
            role = message.get("role", message.get("from"))
            content = message.get("content", message.get("value"))
            if role is None or content is None:
                return json.dumps(value, ensure_ascii=False, default=str)
            lines.append(f"{role}: {_render_value(content)}")
        return "\n".join(lines)
    return json.dumps(value, ensure_ascii=False, default=str)


def extract_text(record: Any, fields: tuple[str, ...], where: Callable[[], str]) -> str:
    """The document text of one record: its text field(s), rendered and joined by blank lines.

    Args:
        record: one row (a dict).
        fields: the source's `text_fields`.
        where: builds a description of the record's place for error messages (only called on error).
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where()} is a {type(record).__name__}, not an object with a text field; fix the data.")
    if len(fields) == 1 and type(record.get(fields[0])) is str:
        return record[fields[0]]
    parts = []
    for field in fields:
        if field not in record:
            raise ConfigError(
                f"{where()} has no field {field!r}; its fields are: {', '.join(map(str, record)) or '(none)'}. Set "
                "`text_field` of the source in the mixture to the field holding the text (or a list of fields)."
            )
        parts.append(_render_value(record[field]))
    return "\n\n".join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------------------------------
# Readers


class DocumentReader:
    """Reads the raw documents of one source from a position.

    Subclasses implement `_next(want)`: return the next document's text (or `None` without parsing it when `want`
    is false), raise `StopIteration` at the end, and keep `position()` pointing at the next document.
    """

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.index = 0

    def position(self) -> dict[str, Any]:
        """Where the next document starts; `open_reader(source, position)` resumes there."""
        return {"index": self.index}

    def next_document(self, want: bool = True) -> str | None:
        """The next document's text; `None` (and no parsing) when `want` is false. Raises `StopIteration` at the end,
        and at `max_documents`."""
        if self.source.max_documents is not None and self.index >= self.source.max_documents:
            raise StopIteration
        text = self._next(want)
        self.index += 1
        return text

    def _next(self, want: bool) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files or iterators."""


class EmbeddedReader(DocumentReader):
    """`embedded:stdlib-docs` / `embedded:stdlib-code`: the embedded corpus, held in memory (about 6 MB)."""

    def __init__(self, source: SourceConfig, position: dict[str, Any] | None) -> None:
        super().__init__(source)
        self.documents = _embedded_documents(source.target)
        self.index = int((position or {}).get("index", 0))

    def _next(self, want: bool) -> str | None:
        if self.index >= len(self.documents):
            raise StopIteration
        return self.documents[self.index]


_EMBEDDED_CACHE: dict[str, tuple[str, ...]] = {}


def _embedded_documents(name: str) -> tuple[str, ...]:
    if name not in _EMBEDDED_CACHE:
        from genesis_hf.corpus import iter_documents

        _EMBEDDED_CACHE[name] = tuple(iter_documents(name))
    return _EMBEDDED_CACHE[name]


def _suffix_of(path: str) -> str:
    name = path.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def resolve_local_files(source: SourceConfig) -> list[str]:
    """The sorted files of a local source: a file, every supported file under a folder, or a glob's matches."""
    location = os.path.expanduser(source.location)
    if any(char in location for char in "*?["):
        candidates = sorted(path for path in glob.glob(location, recursive=True) if os.path.isfile(path))
    elif os.path.isdir(location):
        candidates = sorted(str(path) for path in Path(location).rglob("*") if path.is_file())
    elif os.path.isfile(location):
        candidates = [location]
    else:
        hint = f" For a Hub dataset write location: hub:{source.location}." if source.location.count("/") == 1 else ""
        raise ConfigError(f"The {source.describe()} does not exist: no file, folder or glob matches it.{hint}")
    files = [path for path in candidates if _suffix_of(path) in SUPPORTED_SUFFIXES]
    if os.path.isfile(location) and not files:
        raise ConfigError(
            f"The {source.describe()} is a {_suffix_of(location) or 'suffix-less'} file; supported files end with "
            + ", ".join(SUPPORTED_SUFFIXES)
            + "."
        )
    if not files:
        raise ConfigError(
            f"The {source.describe()} has no documents: it matches no file ending with "
            + ", ".join(SUPPORTED_SUFFIXES)
            + ". Point it at your data, or remove the source."
        )
    return files


def _read_text_file(path: str, source: SourceConfig) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = Path(path).read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line} (a file of the {source.describe()}) is not UTF-8 text: byte {error.start} "
            f"({error.object[error.start : error.start + 1]!r}) cannot be decoded. Convert the file to UTF-8 (e.g. "
            "`iconv -f latin1 -t utf-8`), or remove it from the source."
        ) from None


class LocalFilesReader(DocumentReader):
    """Local files, in sorted order: JSON lines (one document per non-blank line), parquet (one per row), text files
    (one per file). Position: file number and path, byte offset and line number (JSON lines) or row (parquet)."""

    def __init__(self, source: SourceConfig, position: dict[str, Any] | None) -> None:
        super().__init__(source)
        self.files = resolve_local_files(source)
        position = position or {}
        self.index = int(position.get("index", 0))
        self.file_number = int(position.get("file", 0))
        self.offset = int(position.get("offset", 0))
        self.line = int(position.get("line", 0))
        self.row = int(position.get("row", 0))
        # Files are named relative to their common folder, so a resume finds them after the data moved.
        self._root = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in self.files])
        saved_path = position.get("path")
        if (
            saved_path is not None
            and self.file_number < len(self.files)
            and self._relative(self.file_number) != saved_path
        ):
            raise ConfigError(
                f"The files of the {source.describe()} changed since this position was saved: file number "
                f"{self.file_number} was {saved_path!r} and is now {self._relative(self.file_number)!r}. Resume "
                "with the same files, or start the run afresh."
            )
        self._handle = None
        self._rows: list[dict[str, Any]] = []
        self._rows_start = 0

    def _relative(self, file_number: int) -> str:
        return os.path.relpath(os.path.abspath(self.files[file_number]), self._root)

    def position(self) -> dict[str, Any]:
        path = self._relative(self.file_number) if self.file_number < len(self.files) else None
        return {
            "index": self.index,
            "file": self.file_number,
            "path": path,
            "offset": self.offset,
            "line": self.line,
            "row": self.row,
        }

    def _advance_file(self) -> None:
        self.close()
        self.file_number += 1
        self.offset = self.line = self.row = 0

    def _next(self, want: bool) -> str | None:
        while self.file_number < len(self.files):
            path = self.files[self.file_number]
            suffix = _suffix_of(path)
            if suffix in TEXT_SUFFIXES:
                if self.row > 0:
                    self._advance_file()
                    continue
                self.row = 1
                return _read_text_file(path, self.source) if want else None
            text = self._next_jsonl(path, want) if suffix in JSONL_SUFFIXES else self._next_parquet(path, want)
            if text is not _END_OF_FILE:
                return text
            self._advance_file()
        raise StopIteration

    def _next_jsonl(self, path: str, want: bool) -> Any:
        if self._handle is None:
            self._handle = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
            self._handle.seek(self.offset)
        while True:
            raw = self._handle.readline()
            if not raw:
                return _END_OF_FILE
            self.offset += len(raw)
            self.line += 1
            if not raw.strip():
                continue
            if not want:
                return None
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
                raise ConfigError(
                    f"{path}:{self.line} (line {self.line} of the {self.source.describe()}) is not valid JSON "
                    f"({reason}). JSON lines files hold one JSON object per line; fix or delete that line."
                ) from None
            return extract_text(
                record, self.source.text_fields, lambda line=self.line: f"{path}:{line} (the {self.source.describe()})"
            )

    def _next_parquet(self, path: str, want: bool) -> Any:
        import pyarrow.parquet as pq

        if self._handle is None:
            self._handle = pq.ParquetFile(path)
            names = self._handle.schema_arrow.names
            missing = [field for field in self.source.text_fields if field not in names]
            if missing:
                raise ConfigError(
                    f"{path} (the {self.source.describe()}) has no column {missing[0]!r}; its columns are: "
                    f"{', '.join(names)}. Set `text_field` of the source to the column holding the text."
                )
            self._batches = self._handle.iter_batches(
                batch_size=_PARQUET_BATCH_ROWS, columns=list(self.source.text_fields)
            )
            self._rows, self._rows_start = [], 0
            # Skip whole batches up to the saved row without converting them to Python.
            for batch in self._batches:
                if self._rows_start + batch.num_rows > self.row:
                    self._rows = batch.to_pylist()
                    break
                self._rows_start += batch.num_rows
        local = self.row - self._rows_start
        if local >= len(self._rows):
            batch = next(self._batches, None)
            if batch is None:
                return _END_OF_FILE
            self._rows_start += len(self._rows)
            self._rows, local = batch.to_pylist(), 0
        record = self._rows[local]
        self.row += 1
        if not want:
            return None
        return extract_text(
            record,
            self.source.text_fields,
            lambda row=self.row - 1: f"{path} row {row} (the {self.source.describe()})",
        )

    def close(self) -> None:
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = None
        self._rows = []


_END_OF_FILE = object()


class HubReader(DocumentReader):
    """A Hub dataset streamed with `datasets.load_dataset(..., streaming=True)`; resumes with the iterable dataset's
    own `state_dict()`, so no document is downloaded twice."""

    def __init__(self, source: SourceConfig, position: dict[str, Any] | None) -> None:
        super().__init__(source)
        self.dataset = open_hub_dataset(source)
        position = position or {}
        self.index = int(position.get("index", 0))
        self._opened_at = position
        if position.get("datasets_state") is not None:
            self.dataset.load_state_dict(position["datasets_state"])
        self._iterator = None

    def position(self) -> dict[str, Any]:
        if self._iterator is None:
            return {"index": self.index, "datasets_state": self._opened_at.get("datasets_state")}
        return {"index": self.index, "datasets_state": self.dataset.state_dict()}

    def _next(self, want: bool) -> str | None:
        if self._iterator is None:
            self._iterator = iter(self.dataset)
        record = next(self._iterator)
        if not want:
            return None
        return extract_text(
            record, self.source.text_fields, lambda index=self.index: f"Row {index} of the {self.source.describe()}"
        )

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


def open_hub_dataset(source: SourceConfig):
    """`datasets.load_dataset(..., streaming=True)` for a `hub:` source, with errors that say what to do."""
    import datasets

    kwargs = {"split": source.split, "streaming": True}
    for key in ("data_dir", "data_files"):
        if getattr(source, key) is not None:
            kwargs[key] = getattr(source, key)
    try:
        return datasets.load_dataset(source.target, source.config, **kwargs)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or os.environ.get(
            "HF_DATASETS_OFFLINE", "0"
        ).lower() in ("1", "true", "yes", "on")
        network = offline or isinstance(error, (ConnectionError, TimeoutError)) or "offline" in message.lower()
        if network:
            raise ConfigError(
                f"Cannot reach the Hub dataset {source.target!r} for the {source.describe()}"
                + (" (HF_HUB_OFFLINE is set)" if offline else " (no network?)")
                + f": {message}. On a machine with network, run `genesis-hf data prepare --mixture ... --tokenizer "
                "... --output_dir DIR` and train with tokenized_dir=DIR, or download the dataset and set the "
                "source's location to the local files."
            ) from None
        raise ConfigError(
            f"Cannot open the Hub dataset {source.target!r} for the {source.describe()}: {message}. Check the "
            "dataset id, `config`, `split` and `data_dir` (and `huggingface-cli login` for gated datasets)."
        ) from None


def open_reader(source: SourceConfig, position: dict[str, Any] | None = None) -> DocumentReader:
    """A reader for `source`, at `position` (the start when `None`).

    Args:
        source: the source.
        position: a `DocumentReader.position()` saved earlier for the same source.
    """
    if source.kind == "embedded":
        return EmbeddedReader(source, position)
    if source.kind == "hub":
        return HubReader(source, position)
    return LocalFilesReader(source, position)


__all__ = ["DocumentReader", "extract_text", "open_hub_dataset", "open_reader", "resolve_local_files"]
