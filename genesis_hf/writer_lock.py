"""One writer per folder: a command that writes a run or results folder takes it for itself first.

The lock is an `fcntl.flock` on a sibling file, `<parent>/.<name>.genesis_hf.lock` (so the folder itself, which may be
uploaded or checked for foreign files, gets nothing extra). The OS drops the lock when the holder's process ends, even
by SIGKILL, so a dead run never leaves a folder locked; the file holds the holder's PID, host and start time only for
the message a second writer gets. A distributed launch takes it once, on global rank 0 (the other ranks of a refused
launch are torn down with it by the launcher). Within one process, taking a folder again is allowed (same writer).
"""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from genesis_hf.args import ConfigError

LOCK_SUFFIX = ".genesis_hf.lock"


class FolderInUseError(ConfigError):
    """Another process is writing the folder; the message names it (PID, host, since when)."""


# Folders this process holds: lock path -> (open descriptor, how many times taken).
_held: dict[Path, list[int]] = {}


def lock_path(target: str | Path) -> Path:
    """The lock file of a folder or file `target`: `<parent>/.<name>.genesis_hf.lock`, with links resolved."""
    target = Path(target).expanduser().resolve()
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


class FolderLock:
    """A held folder (or a no-op on ranks other than 0); `release()` or the end of the process lets it go."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def release(self) -> None:
        if self.path is None or self.path not in _held:
            return
        entry = _held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            self.path.unlink(missing_ok=True)  # while still locked: a second writer then retries on a fresh file
            os.close(entry[0])
        self.path = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (it has not written its name yet)"
    return f"PID {info['pid']} on {info.get('host', '?')}, since {info.get('since', '?')}"


def hold_folder(target: str | Path, *, flag: str = "--output_dir", rank: int | None = None) -> FolderLock:
    """Take `target` (a folder or a file, existing or not) for this process, or refuse.

    Args:
        target: the folder (or results file) the command writes.
        flag: the option that named it, for the message.
        rank: the process's global rank (default: `$RANK`, 0 without a launcher); only rank 0 takes the lock.

    Raises:
        FolderInUseError: another live process holds it.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        return FolderLock(None)
    path = lock_path(target)
    if path in _held:
        _held[path][1] += 1
        return FolderLock(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise FolderInUseError(
                f"{flag} {target} is being written by another genesis-hf process ({_holder(path)}); wait for it to "
                f"finish or stop it, or pass another {flag}."
            ) from None
        # The previous holder may have removed the file between our open and our lock: lock the file at the path.
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
    _held[path] = [descriptor, 1]
    return FolderLock(path)


def create_exclusively(path: str | Path, text: str) -> Path:
    """Write `text` to `path` only if nothing is there: a complete file or none, never a replaced one.

    The text goes to a temporary file beside `path`, which is then hard-linked to `path` (`os.link` fails on an
    existing name, atomically), so a file that appeared at `path` meanwhile is kept and a reader never sees half a file.

    Raises:
        FileExistsError: `path` exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


__all__ = ["FolderInUseError", "FolderLock", "LOCK_SUFFIX", "create_exclusively", "hold_folder", "lock_path"]
