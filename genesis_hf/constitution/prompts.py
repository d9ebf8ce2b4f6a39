"""Prompt sets: JSON lines with `prompt` and an optional `category`, or plain text with one prompt a line.

`genesis_hf:prompts` names the packaged training sets (`prompt_sets/<category>.txt`: everyday, opinion, borderline,
harmful; 55 prompts each, written for this project) and `genesis_hf:engagement` the held-out set the engagement
benchmark asks (10 per category, none of them in the training sets).
"""

import dataclasses
import json
from pathlib import Path

PROMPT_SETS_DIR = Path(__file__).with_name("prompt_sets")
PACKAGED_SETS = ("genesis_hf:prompts", "genesis_hf:engagement")
DEFAULT_CATEGORY = "general"
# Categories of requests that deserve a (specific) refusal; every other category is benign.
HARMFUL_CATEGORIES = ("harmful",)


class PromptsError(ValueError):
    """A prompts file is unusable; the message names the file, the line and the fix."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    prompt: str
    category: str = DEFAULT_CATEGORY


def read_utf8(path: Path, flag: str = "--prompts") -> str:
    """The text of `path`; a file that is not UTF-8 is a `PromptsError` naming it and the first bad byte.

    Raises:
        PromptsError: `path` is not valid UTF-8.
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptsError(
            f"{flag} {str(path)!r} is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x}); save it "
            "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def _read_text_file(path: Path, category: str) -> list[Prompt]:
    return [Prompt(line.strip(), category) for line in read_utf8(path).splitlines() if line.strip()]


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for line_number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptsError(f"{where} is not valid JSON ({error.msg}); write one JSON object a line.") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise PromptsError(
                f'{where} has no non-empty "prompt" string; write {{"prompt": "...", "category": "..."}}.'
            )
        category = record.get("category") or DEFAULT_CATEGORY
        if not isinstance(category, str):
            raise PromptsError(f"{where} has category={category!r}; the category must be a string.")
        prompts.append(Prompt(record["prompt"].strip(), category))
    return prompts


def load_prompts(spec: str) -> list[Prompt]:
    """Load a prompt set.

    Args:
        spec: `genesis_hf:prompts` (the packaged training sets), `genesis_hf:engagement` (the held-out set), a
            `.jsonl` file of `{"prompt", "category"}` objects, or a text file with one prompt a line.

    Raises:
        PromptsError: the file is missing, malformed or holds no prompt.
    """
    if spec == "genesis_hf:prompts":
        prompts = []
        for path in sorted(PROMPT_SETS_DIR.glob("*.txt")):
            prompts.extend(_read_text_file(path, path.stem))
    elif spec == "genesis_hf:engagement":
        prompts = _read_jsonl(PROMPT_SETS_DIR / "engagement.jsonl")
    else:
        path = Path(spec)
        if spec.startswith("genesis_hf:") or not path.is_file():
            raise PromptsError(
                f"--prompts {spec!r} is neither a file nor a packaged set; pass a .jsonl or .txt file, or one of "
                f"{', '.join(PACKAGED_SETS)}."
            )
        prompts = _read_jsonl(path) if path.suffix == ".jsonl" else _read_text_file(path, DEFAULT_CATEGORY)
    if not prompts:
        raise PromptsError(
            f'--prompts {spec!r} holds no prompt; add JSON lines such as {{"prompt": "..."}} or one prompt a line.'
        )
    return prompts
