"""The pretraining mixture: which sources, where they live, which field holds the text, and how much of each.

A mixture is a YAML file (two ship with the package, see `SHIPPED_MIXTURES`) parsed into `MixtureConfig`:

```yaml
name: my-mix
holdout_every: 1000          # documents 999, 1999, ... of every source are held out for validation
sources:
  - name: fineweb-edu
    location: hub:HuggingFaceFW/fineweb-edu      # a Hub dataset, streamed with `datasets`
    config: sample-100BT
    weight: 24
  - name: notes
    location: /data/notes/*.jsonl                # local file, folder or glob: .jsonl/.json(.gz), .parquet, .txt
    text_field: body
    weight: 1
  - name: docs
    location: embedded:stdlib-docs               # the embedded corpus (`genesis_hf.corpus`)
    weight: 1
```

Weights are relative token shares (they need not sum to 1): a source of weight 3 gets three times the tokens of a
source of weight 1. Relative local paths resolve against the current directory.
"""

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from genesis_hf.args import ConfigError, check_keys

HUB_PREFIX = "hub:"
EMBEDDED_PREFIX = "embedded:"
# Mixtures shipped in the package, loadable by name.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "data"
SHIPPED_MIXTURES = ("default", "genesis-1b")
# Source names become file names in tokenized directories, so keep them portable.
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass
class SourceConfig:
    """One source of the mixture.

    Args:
        name: a short unique name (letters, digits, `.`, `_`, `-`); it keys per-source token counts and files.
        location: `hub:ORG/NAME` for a Hub dataset (streamed with `datasets.load_dataset(..., streaming=True)`),
            `embedded:stdlib-docs` or `embedded:stdlib-code` for the embedded corpus, or else a local file, folder
            or glob of `.jsonl`/`.json` (JSON lines, optionally `.gz`), `.parquet` or `.txt` (one document per file).
        weight: the source's relative share of tokens, > 0.
        text_field: the field holding the text, or a list of fields joined by blank lines. A field holding a list
            of chat messages (`role`/`content` or `from`/`value`) is rendered one `role: content` line per message;
            any other non-string value is written as JSON.
        config: the Hub dataset's configuration name (`name=` of `load_dataset`).
        split: the Hub dataset's split.
        data_dir: the Hub dataset's `data_dir` (e.g. the language folder of StarCoderData).
        data_files: the Hub dataset's `data_files`, to pick some files of a repository.
        max_documents: read at most this many documents of the source (held-out ones included) per epoch.
    """

    name: str
    location: str
    weight: float
    text_field: str | list[str] = "text"
    config: str | None = None
    split: str = "train"
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SOURCE_NAME.match(self.name):
            raise ConfigError(
                f"Source name {self.name!r} is not valid: use letters, digits, '.', '_' or '-' (it names files)."
            )
        if not isinstance(self.location, str) or not self.location.strip():
            raise ConfigError(
                f"Source {self.name!r} has no location; set `location` to hub:ORG/NAME, embedded:stdlib-docs, "
                "or a local path."
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ConfigError(
                f"Source {self.name!r} has weight {self.weight!r}; weights must be positive numbers (relative token "
                "shares). Give it a weight > 0, or remove the source from the mixture."
            )
        self.weight = float(self.weight)
        fields = [self.text_field] if isinstance(self.text_field, str) else self.text_field
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
            raise ConfigError(
                f"Source {self.name!r} has text_field {self.text_field!r}; give a field name or a list of them."
            )
        if self.max_documents is not None and (
            isinstance(self.max_documents, bool) or not isinstance(self.max_documents, int) or self.max_documents < 1
        ):
            raise ConfigError(
                f"Source {self.name!r} has max_documents {self.max_documents!r}; use a positive integer or leave it out."
            )
        if self.kind == "embedded":
            from genesis_hf.corpus import EMBEDDED_SOURCES

            if self.target not in EMBEDDED_SOURCES:
                raise ConfigError(
                    f"Source {self.name!r} has location {self.location!r}, but the embedded sources are "
                    + ", ".join(f"{EMBEDDED_PREFIX}{name}" for name in EMBEDDED_SOURCES)
                    + "."
                )
        if self.kind == "hub" and not self.target:
            raise ConfigError(f"Source {self.name!r} has location {self.location!r}; write hub:ORG/NAME.")

    @property
    def kind(self) -> str:
        """`"hub"`, `"embedded"` or `"local"`."""
        if self.location.startswith(HUB_PREFIX):
            return "hub"
        if self.location.startswith(EMBEDDED_PREFIX):
            return "embedded"
        return "local"

    @property
    def target(self) -> str:
        """The location without its `hub:`/`embedded:` prefix."""
        for prefix in (HUB_PREFIX, EMBEDDED_PREFIX):
            if self.location.startswith(prefix):
                return self.location[len(prefix) :].strip()
        return self.location

    @property
    def text_fields(self) -> tuple[str, ...]:
        return (self.text_field,) if isinstance(self.text_field, str) else tuple(self.text_field)

    def describe(self) -> str:
        """A short human description for error messages: name, location and Hub config/split."""
        extras = [f"{key}={value!r}" for key in ("config", "data_dir") if (value := getattr(self, key))]
        if self.kind == "hub":
            extras.append(f"split={self.split!r}")
        return f"source {self.name!r} ({self.location}" + (", " + ", ".join(extras) if extras else "") + ")"


@dataclasses.dataclass
class MixtureConfig:
    """A weighted set of sources, plus the validation hold-out rule.

    Args:
        name: the mixture's name (logged, stored in tokenized indexes).
        sources: the sources, in a fixed order (the order matters for the seeded source sampler).
        holdout_every: document `i` of a source is held out for validation when `i % holdout_every ==
            holdout_every - 1` (one in `holdout_every`); training never sees it.
        description: free text.
    """

    name: str
    sources: list[SourceConfig]
    holdout_every: int = 1000
    description: str = ""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError(f"Mixture {self.name!r} has no sources; add at least one under `sources:`.")
        self.sources = [
            source if isinstance(source, SourceConfig) else _source_from_dict(source, self.name)
            for source in self.sources
        ]
        names = [source.name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"Mixture {self.name!r} names these sources twice: {', '.join(duplicates)}; rename one.")
        if isinstance(self.holdout_every, bool) or not isinstance(self.holdout_every, int) or self.holdout_every < 2:
            raise ConfigError(
                f"Mixture {self.name!r} has holdout_every={self.holdout_every!r}; use an integer >= 2 (one document "
                "in `holdout_every` is held out for validation)."
            )

    @property
    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def weights(self) -> list[float]:
        """The weights normalised to sum to 1, in source order."""
        total = sum(source.weight for source in self.sources)
        return [source.weight / total for source in self.sources]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "mixture") -> "MixtureConfig":
        """Build and validate a mixture from plain values (a parsed YAML file); unknown keys are errors.

        Args:
            values: the mapping with `name`, `sources` and optional `holdout_every`, `description`.
            origin: where the values come from, for error messages.
        """
        if not isinstance(values, dict):
            raise ConfigError(f"{origin} must hold a mapping with `name` and `sources`, got {type(values).__name__}.")
        check_keys(values, (cls,), source=origin)
        values = dict(values)
        values.setdefault("name", Path(origin).stem)
        if not isinstance(values.get("sources"), list):
            raise ConfigError(f"{origin} needs `sources:`, a list of sources (name, location, weight, ...).")
        return cls(**values)


