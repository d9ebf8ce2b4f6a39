"""One config idiom for every recipe and subcommand: `--config file.yaml` for defaults, CLI flags on top, unknown keys
refused. Recipes parse dataclasses (`parse_args`); `genesis-hf` subcommands use `SubcommandParser`, which gives their
options the same behaviour.

This is what `trl.TrlParser` does, with one difference that matters for long runs: a YAML key that no dataclass
knows is an error naming the valid keys, instead of being silently dropped (a typo such as `learning_rte` would
otherwise train with the default).
"""

import argparse
import dataclasses
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the value and the fix."""


def valid_keys(dataclass_types: tuple[type, ...]) -> list[str]:
    return sorted(field.name for dataclass_type in dataclass_types for field in dataclasses.fields(dataclass_type))


def check_keys(values: dict[str, Any], dataclass_types: tuple[type, ...], source: str) -> None:
    """Raise `ConfigError` for keys that no dataclass defines, listing the valid ones and the closest match."""
    check_known_keys(values, valid_keys(dataclass_types), source)


def check_known_keys(values: dict[str, Any], known: list[str], source: str) -> None:
    """Raise `ConfigError` for keys of `values` not in `known`, listing the valid ones and the closest match."""
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


def config_and_flags(namespace, dataclass_type: type) -> dict[str, Any]:
    """The values of `dataclass_type`'s fields for a subcommand whose options mirror them: `namespace.config`'s YAML
    values (unknown keys refused) as defaults, the flags given on the command line (not `None`) on top."""
    names = [field.name for field in dataclasses.fields(dataclass_type)]
    values = {}
    if namespace.config is not None:
        values = load_yaml(namespace.config)
        check_keys(values, (dataclass_type,), source=namespace.config)
    values.update({name: getattr(namespace, name) for name in names if getattr(namespace, name) is not None})
    return values


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` (defaults) and CLI flags (overrides) into instances of `dataclass_types`.

    Args:
        dataclass_types: the argument dataclasses, in the order the instances are returned.
        args: the command line, `sys.argv[1:]` when `None`.
    """
    from transformers import HfArgumentParser  # here: `genesis-hf --help` does not pay for transformers

    args = _attach_negative_numbers(sys.argv[1:] if args is None else list(args))
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


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def _attach_negative_numbers(args: list[str]) -> list[str]:
    """`--learning_rate -1e-3` as `--learning_rate=-1e-3`: argparse takes `-1e-3` (scientific notation) for an option
    and stops with "expected one argument" instead of letting the value's own check name it."""
    attached: list[str] = []
    for item in args:
        previous = attached[-1] if attached else ""
        if _NEGATIVE_NUMBER.match(item) and previous.startswith("--") and "=" not in previous:
            attached[-1] = f"{previous}={item}"
        else:
            attached.append(item)
    return attached


class SubcommandParser(argparse.ArgumentParser):
    """The parser of every `genesis-hf` subcommand: the same config idiom as the recipes.

    `--config file.yaml` gives defaults for the subcommand's options (keys are their snake_case names, as in the
    recipes' YAML files), flags given on the command line override them, and a key that names no option is an error
    listing the valid ones. Flags are snake_case (`--max_shard_size`); the kebab-case spelling is accepted too, as
    `HfArgumentParser` does for the recipes. Abbreviated flags are refused (`--round` does not mean `--rounds`).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        """`add_argument("--max_shard_size", ...)` also accepts `--max-shard-size` (and the other way round)."""
        spellings = []
        for name in names:
            if name.startswith("--"):
                snake = "--" + name[2:].replace("-", "_")
                spellings += [snake] + ([snake.replace("_", "-")] if "_" in snake else [])
            else:
                spellings.append(name)
        return super().add_argument(*dict.fromkeys(spellings), **kwargs)

    def _is_leaf(self) -> bool:
        # A parser with its own subcommands hands every later argument to them, `--config` included.
        return not any(isinstance(action, argparse._SubParsersAction) for action in self._actions)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        # A subcommand that defines its own --config handles it (`genesis-hf plan --config` reads a recipe's config).
        # A forwarding parser (prefix `+`) hands every flag to a recipe-style dataclass parser, which has --config.
        own_flags = "-" in self.prefix_chars and self._is_leaf()
        if own_flags and not any(action.dest == "config" for action in self._actions):
            self.add_argument("--config", default=None, help="YAML file with default values for any option.")
            self.config_is_defaults = True
        if getattr(self, "config_is_defaults", False):
            config = _config_path(args)
            if config is not None:
                self._apply_config(config)
        return super().parse_known_args(args, namespace)

    def _apply_config(self, path: str) -> None:
        options = {action.dest: action for action in self._actions if action.option_strings and action.dest != "help"}
        options.pop("config", None)
        values = load_yaml(path)
        check_known_keys(values, sorted(options), source=path)
        for key in values:
            options[key].required = False  # given by the file; a flag on the command line still overrides it
        self.set_defaults(**values)


def _config_path(args: list[str]) -> str | None:
    for index, item in enumerate(args):
        if item == "--config" and index + 1 < len(args):
            return args[index + 1]
        if item.startswith("--config="):
            return item.split("=", 1)[1]
    return None


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str | None = None,
    func=None,
    forward: bool = False,
) -> argparse.ArgumentParser:
    """Add the `genesis-hf` command (or nested subcommand) `name` and return its parser.

    Args:
        subparsers: what `add_subparsers()` returned.
        name: the command's name.
        help: one line for the list of commands.
        description: shown by `--help` as written (the module docstring, usually).
        func: run as `func(namespace)`; returns the exit code.
        forward: hand every argument after the name, unparsed, to `func` as `namespace.argv` (commands whose options
            are a dataclass parsed like a recipe's, `--help` included).
    """
    if forward:
        # `+` as the only prefix: every `--flag` reaches the dataclass parser, which knows them.
        parser = subparsers.add_parser(name, help=help, add_help=False, prefix_chars="+")
        parser.add_argument("argv", nargs="*")
    else:
        formatter = argparse.RawDescriptionHelpFormatter
        parser = subparsers.add_parser(name, help=help, description=description, formatter_class=formatter)
    if func is not None:
        parser.set_defaults(func=func)
    return parser
