"""One config idiom for every recipe and subcommand: dataclasses, `--config file.yaml` for defaults, CLI flags on top.

This is what `trl.TrlParser` does, with one difference that matters for long runs: a YAML key that no dataclass
knows is an error naming the valid keys, instead of being silently dropped (a typo such as `learning_rte` would
otherwise train with the default).
"""

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the value and the fix."""


def valid_keys(dataclass_types: tuple[type, ...]) -> list[str]:
    return sorted(field.name for dataclass_type in dataclass_types for field in dataclasses.fields(dataclass_type))


def check_keys(values: dict[str, Any], dataclass_types: tuple[type, ...], source: str) -> None:
    """Raise `ConfigError` for keys that no dataclass defines, listing the valid ones and the closest match."""
    known = valid_keys(dataclass_types)
    unknown = [key for key in values if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"Unknown config key(s) in {source}: {', '.join(hints)}. Valid keys are: {', '.join(known)}.")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist; pass --config with the path of a YAML file.")
    try:
        with path.open(encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"Config file {str(path)!r} is not valid YAML{where}: {problem}. Fix that line (one `key: value` per "
            "line, quote values that contain ': ' or start with '{' or '[')."
        ) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"Config file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})."
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of key: value, got {type(values).__name__}.")
    return values


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` (defaults) and CLI flags (overrides) into instances of `dataclass_types`.

    Args:
        dataclass_types: the argument dataclasses, in the order the instances are returned.
        args: the command line, `sys.argv[1:]` when `None`.
    """
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", type=str, default=None, help="YAML file with default values for any flag.")
    namespace, _ = parser.parse_known_args(args=args)
    if namespace.config is not None:
        values = load_yaml(namespace.config)
        check_keys(values, dataclass_types, source=namespace.config)
        parser.set_defaults(**values)
    outputs = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    *instances, remaining = outputs
    remaining = [item for item in remaining if item]
    if remaining:
        raise ConfigError(
            f"Unknown command-line argument(s) {remaining}. Valid flags are: "
            + ", ".join(f"--{key}" for key in valid_keys(dataclass_types))
            + "."
        )
    # HfArgumentParser appends a Namespace holding the extra `--config` flag; keep only the dataclasses.
    return tuple(instance for instance in instances if dataclasses.is_dataclass(instance))
