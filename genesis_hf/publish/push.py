"""Push checkpoints to the Hub while training runs, without ever making the training loop wait.

`CheckpointPusher` is a subscriber of the training events (`genesis_hf.events.TrainingCallback`): the pretraining loop
and TRL's SFT/DPO trainers (through `TrainerEvents`) announce each saved checkpoint, and `on_checkpoint_saved` records
it in a journal and returns. A background thread exports it (a verified `hf` folder with its card, see
`genesis_hf.publish.export`) and uploads it once with `huggingface_hub`: `create_repo(exist_ok=True)`, one
`upload_folder` to `main` (which follows the newest checkpoint), then `create_branch("step-XXXXXXX", revision=<that
commit>)`, so the branch and `main` point at the same commit. A checkpoint older than the one already on `main` (left
pending by an interrupted run) is uploaded to its branch only, so that `main` never goes back.

Crashes lose nothing. The journal `<output_dir>/hub_uploads.json` holds one entry per checkpoint (`pending` -> `done`,
or `failed` when the export itself is wrong) with the phases already finished; a new pusher on the same output
directory (a resumed run) uploads whatever is still pending. A checkpoint's local copy must stay until its upload is
confirmed: `may_delete(checkpoint_dir)` is the predicate for the trainer's retention policy (`save_total_limit`).
transformers' Trainer (TRL's SFT and DPO) rotates `checkpoint-N` folders on its own schedule, so those are uploaded
from a hard-linked copy the pusher owns (`<output_dir>/.hub_staging/`), removed once the upload is confirmed.
Optionally the raw training state (the DCP checkpoint directory) also goes to a separate private repo
(`backup_repo_id`) as an off-site backup.

The token is only ever handed to `huggingface_hub`: it is never logged, written to the journal, a config or a card,
and error messages are scrubbed of it. `preflight(repo_id, token)` checks the repo id and the token (present, valid,
allowed to write to the namespace) before training starts, so a bad token fails in seconds rather than at the first
checkpoint hours later.
"""

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from genesis_hf.args import ConfigError
from genesis_hf.events import TrainingCallback
from genesis_hf.layout import (
    EXPORT_MARKER_FILE,
    HUB_EXPORTS_DIR,
    HUB_JOURNAL_FILE,
    HUB_STAGING_DIR,
    TRL_CHECKPOINT,
    checkpoint_name,
    has_weights,
)

logger = logging.getLogger(__name__)

# Version 2: one upload per checkpoint (phases `export`, `commit`, `branch`, `backup`); version 1 uploaded twice.
JOURNAL_VERSION = 2
_TOKEN_HELP = (
    "Create a token with write access at https://huggingface.co/settings/tokens and pass it as HF_TOKEN (or log in "
    "with `hf auth login`), or turn push_to_hub off."
)


class PublishError(ConfigError):
    """Pushing cannot work with these settings; the message names the value and the fix (never the token).

    A `ConfigError`, so recipes report it like any other bad setting, before training starts.
    """


def scrub(text: str, token: str | None) -> str:
    """`text` with the token masked, for anything that is logged or written."""
    return text.replace(token, "***") if token else text


