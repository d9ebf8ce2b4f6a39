"""The constitution: principles with a critique request and a revision request each, plus few-shot examples.

The default lives next to this module (`constitution.yaml`); `load_constitution(path)` reads a user's file of the same
shape and checks it before any model is loaded.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")
ALL_CATEGORIES = "all"


class ConstitutionError(ValueError):
    """A constitution file is unusable; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Principle:
    name: str
    summary: str
    critique_request: str
    revision_request: str
    # Prompt categories this principle may be drawn for; ("all",) means every category.
    categories: tuple[str, ...] = (ALL_CATEGORIES,)

    def applies_to(self, category: str) -> bool:
        return ALL_CATEGORIES in self.categories or category in self.categories


@dataclasses.dataclass(frozen=True)
class FewShotExample:
    prompt: str
    answer: str
    principle: str
    critique: str
    revision: str


@dataclasses.dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    principles: tuple[Principle, ...]
    few_shot: tuple[FewShotExample, ...]
    # sha256 of the file's parsed content: rows record it, and a resumed run refuses a changed constitution.
    fingerprint: str

    def principle(self, name: str) -> Principle:
        for principle in self.principles:
            if principle.name == name:
                return principle
        raise KeyError(name)

    def principles_for(self, category: str) -> list[Principle]:
        """The principles that apply to `category`, or all of them when none names it."""
        matching = [principle for principle in self.principles if principle.applies_to(category)]
        return matching or list(self.principles)


def _text(entry: dict, key: str, where: str, path: Path) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConstitutionError(
            f"{path}: {where} has no {key!r} (a non-empty string is required); add `{key}: ...` to it, "
            f"or start from {DEFAULT_CONSTITUTION}."
        )
    return " ".join(value.split())


def _principle(entry: object, index: int, path: Path) -> Principle:
    if not isinstance(entry, dict):
        raise ConstitutionError(f"{path}: principles[{index}] must be a mapping, got {type(entry).__name__}.")
    name = _text(entry, "name", f"principles[{index}]", path)
    where = f"principle {name!r}"
    categories = entry.get("categories", [ALL_CATEGORIES])
    if isinstance(categories, str):
        categories = [categories]
    if not isinstance(categories, list) or not categories or not all(isinstance(item, str) for item in categories):
        raise ConstitutionError(f"{path}: {where} has categories={categories!r}; give a list of category names.")
    return Principle(
        name=name,
        summary=_text(entry, "summary", where, path),
        critique_request=_text(entry, "critique_request", where, path),
        revision_request=_text(entry, "revision_request", where, path),
        categories=tuple(categories),
    )


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and check a constitution YAML file (the packaged one when `path` is `None`).

    Args:
        path: a YAML file with `principles` (each with `name`, `summary`, `critique_request`, `revision_request`
            and optional `categories`) and optional `few_shot` examples.

    Raises:
        ConstitutionError: the file is missing, has no principles, or a principle lacks one of its requests.
    """
    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    if not path.is_file():
        raise ConstitutionError(f"--constitution {str(path)!r} does not exist; pass the path of a YAML file.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConstitutionError(f"{path}: must be a mapping with a `principles` list, got {type(data).__name__}.")
    entries = data.get("principles")
    if not isinstance(entries, list) or not entries:
        raise ConstitutionError(
            f"{path}: the constitution has no principles; add a `principles:` list (see {DEFAULT_CONSTITUTION})."
        )
    principles = tuple(_principle(entry, index, path) for index, entry in enumerate(entries))
    names = [principle.name for principle in principles]
    if len(set(names)) != len(names):
        raise ConstitutionError(f"{path}: principle names must be unique, got {names}.")
    few_shot = []
    for index, entry in enumerate(data.get("few_shot") or []):
        where = f"few_shot[{index}]"
        if not isinstance(entry, dict):
            raise ConstitutionError(f"{path}: {where} must be a mapping, got {type(entry).__name__}.")
        fields = {field.name: _text(entry, field.name, where, path) for field in dataclasses.fields(FewShotExample)}
        if fields["principle"] not in names:
            raise ConstitutionError(f"{path}: {where} names principle {fields['principle']!r}; use one of {names}.")
        few_shot.append(FewShotExample(**fields))
    fingerprint = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Constitution(
        name=str(data.get("name", path.stem)),
        version=str(data.get("version", "0")),
        principles=principles,
        few_shot=tuple(few_shot),
        fingerprint=fingerprint,
    )
