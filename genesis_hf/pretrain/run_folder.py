"""What a training launch may do with its output folder, one rule for pretraining, SFT and DPO.

A launch never destroys a previous run's results: a `final/` it did not write (or that holds files it did not write)
is refused, and so is a fresh start over `final/` or `metrics.jsonl` with no checkpoint to resume from, unless
`--overwrite_output_dir true` says so. Both are checked before anything loads. `metrics.jsonl` stays one JSON object
per line across kills (a cut last line is dropped before appending).

Pretraining owns the rule; post-training (a later stage) applies the same one to its runs
(`genesis_hf.posttrain.resume`).
"""

import json
from pathlib import Path

from genesis_hf.args import ConfigError
from genesis_hf.layout import EXPORT_MARKER_FILE, FINAL_DIR, METRICS_FILE


def check_run_folder(
    output_dir: str | Path, *, final_marker: str, resumable: bool, overwrite_output_dir: bool
) -> None:
    """Refuse, before any setup, an `output_dir` whose contents this launch would destroy.

    A file is not a folder; a `final/` without `final_marker` (genesis-hf did not write it), or with files that its
    export marker does not list, would be replaced at the end; and results of an earlier run (`final/`,
    `metrics.jsonl`) with no checkpoint to resume from would be silently replaced by a run from step 0, unless
    `overwrite_output_dir` says so.

    Args:
        output_dir: the run's `--output_dir`.
        final_marker: the file that marks a `final/` this kind of run writes.
        resumable: the launch resumes from a checkpoint (found in `output_dir` or given).
        overwrite_output_dir: `--overwrite_output_dir`: a fresh start over earlier results is wanted.

    Raises:
        ConfigError: naming the path, what is there, and the fix.
    """
    from genesis_hf.model.folder import ExportError, check_output_folder

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(
            f"output_dir={str(output_dir)!r} is a file, not a folder; pass --output_dir with a folder path (it is "
            "created)."
        )
    final_dir = output_dir / FINAL_DIR
    if final_dir.is_symlink() or (final_dir.exists() and not (final_dir / final_marker).is_file()):
        kind = "a symlink" if final_dir.is_symlink() else f"a folder without {final_marker}"
        raise ConfigError(
            f"{final_dir} is {kind}: genesis-hf did not write it, and the run's final export would replace it. Move "
            "it elsewhere, or pass a new --output_dir."
        )
    if (final_dir / EXPORT_MARKER_FILE).is_file():
        # The same check the export applies when it replaces final/ at the end, made before anything trains.
        try:
            check_output_folder(final_dir, None, overwrite=True)
        except ExportError as error:
            raise ConfigError(f"{error} (checked before training: the run's final export would stop there)") from None
    if resumable:
        return
    results = []
    if final_dir.exists():
        results.append(f"{FINAL_DIR}/")
    metrics_path = output_dir / METRICS_FILE
    if metrics_path.is_file() and metrics_path.stat().st_size:
        last = last_logged_step(metrics_path)
        results.append(f"{METRICS_FILE}" + (f" (up to step {last})" if last is not None else ""))
    if results and not overwrite_output_dir:
        raise ConfigError(
            f"output_dir={str(output_dir)!r} holds a previous run's results ({', '.join(results)}) but no checkpoint "
            "to resume from: this launch would start again from step 0 and replace them. Pass a new --output_dir, "
            "or --resume_from_checkpoint PATH, or --overwrite_output_dir true to start afresh (metrics.jsonl keeps "
            f"the old records and marks the restart; {FINAL_DIR}/ is replaced at the end)."
        )


def last_logged_step(metrics_path: Path) -> int | None:
    """The step of the last step record (not an event) of a `metrics.jsonl`."""
    step = None
    with open(metrics_path, "rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and "event" not in record:
                step = record["step"]
    return step


def drop_partial_last_line(path: Path) -> None:
    """A SIGKILL can cut the last line of `path` in half; appending after it would glue two records together."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


__all__ = ["check_run_folder", "drop_partial_last_line", "last_logged_step"]
