"""Append-only JSON lines that survive a kill: one `os.write` per row, a torn tail repaired on reopen.

A row is one `write(2)` of a whole line to a file opened with `O_APPEND`; on Linux a write to a regular file is not cut
short by a signal, so after a kill at any moment the file holds whole rows, plus at worst one unterminated tail if the
disk filled up mid-write. `read_rows` drops such a tail (it was never a complete row) so the next run appends after
the last complete one.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path


class RowsError(ValueError):
    """A rows file is damaged beyond a torn tail; the message names the line and the fix."""


def read_rows(path: Path, repair: bool = True) -> list[dict]:
    """All complete rows of `path` (none if it does not exist); with `repair`, cut an unterminated last line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data) and repair:
        # Only this module writes the file, so the torn tail is ours: truncate it rather than keep a broken row.
        with path.open("r+b") as handle:
            handle.truncate(complete_end)
    rows = []
    for line_number, line in enumerate(data[:complete_end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise RowsError(
                f"{path}:{line_number} is not valid JSON ({error.msg}); the file was edited by hand. Remove that "
                "line (the row is then generated again) or use a new --output_dir."
            ) from None
    return rows


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append `rows` as JSON lines, one `write` each, then fsync so a power cut cannot lose acknowledged rows."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            written = os.write(descriptor, line)
            if written != len(line):
                raise OSError(f"short write to {path} ({written} of {len(line)} bytes): is the disk full?")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    """Replace `path` with `rows` as JSON lines via a temporary file and a rename; returns the number written."""
    temporary = path.with_name(f".{path.name}.tmp")
    count = 0
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return count