def _source_from_dict(values: Any, mixture_name: str) -> SourceConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"Mixture {mixture_name!r}: each source must be a mapping, got {values!r}.")
    origin = f"source {values.get('name', '?')!r} of mixture {mixture_name!r}"
    check_keys(values, (SourceConfig,), source=origin)
    missing = [key for key in ("name", "location", "weight") if key not in values]
    if missing:
        raise ConfigError(f"The {origin} lacks {', '.join(missing)}; every source needs name, location and weight.")
    return SourceConfig(**values)


def load_mixture(name_or_path: str | Path) -> MixtureConfig:
    """Load a mixture shipped with the package (`"default"`, `"genesis-1b"`) or from a YAML file.

    Args:
        name_or_path: a shipped mixture's name, or the path of a YAML file.
    """
    name = str(name_or_path)
    path = CONFIGS_DIR / f"{name}.yaml" if name in SHIPPED_MIXTURES else Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Mixture {name!r} is neither a shipped mixture ({', '.join(SHIPPED_MIXTURES)}) nor an existing YAML file."
        )
    with path.open() as handle:
        try:
            values = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"Mixture file {str(path)!r} is not valid YAML: {error}") from None
    return MixtureConfig.from_dict(values, origin=str(path))


__all__ = ["SHIPPED_MIXTURES", "MixtureConfig", "SourceConfig", "load_mixture"]