def check_repo_id(repo_id: str, setting: str = "hub_model_id") -> None:
    """Raise `PublishError` unless `repo_id` is a valid Hub repo id (huggingface_hub's validator).

    Args:
        repo_id: the id to check, `namespace/name` or `name`.
        setting: the config key it came from, for the message.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise PublishError(f"{setting} is {repo_id!r}; set it to a repo id like 'your-name/genesis-1b'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(
            f"{setting}={repo_id!r} is not a valid Hub repo id ({error}). Use 'namespace/name' with letters, digits, "
            "'-', '_' and '.', e.g. 'your-name/genesis-1b'."
        ) from None


def resolve_token(token: str | None) -> str:
    """The explicit token, else the one `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`); raise when none."""
    token = token or get_token()
    if not token:
        raise PublishError(f"Pushing to the Hub needs a token with write access, and none was found. {_TOKEN_HELP}")
    return token


def preflight(
    repo_id: str, token: str | None = None, *, endpoint: str | None = None, backup_repo_id: str | None = None
) -> str:
    """Check, before training starts, that checkpoints can be pushed to `repo_id`; returns the full repo id.

    Checks the repo id, that a token exists, that the Hub accepts it (`whoami`), that it is not read-only, and that
    its user may write to the repo's namespace.

    Args:
        repo_id: `namespace/name` or `name` (the token's user namespace is then used).
        token: the token; `huggingface_hub`'s own lookup when `None`.
        endpoint: the Hub URL (`HF_ENDPOINT` when `None`).
        backup_repo_id: the private backup repo, checked the same way.

    Raises:
        PublishError: with what was wrong and the fix.
    """
    check_repo_id(repo_id)
    if backup_repo_id is not None:
        check_repo_id(backup_repo_id, setting="hub_backup_repo_id")
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        identity = api.whoami()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise PublishError(f"The Hub rejected the token (401 invalid credentials). {_TOKEN_HELP}") from None
        raise PublishError(
            f"Could not check the token with {api.endpoint}/api/whoami-v2: {scrub(str(error), token)}"
        ) from None
    except OSError as error:
        raise PublishError(f"Could not reach the Hub at {api.endpoint} to check the token: {error}") from None
    user = identity.get("name")
    access = (identity.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise PublishError(
            f"The token of user {user!r} is read-only (role 'read'), so checkpoints could not be uploaded to "
            f"{repo_id!r}. {_TOKEN_HELP}"
        )
    if role == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        if not any("repo.write" in item.get("permissions", []) for item in scoped):
            raise PublishError(
                f"The fine-grained token of user {user!r} has no 'repo.write' permission, so checkpoints could not be "
                f"uploaded to {repo_id!r}. Add write access to repos in the token settings, or {_TOKEN_HELP}"
            )
    namespaces = {user, *(org.get("name") for org in identity.get("orgs", []))}
    full_ids = []
    for repo in (repo_id, backup_repo_id):
        if repo is None:
            continue
        full_id = repo if "/" in repo else f"{user}/{repo}"
        namespace = full_id.split("/")[0]
        if namespace not in namespaces:
            raise PublishError(
                f"The token belongs to {user!r}, who cannot write to namespace {namespace!r} of {full_id!r} "
                f"(writable: {', '.join(sorted(name for name in namespaces if name))}). Use one of those namespaces or "
                "a token of a member of that organization."
            )
        full_ids.append(full_id)
    return full_ids[0]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Superseded(Exception):
    """The checkpoint was submitted again (e.g. `final/` at the step of the last `checkpoint-N`) while an older
    submission of it was being uploaded: that upload must not record anything."""


class UploadJournal:
    """`<output_dir>/hub_uploads.json`: one entry per checkpoint, rewritten atomically on every change.

    ```json
    {"version": 2, "repo_id": "you/genesis-1b", "main_step": 800,
     "uploads": {"step-0000800": {"step": 800, "checkpoint_dir": "...", "submission": "3f2a9c1e", "state": "pending",
                                  "phases": {"export": true, "commit": "<oid>", "branch": false, "backup": null},
                                  "attempts": 1, "last_error": "...", "submitted_at": "...", "confirmed_at": null}}}
    ```
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self.data = {"version": JOURNAL_VERSION, "repo_id": None, "main_step": None, "uploads": {}}
        if self.path.is_file():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except json.JSONDecodeError:
                # Only an interrupted write outside `save` could do this; keep the evidence and start over.
                self.path.rename(self.path.with_suffix(".corrupt.json"))
                logger.warning("Upload journal %s was unreadable; moved it aside and started a new one.", self.path)
        if self.data["version"] < JOURNAL_VERSION:
            # Version 1 phases (`branch`, `main`) mean other things: what is pending starts over, the backup excepted.
            for entry in self.data["uploads"].values():
                if entry.get("state") == "pending":
                    backup = entry.get("phases", {}).get("backup")
                    entry.update(
                        submission=uuid.uuid4().hex[:8],
                        phases={"export": False, "commit": None, "branch": False, "backup": backup},
                    )
            self.data["version"] = JOURNAL_VERSION

    def save(self) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with temporary.open("w") as handle:
                json.dump(self.data, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)

    def entry(self, step: int) -> dict | None:
        with self._lock:
            return self.data["uploads"].get(checkpoint_name(step))

    def update(self, step: int, expected_submission: str | None = None, **values) -> dict:
        """Set `values` on the entry of `step`; with `expected_submission`, only if that is still its submission.

        Raises:
            Superseded: the step was submitted again since `expected_submission`.
        """
        with self._lock:
            if expected_submission is not None:
                entry = self._entry_of(step, expected_submission)
            else:
                entry = self.data["uploads"].setdefault(checkpoint_name(step), {"step": step})
            entry.update(values)
            self.save()
            return entry

    def set_phases(self, step: int, submission: str, main_step: int | None = None, **phases) -> None:
        """Record finished phases of `submission` (and that `main` now holds `main_step`) in one write."""
        with self._lock:
            entry = self._entry_of(step, submission)
            entry["phases"] = {**entry["phases"], **phases}
            if main_step is not None:
                self.data["main_step"] = main_step
            self.save()

    def _entry_of(self, step: int, submission: str) -> dict:
        """The entry of `step`, if `submission` is still its submission (call with the lock held).

        Raises:
            Superseded: the step was submitted again since `submission` (or is not in the journal).
        """
        entry = self.data["uploads"].get(checkpoint_name(step))
        if entry is None or entry.get("submission") != submission:
            raise Superseded(step)
        return entry

    def steps(self, state: str | None = None) -> list[int]:
        with self._lock:
            return sorted(
                entry["step"] for entry in self.data["uploads"].values() if state is None or entry["state"] == state
            )


class CheckpointPusher(TrainingCallback):
    """Export and upload checkpoints in a background thread, one Hub branch per checkpoint; `main` follows the newest.

    A training events subscriber: `on_checkpoint_saved` queues each checkpoint, `may_delete` keeps it out of the
    rotation until its upload is confirmed, `on_train_end` queues the run's `final/` (SFT/DPO) and `close` waits for
    the uploads. `pusher_for_run(args, is_main_process=...)` builds one from a run's arguments.

    Args:
        repo_id: the model repo, `namespace/name`.
        token: a write token; `huggingface_hub`'s own lookup (`HF_TOKEN`, `hf auth login`) when `None`.
        output_dir: the run's output directory, where the journal and the staged exports live.
        export_format: `hf` (default) or `llama`, see `genesis_hf.publish.export`.
        dtype: weights dtype of the pushed export (`bf16`, `fp32`).
        max_shard_size: safetensors shard size.
        private: create the repo private (ignored if it exists).
        backup_repo_id: a private repo that receives the raw training checkpoint directory (DCP shards, optimizer
            state) under `checkpoints/step-XXXXXXX/`, as an off-site backup.
        update_main: commit each checkpoint to `main` (then branch from that commit) as long as it is the newest one
            uploaded; `False` commits each to its own branch only.
        max_attempts: tries per checkpoint before it is left pending for the next run.
        base_delay: seconds before the first retry; doubled on each retry, up to `max_delay`.
        max_delay: longest wait between two tries.
        endpoint: the Hub URL (`HF_ENDPOINT` when `None`).
        run_preflight: check repo id and token now (see `preflight`); errors are raised here, before training.
        keep_exports: keep the staged export folders after their upload is confirmed.
        export_fn: `(checkpoint_dir, out_dir, step, branch) -> None` replacing the default verified export.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        output_dir: str | Path = ".",
        *,
        export_format: str = "hf",
        dtype: str = "bf16",
        max_shard_size: str | int = "2GB",
        private: bool | None = None,
        backup_repo_id: str | None = None,
        update_main: bool = True,
        max_attempts: int = 6,
        base_delay: float = 2.0,
        max_delay: float = 120.0,
        endpoint: str | None = None,
        run_preflight: bool = True,
        keep_exports: bool = False,
        export_fn: Callable[[Path, Path, int, str], None] | None = None,
    ) -> None:
        check_repo_id(repo_id)
        if backup_repo_id is not None:
            check_repo_id(backup_repo_id, setting="hub_backup_repo_id")
        if export_format not in ("hf", "llama"):
            raise PublishError(
                f"export_format={export_format!r} cannot be pushed per checkpoint; use 'hf' (loads with "
                "trust_remote_code and from_pretrained(revision=...)) or 'llama'."
            )
        self._token = resolve_token(token)
        if run_preflight:
            repo_id = preflight(repo_id, self._token, endpoint=endpoint, backup_repo_id=backup_repo_id)
        self.repo_id = repo_id
        self.backup_repo_id = backup_repo_id
        self.output_dir = Path(output_dir)
        self.export_format = export_format
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        # What made the run's model (`genesis_hf.model.lineage`), for the cards of checkpoints that do not record it
        # themselves (TRL's checkpoint-N); the SFT and DPO recipes set it.
        self.lineage: dict | None = None
        self.private = private
        self.update_main = update_main
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.keep_exports = keep_exports
        self._export_fn = export_fn or self._default_export
        self._api = HfApi(endpoint=endpoint, token=self._token)
        self.journal = UploadJournal(self.output_dir / HUB_JOURNAL_FILE)
        if self.journal.data.get("repo_id") not in (None, self.repo_id):
            logger.warning(
                "Upload journal %s was written for %s; pending uploads now go to %s.",
                self.journal.path,
                self.journal.data["repo_id"],
                self.repo_id,
            )
        self.journal.data["repo_id"] = self.repo_id
        self.journal.save()

        self._queue: queue.Queue[int | None] = queue.Queue()
        self._queued: set[int] = set()
        self._queued_lock = threading.Lock()
        self._staging_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="checkpoint-pusher", daemon=True)
        self._thread.start()
        # A resumed run: upload what the previous process left pending, oldest first.
        for step in self.journal.steps("pending"):
            logger.info("Resuming the upload of %s to %s.", checkpoint_name(step), self.repo_id)
            self._enqueue(step)

    # -----------------------------------------------------------------------------------------------------------------
    # Training events

    def on_checkpoint_saved(self, checkpoint_dir: Path, step: int) -> None:
        """Queue a checkpoint: a pretraining `step-XXXXXXX` as it is, a Trainer's `checkpoint-N` as a copy we own."""
        checkpoint_dir = Path(checkpoint_dir)
        if not TRL_CHECKPOINT.match(checkpoint_dir.name):
            self.submit(checkpoint_dir, step)
        elif has_weights(checkpoint_dir):
            self.submit_copy(checkpoint_dir, step)
        else:
            # A PEFT run's checkpoint holds an adapter, not a model; its merged final/ is pushed at the end.
            logger.info("Not pushing %s: it holds no model weights (a LoRA adapter checkpoint).", checkpoint_dir)

    def on_train_end(self, run_dir: Path, checkpoint_dir: Path | None, step: int) -> None:
        """Queue the run's last model: SFT/DPO's `final/`. A pretraining run ends on its last checkpoint, which
        `on_checkpoint_saved` queued already; it is queued here only if it was not."""
        if checkpoint_dir is None:
            return
        checkpoint_dir = Path(checkpoint_dir)
        entry = self.journal.entry(step)
        if entry is None or entry["checkpoint_dir"] != str(checkpoint_dir.resolve()):
            self.submit(checkpoint_dir, step)

    def may_delete(self, checkpoint_dir: str | Path) -> bool:
        """Retention predicate: `False` while an upload from this folder is pending or failed (keep the local copy).

        Args:
            checkpoint_dir: a checkpoint folder (`.../step-XXXXXXX`) or model folder (`final/`).
        """
        path = str(Path(checkpoint_dir).resolve())
        with self.journal._lock:
            uploads = self.journal.data["uploads"].values()
            return all(entry["state"] == "done" for entry in uploads if entry.get("checkpoint_dir") == path)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the worker; with `wait`, first finish the queue (what pending remains is uploaded on resume)."""
        if self._stop.is_set():
            return
        if wait:
            self.wait(timeout)
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -----------------------------------------------------------------------------------------------------------------
    # Queueing and state

    def submit(self, checkpoint_dir: str | Path, step: int) -> None:
        """Queue a checkpoint for upload and return at once (a journal write; no network, no export).

        Args:
            checkpoint_dir: the checkpoint directory (training checkpoint or model folder); must stay until confirmed.
            step: its training step (the branch is `step-XXXXXXX`).
        """
        entry = self.journal.entry(step)
        checkpoint_dir = str(Path(checkpoint_dir).resolve())
        if entry is not None and entry["state"] == "done" and entry["checkpoint_dir"] == checkpoint_dir:
            return
        self.journal.update(
            step,
            checkpoint_dir=checkpoint_dir,
            branch=checkpoint_name(step),
            submission=uuid.uuid4().hex[:8],
            state="pending",
            phases={
                "export": False,
                "commit": None,
                "branch": False,
                "backup": False if self.backup_repo_id else None,
            },
            attempts=0,
            last_error=None,
            submitted_at=_now(),
            confirmed_at=None,
        )
        self._enqueue(step)

    def submit_copy(self, checkpoint_dir: str | Path, step: int) -> None:
        """`submit` a copy of `checkpoint_dir` that the pusher owns, for trainers that delete old checkpoints while
        their upload may still be running (transformers' `save_total_limit` rotation of `checkpoint-N` folders).

        The files are hard-linked (copied across filesystems) into `<output_dir>/.hub_staging/<name>`: no bytes are
        copied and deleting the trainer's folder leaves the copy whole. The copy is removed once the upload is
        confirmed, and a resumed pusher uploads it if it was still pending.

        Args:
            checkpoint_dir: the trainer's checkpoint folder, complete (call from `on_save`).
            step: its training step.
        """
        source = Path(checkpoint_dir)
        staged = self.output_dir / HUB_STAGING_DIR / source.name
        entry = self.journal.entry(step)
        if entry is not None and entry["state"] == "done" and entry["checkpoint_dir"] == str(staged.resolve()):
            return
        partial = staged.with_name(f"{staged.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)  # this process's own copy, left by an earlier failed attempt
        shutil.copytree(source, partial, copy_function=_link_or_copy)
        # Held until the journal names the copy, so that the worker's clean-up never sees it unreferenced.
        with self._staging_lock:
            if staged.exists():
                # The pusher's earlier copy of this folder (a rerun into the same output_dir): the new save replaces it.
                shutil.rmtree(staged)
            os.replace(partial, staged)
            self.submit(staged, step)

    def is_confirmed(self, step: int) -> bool:
        """Whether the Hub has confirmed every upload of this step."""
        entry = self.journal.entry(step)
        return entry is not None and entry["state"] == "done"

    def pending_steps(self) -> list[int]:
        return self.journal.steps("pending")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued checkpoint has been processed; `False` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            if not self._thread.is_alive():
                return False
            time.sleep(0.05)
        return True

    def __enter__(self) -> "CheckpointPusher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(wait=exc_info[0] is None)

    # -----------------------------------------------------------------------------------------------------------------
    # The worker

    def _enqueue(self, step: int) -> None:
        with self._queued_lock:
            if step in self._queued:
                return
            self._queued.add(step)
        self._queue.put(step)

    def _work(self) -> None:
        while True:
            step = self._queue.get()
            try:
                if step is None or self._stop.is_set():
                    return
                with self._queued_lock:
                    self._queued.discard(step)
                self._process(step)
            except Exception as error:  # the worker must survive anything, or uploads silently stop
                logger.error(
                    "Checkpoint pusher: unexpected error on step %s: %s", step, scrub(str(error), self._token)
                )
            finally:
                self._queue.task_done()

    def _process(self, step: int) -> None:
        """Upload one checkpoint, retrying the whole of it from the phase the journal says it reached.

        huggingface_hub retries the requests of an upload itself (preupload, LFS/Xet transfers and, with hf_xet, the
        commit: `http_backoff` on 408/429/5xx and dropped connections), but not `create_repo`, `create_branch`, nor
        the commit of its single-commit path (hf_xet absent or `HF_HUB_DISABLE_XET=1`): a failure there must not
        lose the checkpoint, so it is tried again here, then left pending for the next run.
        """
        from genesis_hf.publish.export import ExportError

        for attempt in range(1, self.max_attempts + 1):
            entry = self.journal.entry(step)
            if self._stop.is_set() or entry is None or entry["state"] != "pending":
                return
            submission = entry["submission"]
            try:
                self._upload(entry)
                self.journal.update(step, submission, state="done", confirmed_at=_now(), last_error=None)
            except Superseded:
                return  # submitted again meanwhile: the new submission is queued and starts over
            except ExportError as error:
                message = scrub(str(error), self._token)
                with contextlib.suppress(Superseded):
                    self.journal.update(
                        step, submission, state="failed", last_error=message, attempts=entry["attempts"] + 1
                    )
                    logger.error("Checkpoint %s cannot be pushed: %s", checkpoint_name(step), message)
                return
            except Exception as error:
                message = f"{type(error).__name__}: {scrub(str(error), self._token)}"
                try:
                    self.journal.update(step, submission, last_error=message, attempts=entry["attempts"] + 1)
                except Superseded:
                    return
            else:
                self._confirmed(step)
                return
            if attempt == self.max_attempts:
                logger.error(
                    "Upload of %s to %s failed %d times (%s); it stays pending and is retried when a pusher starts on "
                    "%s again.",
                    checkpoint_name(step),
                    self.repo_id,
                    attempt,
                    message,
                    self.output_dir,
                )
                return
            delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
            logger.warning(
                "Upload of %s failed (%s); retry %d in %.1fs.", checkpoint_name(step), message, attempt, delay
            )
            self._stop.wait(delay)

    def _confirmed(self, step: int) -> None:
        logger.info("Checkpoint %s is on the Hub: %s (branch %s).", step, self.repo_id, checkpoint_name(step))
        self._remove_unneeded_copies()
        export_dir = self.output_dir / HUB_EXPORTS_DIR / checkpoint_name(step)
        # Only an export proves it is one (its marker); a folder a custom export_fn or the user left is kept.
        if not self.keep_exports and (export_dir / EXPORT_MARKER_FILE).is_file():
            shutil.rmtree(export_dir, ignore_errors=True)

    def _remove_unneeded_copies(self) -> None:
        """Delete the `submit_copy` copies that no pending or failed upload names (also one whose step was then
        submitted again from another folder, as `on_train_end` does with `final/`). Only `.hub_staging/` is touched:
        the pusher's own folder; the trainer's checkpoints never are."""
        staging = self.output_dir / HUB_STAGING_DIR
        with self._staging_lock:
            if not staging.is_dir():
                return
            with self.journal._lock:
                needed = {
                    entry["checkpoint_dir"]
                    for entry in self.journal.data["uploads"].values()
                    if entry.get("state") != "done"
                }
            for copy in staging.iterdir():
                # `.partial-` folders are copies still being made by `submit_copy`.
                if ".partial-" not in copy.name and str(copy.resolve()) not in needed:
                    shutil.rmtree(copy, ignore_errors=True)

    def _default_export(self, checkpoint_dir: Path, out_dir: Path, step: int, branch: str) -> None:
        from genesis_hf.publish.export import export_checkpoint

        # The export's card names this repo and branch (`from_pretrained(repo_id, revision=branch)`); the token is
        # redacted from whatever the export writes.
        export_checkpoint(
            checkpoint_dir,
            out_dir,
            export_format=self.export_format,
            dtype=self.dtype,
            max_shard_size=self.max_shard_size,
            overwrite=True,
            log=logger.info,
            repo_id=self.repo_id,
            revision=branch,
            step=step,
            redact=[self._token],
            lineage=self.lineage,
        )

    # -----------------------------------------------------------------------------------------------------------------
    # One upload

    def _upload(self, entry: dict) -> None:
        step, branch, submission = entry["step"], entry["branch"], entry["submission"]
        checkpoint_dir = Path(entry["checkpoint_dir"])
        export_dir = self.output_dir / HUB_EXPORTS_DIR / branch
        phases = dict(entry["phases"])
        if not phases["export"]:
            # Made again for each submission: a folder left here may be an earlier submission's of this step.
            self._export_fn(checkpoint_dir, export_dir, step, branch)
            self.journal.set_phases(step, submission, export=True)
        self._api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        if phases["commit"] is None:
            phases["commit"], phases["branch"] = self._commit(step, submission, export_dir)
        if not phases["branch"]:
            self._point_branch(branch, phases["commit"])
            self.journal.set_phases(step, submission, branch=True)
        if phases.get("backup") is False:
            self._api.create_repo(self.backup_repo_id, private=True, exist_ok=True)
            self._api.upload_folder(
                repo_id=self.backup_repo_id,
                folder_path=checkpoint_dir,
                path_in_repo=f"checkpoints/{branch}",
                commit_message=f"Training state at step {step}",
            )
            self.journal.set_phases(step, submission, backup=True)

    def _commit(self, step: int, submission: str, export_dir: Path) -> tuple[str, bool]:
        """Upload the export in one commit; returns its id and whether that commit already is the branch's.

        The newest checkpoint goes to `main` (its branch is then created at that commit). One older than `main`'s
        (a resumed run's leftover) or any with `update_main=False` goes to its own branch only, so `main` never goes
        back.

        huggingface_hub 2.x has no separate `upload_large_folder`: `upload_folder` is its large-folder upload
        (streamed through Xet, resumable, requests retried). It splits a folder of hundreds of files into several
        commits, the last of which holds the whole checkpoint and is the one returned (an export has about a dozen
        files: one commit). `parent_commit` makes the Hub refuse the commit if the target moved since we looked (e.g.
        a commit of an interrupted run arriving late), rather than put an older checkpoint on top; the retry looks
        again.
        """
        branch = checkpoint_name(step)
        main_step = self.journal.data.get("main_step")
        to_main = self.update_main and (main_step is None or step >= main_step)
        if not to_main:
            self._api.create_branch(self.repo_id, branch=branch, exist_ok=True)
        revision = "main" if to_main else branch
        commit = self._api.upload_folder(
            repo_id=self.repo_id,
            folder_path=export_dir,
            revision=revision,
            commit_message=f"Checkpoint at step {step}",
            delete_patterns="*",
            parent_commit=self._api.repo_info(self.repo_id, revision=revision).sha,
        )
        self.journal.set_phases(
            step, submission, main_step=step if to_main else None, commit=commit.oid, branch=not to_main
        )
        return commit.oid, not to_main

    def _point_branch(self, branch: str, commit: str) -> None:
        """Create `branch` at `commit`; an existing branch elsewhere (an earlier run's) is moved there."""
        try:
            self._api.create_branch(self.repo_id, branch=branch, revision=commit)
            return
        except HfHubHTTPError as error:
            if error.response is None or error.response.status_code != 409:
                raise
        # The branch exists: made by a try whose answer was lost (then it is right), or by an earlier run.
        refs = self._api.list_repo_refs(self.repo_id).branches
        if any(ref.name == branch and ref.target_commit == commit for ref in refs):
            return
        self._api.delete_branch(self.repo_id, branch=branch)
        self._api.create_branch(self.repo_id, branch=branch, revision=commit)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def pusher_for_run(args, *, is_main_process: bool = True, endpoint: str | None = None) -> CheckpointPusher | None:
    """The Hub pusher of a training run, or `None` (push_to_hub off, or not the main process); call it on every rank.

    Reads `push_to_hub`, `hub_model_id`, `output_dir` and, when the config has them, `hub_private_repo` and
    `hub_backup_repo_id` (TrainingArguments names). The token comes from `HF_TOKEN` or `hf auth login`, never from the
    config, which is copied into every checkpoint. Preflight runs here, so a bad repo id or token stops the run before
    its first step. The pusher is a `genesis_hf.events.TrainingCallback`: hand it to the run's subscribers
    (`Events([..., pusher])` for pretraining, `TrainerEvents([..., pusher])` as a Trainer callback for SFT/DPO, whose
    `finish(run_dir, final_dir, step, ...)` pushes `final/` and waits), nothing else.

    Every rank runs the checks, so that a bad token stops all of them at once instead of leaving the others waiting
    in a collective; only the main process gets a pusher (checkpoint events fire on the main process).

    Args:
        args: the run's arguments.
        is_main_process: whether this is rank 0.
        endpoint: the Hub URL (`HF_ENDPOINT` when `None`).

    Raises:
        PublishError: `hub_model_id` is missing or invalid, or the token is missing, invalid or read-only.
    """
    if not getattr(args, "push_to_hub", False):
        return None
    repo_id = getattr(args, "hub_model_id", None)
    if not repo_id:
        raise PublishError("push_to_hub=true needs hub_model_id (e.g. --hub_model_id your-name/genesis-tiny).")
    if not is_main_process:
        preflight(repo_id, None, endpoint=endpoint, backup_repo_id=getattr(args, "hub_backup_repo_id", None))
        return None
    return CheckpointPusher(
        repo_id,
        None,
        args.output_dir,
        private=getattr(args, "hub_private_repo", None),
        backup_repo_id=getattr(args, "hub_backup_repo_id", None),
        endpoint=endpoint,
    )


__all__ = [
    "CheckpointPusher",
    "PublishError",
    "UploadJournal",
    "check_repo_id",
    "preflight",
    "pusher_for_run",
    "resolve_token",
    "scrub",
]
