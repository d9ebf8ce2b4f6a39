"""`genesis-hf data prepare` (tokenize a mixture into token shards) and `genesis-hf data merge` (join shards).

    genesis-hf data prepare --mixture default --tokenizer default:4096 --output_dir runs/tokens --num_proc 2
    genesis-hf data prepare --config prepare.yaml --shard 3/32          # any flag may come from the YAML
    genesis-hf data merge runs/tokens-a runs/tokens-b --output_dir runs/tokens

See `genesis_hf.data.prepare` for the SLURM array recipe.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from genesis_hf.args import ConfigError, add_command, config_and_flags


@dataclasses.dataclass
class PrepareArguments:
    """Arguments of `genesis-hf data prepare`."""

    # tokenizer and output_dir are required, but default to None so that a --config YAML can provide them;
    # `_prepare_arguments` checks them.
    mixture: str = dataclasses.field(
        default="default", metadata={"help": "Shipped mixture name (default, genesis-1b) or YAML path."}
    )
    tokenizer: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Tokenizer folder or tokenizer.json (from `genesis-hf tokenizer train`), or default:VOCAB."},
    )
    output_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Directory for token files and indexes."}
    )
    shard: str = dataclasses.field(default="0/1", metadata={"help": "i/N: this task's slice of every source."})
    num_proc: int = dataclasses.field(default=1, metadata={"help": "Encoding processes (use the task's cores)."})
    max_tokens: int | None = dataclasses.field(
        default=None, metadata={"help": "Total training-token budget over all sources and shards (split by weight)."}
    )


def load_tokenizer(spec: str):
    """A tokenizer from a folder, a `tokenizer.json`, or `default:VOCAB` (the embedded-corpus tokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.startswith("default"):
        from genesis_hf.tokenizer import default_tokenizer

        _, _, vocab = spec.partition(":")
        if not vocab.isdigit():
            raise ConfigError(f"--tokenizer {spec!r}: write default:VOCAB_SIZE, e.g. default:4096.")
        return default_tokenizer(int(vocab))
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        from genesis_hf.tokenizer import EOS_TOKEN

        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN)
    if not path.is_dir():
        raise ConfigError(
            f"--tokenizer {spec!r} is neither a tokenizer folder nor a tokenizer.json; train one with "
            "`genesis-hf tokenizer train --output_dir DIR --vocab_size N`, or pass default:VOCAB."
        )
    return AutoTokenizer.from_pretrained(path)


def _prepare_arguments(namespace: argparse.Namespace) -> PrepareArguments:
    """`--config` YAML values as defaults, command-line flags on top (the project's config idiom)."""
    values = config_and_flags(namespace, PrepareArguments)
    missing = [f"--{name.replace('_', '-')}" for name in ("tokenizer", "output_dir") if values.get(name) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required (on the command line or in the --config YAML).")
    return PrepareArguments(**values)


def _run_prepare(namespace: argparse.Namespace) -> int:
    from genesis_hf.data.prepare import parse_shard, prepare_tokenized

    try:
        arguments = _prepare_arguments(namespace)
        shard_index, num_shards = parse_shard(arguments.shard)
        started = time.perf_counter()
        index = prepare_tokenized(
            arguments.mixture,
            load_tokenizer(arguments.tokenizer),
            arguments.output_dir,
            shard_index=shard_index,
            num_shards=num_shards,
            num_proc=arguments.num_proc,
            max_tokens=arguments.max_tokens,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ConfigError as error:
        print(f"genesis-hf data prepare: error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    summary = {
        "output_dir": str(Path(arguments.output_dir).resolve()),
        "shard": f"{shard_index}/{num_shards}",
        "dtype": index["dtype"],
        "tokens": index["tokens"],
        "tokens_per_source": index["tokens_per_source"],
        "seconds": round(seconds, 2),
        "tokens_per_second": round(index["tokens"] / max(seconds, 1e-9)),
        "next": None if num_shards == 1 else f"genesis-hf data merge {arguments.output_dir} --output_dir DIR",
    }
    print(json.dumps(summary))
    return 0


def _run_merge(namespace: argparse.Namespace) -> int:
    from genesis_hf.data.tokenized import merge_tokenized

    try:
        merged = merge_tokenized(namespace.input_dirs, namespace.output_dir)
    except ConfigError as error:
        print(f"genesis-hf data merge: error: {error}", file=sys.stderr)
        return 2
    summary = {
        "output_dir": str(Path(namespace.output_dir).resolve()),
        "num_shards": merged["num_shards"],
        "tokens_per_source": merged["tokens_per_source"],
        "tokens_per_shard": merged["tokens_per_shard"],
    }
    print(json.dumps(summary))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf data prepare` and `genesis-hf data merge` to the top-level `subparsers`."""
    help = "Tokenize a data mixture into shards; merge shards."
    commands = add_command(subparsers, "data", help=help, description=__doc__).add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    help = "Tokenize every source of a mixture into token shards (--shard i/N for one slice)."
    description = "Tokenize every source of a mixture into token shards. See genesis_hf/data/prepare.py."
    prepare = add_command(commands, "prepare", help=help, description=description, func=_run_prepare)
    prepare.add_argument("--config", default=None, help="YAML file with default values for any flag below.")
    # One flag per PrepareArguments field; default None marks "not given", so the YAML value (or the field's
    # default) applies.
    for field in dataclasses.fields(PrepareArguments):
        field_type = int if field.name in ("num_proc", "max_tokens") else str
        prepare.add_argument(f"--{field.name}", type=field_type, default=None, help=field.metadata["help"])
    help = "Merge the per-shard indexes of prepare runs into one index.json (no token is copied)."
    description = "Merge the per-shard indexes of `prepare --shard i/N` runs into OUTPUT_DIR/index.json."
    merge = add_command(commands, "merge", help=help, description=description, func=_run_merge)
    merge.add_argument("input_dirs", nargs="+", help="Directories written by prepare runs.")
    merge.add_argument("--output_dir", required=True, help="Where index.json goes (may be an input directory).")


__all__ = ["PrepareArguments", "load_tokenizer", "register_cli"]
