"""The `genesis-hf` console script.

Each subcommand lives next to the code it drives and exposes `register_cli(subparsers)`, which adds its parser and
sets `func` (called with the parsed namespace, returns an exit code). Modules are imported lazily so that
`genesis-hf --help` stays fast and one broken optional dependency does not take every subcommand down.
"""

import argparse
import importlib
import sys

from genesis_hf.args import ConfigError, SubcommandParser

# subcommand name -> module that defines `register_cli(subparsers)`
SUBCOMMANDS: dict[str, str] = {
    "tokenizer": "genesis_hf.tokenizer",
    "data": "genesis_hf.data.cli",
    "plan": "genesis_hf.pretrain.plan",
    "export": "genesis_hf.publish.export",
    "checkpoints": "genesis_hf.publish.listing",
    "eval": "genesis_hf.evaluate.cli",
    "eval_tasks": "genesis_hf.evaluate.tasks",
    "report": "genesis_hf.evaluate.report",
    "playground": "genesis_hf.playground.app",
    "constitution": "genesis_hf.constitution.cli",
    "engagement": "genesis_hf.constitution.engagement",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genesis-hf", description=__doc__.splitlines()[0])
    # Every subcommand's parser (and theirs, for nested subcommands) is a SubcommandParser: --config, snake_case flags.
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as error:  # a bad --config file: one line, like argparse's own errors
        print(f"genesis-hf: error: {error}", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
