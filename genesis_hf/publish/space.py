"""Publishing the playground as a Hugging Face Space: the Space folder (the template's app.py, requirements.txt and
README.md, a copy of the genesis_hf package, `playground.json`) and its upload.

```bash
genesis-hf playground deploy --space you/genesis-playground --repo you/genesis-1b
```

The template lives in this package (`space_template/`, package data), and the package copied into the Space is the
installed one (`genesis_hf.__file__`), so deploying works from a wheel as from a source checkout. This module copies
files only: it imports nothing of the playground, which runs in the Space (and in `genesis-hf playground`).
"""

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import genesis_hf
from genesis_hf.layout import METRICS_FILE
from genesis_hf.publish.listing import CheckpointsError, list_run_checkpoints, path_in_run

# The file written next to the Space's app.py, telling it what to browse (`genesis_hf.playground.load_space_config`).
SPACE_CONFIG_FILE = "playground.json"
SPACE_TEMPLATE_DIR = Path(__file__).resolve().parent / "space_template"
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
# Where a shipped run goes inside the Space (`playground.json` then says `{"runs": "run"}`).
SPACE_RUN_DIR = "run"


class SpaceError(ValueError):
    """A Space that cannot be staged or uploaded as asked; the message says what to do instead."""


def _with_models_front_matter(readme: str, repo_id: str) -> str:
    """README with `models: [repo_id]` added to its front matter (links the Space to the model on the Hub)."""
    match = re.match(r"---\n(.*?)\n---\n", readme, flags=re.DOTALL)
    if match is None or re.search(r"^models:", match.group(1), flags=re.MULTILINE):
        return readme
    front_matter = match.group(1) + f"\nmodels:\n  - {repo_id}"
    return f"---\n{front_matter}\n---\n" + readme[match.end() :]


def _copy_package(target: Path) -> None:
    """Copy the genesis_hf package (sources and package data; no caches, no test helpers) to `target`, for the Space
    to import."""
    package_dir = Path(genesis_hf.__file__).resolve().parent

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith((".pyc", ".so"))}
        if Path(directory).resolve() == package_dir:
            skipped |= {"testing"} & set(names)
        return skipped

    shutil.copytree(package_dir, target, ignore=ignore)


def _stage_run(runs: str | Path, target: Path) -> None:
    """Copy a local run's exported model folders (at their place in the run) and its `metrics.jsonl` to `target`."""
    run_dir = Path(runs).expanduser().resolve()
    if not run_dir.is_dir():
        raise SpaceError(f"--runs {runs!s}: no such directory; pass the output directory of a training run.")
    try:
        checkpoints = list_run_checkpoints(str(run_dir))
    except CheckpointsError as error:
        raise SpaceError(str(error)) from None
    # Only exported model folders travel: training checkpoints carry the optimizer state (3x the weights).
    exported = [checkpoint for checkpoint in checkpoints if checkpoint.kind == "hf"]
    if not exported:
        raise SpaceError(
            f"--runs {runs}: the run has no exported model folder to ship (its training checkpoints hold optimizer "
            "state). Export one (`genesis-hf export CHECKPOINT RUN/final`), or publish the run to a Hub repo and "
            "deploy with --repo ID."
        )
    for checkpoint in exported:
        try:
            relative = path_in_run(run_dir, checkpoint)
        except CheckpointsError as error:
            raise SpaceError(f"{error} Then deploy again.") from None
        shutil.copytree(run_dir / relative, target / relative)
    if (run_dir / METRICS_FILE).is_file():
        shutil.copy2(run_dir / METRICS_FILE, target / METRICS_FILE)


def stage_space(folder: Path, repo: str | None = None, runs: str | Path | None = None) -> Path:
    """Fill `folder` with what the Space repo gets: the template's files, the genesis_hf package, `playground.json`
    (and, for `runs`, the run's exported checkpoint folders and `metrics.jsonl` under `run/`).

    Args:
        folder: an empty directory.
        repo: the Hub model repo the Space browses.
        runs: a local run to ship inside the Space instead (small models only: Spaces hold a few GB at most).

    Raises:
        SpaceError: not exactly one of `repo` and `runs`, or a run with nothing to ship.
    """
    if (runs is None) == (repo is None):
        raise SpaceError("Pass exactly one of --runs DIR (a local run) or --repo ID (a Hub model repo).")
    if not (SPACE_TEMPLATE_DIR / "app.py").is_file():
        raise SpaceError(
            f"The Space template is not at {SPACE_TEMPLATE_DIR}: this genesis_hf install lacks its package data. "
            "Reinstall genesis_hf (`pip install --force-reinstall genesis_hf`)."
        )
    folder = Path(folder)
    for name in SPACE_FILES:
        shutil.copy2(SPACE_TEMPLATE_DIR / name, folder / name)
    _copy_package(folder / "genesis_hf")
    config: dict[str, Any]
    if repo is not None:
        config = {"repo": repo}
        readme = folder / "README.md"
        readme.write_text(_with_models_front_matter(readme.read_text(encoding="utf-8"), repo), encoding="utf-8")
    else:
        config = {"runs": SPACE_RUN_DIR}
        _stage_run(runs, folder / SPACE_RUN_DIR)
    (folder / SPACE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def _check_no_token(folder: Path, token: str | None) -> None:
    """Refuse to upload a staged file that contains the Hub token (a copied `.env`, a config with a token...)."""
    if not token:
        return
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise SpaceError(
                f"Refusing to upload: {path.relative_to(folder)} contains your Hub token. Remove it and deploy again."
            )


def deploy_space(
    space_id: str,
    repo: str | None = None,
    runs: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create (or update) the Space `space_id` running the playground on `repo` (or a shipped copy of `runs`).

    One commit uploads app.py, requirements.txt, README.md (Spaces front matter), the genesis_hf package and
    `playground.json`. The token authenticates the upload only: it is in no uploaded file (checked before the upload),
    and the Space reads its own `HF_TOKEN` secret, if it needs one, on its server.

    Args:
        space_id: `user/name` of the Space.
        repo: Hub model repo to browse (its `step-XXXXXXX` branches).
        runs: a local run to ship inside the Space instead of `repo`.
        private: create the Space private.
        token: Hub token; `None` uses `HF_TOKEN` or the cached login.
        endpoint: the Hub URL; `None` uses `HF_ENDPOINT` or huggingface.co.

    Returns:
        The Space's URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="genesis-space-") as staging:
        # Staged and checked before the Space exists, so a refused deploy leaves nothing behind on the Hub.
        folder = stage_space(Path(staging), repo=repo, runs=runs)
        _check_no_token(folder, token or get_token())
        repo_url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=space_id,
            repo_type="space",
            commit_message=f"Deploy the Genesis playground for {repo or 'a shipped run'}",
            # Files of an older deploy that this one no longer has (removed modules, checkpoints) go away.
            delete_patterns=["genesis_hf/**", f"{SPACE_RUN_DIR}/**"],
        )
    return str(repo_url)


__all__ = ["SPACE_CONFIG_FILE", "SPACE_TEMPLATE_DIR", "SpaceError", "deploy_space", "stage_space"]
