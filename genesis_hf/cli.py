"""The `genesis-hf` console script.

Each subcommand lives next to the code it drives and exposes `register_cli(subparsers)`, which adds its parser and
sets `func` (called with the parsed namespace, returns an exit code). Modules are imported lazily so that
`genesis-hf --help` stays fast and one broken optional dependency does not take every subcommand down.
"""

import argparse
import importlib
import sys

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
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
