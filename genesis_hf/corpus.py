"""An embedded default corpus that every machine already has: the running Python's standard library.

Tests, smoke runs and the default tokenizer need real text without a download. The standard library is English prose
(docstrings and the `pydoc` topic pages) and idiomatic Python code, about 6 MB in all, and it is read in sorted order,
so the same interpreter always yields the same documents in the same order.

Two sources:

- `"stdlib-docs"` (prose): one document per `pydoc_data.topics` page (sorted by topic name), then one document per
  top-level stdlib module holding its module, class and function docstrings in source order, separated by blank lines.
- `"stdlib-code"` (code): the source of each top-level stdlib `*.py` file, one document per file.

Only the top-level `*.py` files of the stdlib directory are read: no packages, no `test/`, no `site-packages`.
"""

import ast
import functools
import itertools
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

EMBEDDED_SOURCES: tuple[str, ...] = ("stdlib-docs", "stdlib-code")

# `_sysconfigdata_*.py` is generated at build time (compiler flags, install paths): it differs between machines
# with the same Python version and is data, not code anyone writes.
_SKIPPED_PREFIXES = ("_sysconfigdata",)

_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library (not site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    files = (path for path in stdlib_dir().glob("*.py") if path.is_file())
    return tuple(sorted(path for path in files if not path.name.startswith(_SKIPPED_PREFIXES)))


def _read_source(path: Path) -> str | None:
    """The text of `path`, or `None` when it is not valid UTF-8 (or vanished since it was listed)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _docstrings_in_source_order(node: ast.AST) -> Iterator[str]:
    # Depth-first in source order, so a class docstring comes right before its methods' (`ast.walk` is breadth-first).
    if isinstance(node, _DOCSTRING_NODES):
        docstring = ast.get_docstring(node, clean=True)
        if docstring and docstring.strip():
            yield docstring.strip()
    for child in ast.iter_child_nodes(node):
        yield from _docstrings_in_source_order(child)


@functools.cache
def _module_docstrings(path: Path) -> str:
    """All docstrings of one module joined by blank lines; `""` when it has none or does not parse.

    Cached because parsing the whole stdlib takes seconds and the corpus is read many times per process.
    """
    source = _read_source(path)
    if source is None:
        return ""
    try:
        # Old modules carry invalid escape sequences in plain strings; the SyntaxWarning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError):
        return ""
    return "\n\n".join(_docstrings_in_source_order(tree))


def _iter_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text
    for path in _stdlib_files():
        text = _module_docstrings(path)
        if text:
            yield text


def _iter_code() -> Iterator[str]:
    for path in _stdlib_files():
        text = _read_source(path)
        if text is not None and text.strip():
            yield text


_SOURCES = {"stdlib-docs": _iter_docs, "stdlib-code": _iter_code}


def _check_max_documents(max_documents: int | None, name: str) -> None:
    if max_documents is not None and (isinstance(max_documents, bool) or max_documents < 0):
        raise ValueError(f"{name} must be None (all documents) or a non-negative integer, got {max_documents!r}.")


def iter_documents(source: str, max_documents: int | None = None) -> Iterator[str]:
    """Iterate over the documents of one embedded source, in a fixed order.

    The source name is checked when this is called, not on the first `next()`.

    Args:
        source: one of `EMBEDDED_SOURCES` (`"stdlib-docs"` for prose, `"stdlib-code"` for Python code).
        max_documents: stop after this many documents; `None` yields them all.
    """
    if source not in _SOURCES:
        raise ValueError(f"Unknown embedded source {source!r}; valid sources are: {', '.join(EMBEDDED_SOURCES)}.")
    _check_max_documents(max_documents, "max_documents")
    return itertools.islice(_SOURCES[source](), max_documents)


def default_corpus(max_documents_per_source: int | None = None) -> Iterator[str]:
    """Iterate over every embedded source, taking one document from each in turn (prose, code, prose, ...).

    Interleaving keeps any prefix of the corpus a mix of prose and code, so a consumer that stops early (a tokenizer
    with a text budget, a short smoke run) still sees both. When one source runs out the other continues alone.

    Args:
        max_documents_per_source: take at most this many documents from each source; `None` takes them all.
    """
    _check_max_documents(max_documents_per_source, "max_documents_per_source")
    iterators = [iter_documents(source, max_documents_per_source) for source in EMBEDDED_SOURCES]
    return _round_robin(iterators)


def _round_robin(iterators: list[Iterator[str]]) -> Iterator[str]:
    active = list(iterators)
    while active:
        still_active = []
        for iterator in active:
            document = next(iterator, None)
            if document is not None:
                yield document
                still_active.append(iterator)
        active = still_active


__all__ = ["EMBEDDED_SOURCES", "default_corpus", "iter_documents", "stdlib_dir"]
