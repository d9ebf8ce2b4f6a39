"""`genesis-hf constitution generate`: critique-and-revise data for SFT and DPO from a model you run yourself.

    genesis-hf constitution generate --prompts genesis_hf:prompts --model Qwen/Qwen2.5-1.5B-Instruct --output_dir outputs/cai
    genesis-hf constitution generate --prompts my.jsonl --base_url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-1.5B-Instruct --output_dir outputs/cai
    genesis-hf constitution harmbench MODEL --behaviors behaviors.csv --classifier CLS_DIR --output_dir outputs/hb

Writes `<output_dir>/rows.jsonl` (everything), `sft.jsonl` (`messages`), `dpo.jsonl` (`prompt`/`chosen`/`rejected`)
and `summary.json` (per principle). Relaunching the same command resumes. Flags are snake_case; `--config file.yaml`
gives defaults for any of them.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from genesis_hf.args import ConfigError, add_command, parse_args
from genesis_hf.writer_lock import hold_folder

from .backends import BackendArguments, BackendError, build_backend, check_backend_arguments
from .pairs import pair_or_reason, sft_example
from .pipeline import (
    ROWS_FILE,
    check_run_file,
    generate_rows,
    pending_items,
    principle_summary,
    prompts_fingerprint,
    work_items,
)
from .principles import ConstitutionError, load_constitution
from .prompts import HARMFUL_CATEGORIES, PromptsError, load_prompts
from .rows import RowsError, read_rows, write_jsonl_atomic

DPO_MODES = ("revision", "judge")


@dataclasses.dataclass
class GenerateArguments:
    """What to generate."""

    output_dir: str | None = dataclasses.field(default=None, metadata={"help": "Folder for rows, sft, dpo, summary."})
    prompts: str = dataclasses.field(
        default="genesis_hf:prompts", metadata={"help": "genesis_hf:prompts, a .jsonl (prompt, category) or .txt."}
    )
    constitution: str | None = dataclasses.field(
        default=None, metadata={"help": "Your constitution YAML; the packaged one when unset."}
    )
    rounds: int = dataclasses.field(default=1, metadata={"help": "Critique-revise rounds per answer."})
    num_samples: int = dataclasses.field(default=1, metadata={"help": "Answers per prompt."})
    num_few_shot: int = dataclasses.field(default=-1, metadata={"help": "Few-shot examples to show; -1 is all."})
    max_prompts: int | None = dataclasses.field(default=None, metadata={"help": "Use only the first N prompts."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seeds sampling and the principle draws."})
    dpo_mode: str = dataclasses.field(
        default="revision",
        metadata={"help": "revision: chosen = final revision; judge: the model picks (AI feedback)."},
    )


def _check_generate_arguments(args: GenerateArguments) -> None:
    if not args.output_dir:
        raise ConfigError("--output_dir is required, e.g. --output_dir outputs/cai.")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ConfigError(f"--output_dir {args.output_dir!r} is a file; pass a folder (it is created).")
    for flag, value in (("--rounds", args.rounds), ("--num_samples", args.num_samples)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1.")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ConfigError(f"--max_prompts {args.max_prompts} must be at least 1 (or left unset for all).")
    if args.dpo_mode not in DPO_MODES:
        raise ConfigError(f"--dpo_mode {args.dpo_mode!r} is not one of {', '.join(DPO_MODES)}.")


def _run_settings(args: GenerateArguments, backend_args: BackendArguments, constitution, prompts) -> dict:
    """The settings that shape the rows; a resumed run must match them. Speed-only flags may change, and so may the
    endpoint's address (a restarted server on another port serves the same --model)."""
    return {
        "model": backend_args.model,
        "max_new_tokens": backend_args.max_new_tokens,
        "temperature": backend_args.temperature,
        "top_p": backend_args.top_p,
        "constitution": f"{constitution.name} v{constitution.version} ({constitution.fingerprint})",
        "prompts": f"{args.prompts} ({len(prompts)} prompts, {prompts_fingerprint(prompts)})",
        "rounds": args.rounds,
        "num_samples": args.num_samples,
        "num_few_shot": args.num_few_shot,
        "seed": args.seed,
        "dpo_mode": args.dpo_mode,
    }


def write_training_files(output_dir: Path, rows: list[dict]) -> dict:
    """Rebuild `sft.jsonl`, `dpo.jsonl` and `summary.json` from all rows (ordered by id); returns the summary."""
    rows = sorted(rows, key=lambda row: row["id"])
    pairs, reasons = [], []
    for row in rows:
        pair, reason = pair_or_reason(row, HARMFUL_CATEGORIES)
        reasons.append(reason)
        if pair is not None:
            pairs.append(pair)
    summary = {
        "rows": len(rows),
        "sft_examples": write_jsonl_atomic(output_dir / "sft.jsonl", (sft_example(row) for row in rows)),
        "dpo_pairs": write_jsonl_atomic(output_dir / "dpo.jsonl", pairs),
        "dpo_dropped": {reason: reasons.count(reason) for reason in sorted(set(reasons) - {None})},
        "principles": principle_summary(rows, reasons),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    header = "| principle | rows | DPO pairs | words before -> after | follow-up | hedging | refusal |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, entry in summary["principles"].items():
        lines.append(
            f"| {name} | {entry['rows']} | {entry['dpo_pairs']} | {entry['words_original']} -> {entry['words_final']} "
            f"| {entry['follow_up_original']} -> {entry['follow_up_final']} "
            f"| {entry['hedging_original']} -> {entry['hedging_final']} "
            f"| {entry['refusal_original']} -> {entry['refusal_final']} |"
        )
    return "\n".join(lines)


def generate_dataset(args: GenerateArguments, backend_args: BackendArguments, backend=None) -> dict:
    """Check everything cheap, then generate the missing rows and rebuild the training files.

    Args:
        args: what to generate.
        backend_args: which model, and how.
        backend: an already built backend (tests, benchmarks); built from `backend_args` when `None`.
    """
    _check_generate_arguments(args)
    # One writer per folder: a second generate into --output_dir is refused while this one runs.
    with hold_folder(args.output_dir):
        return _generate(args, backend_args, backend)


def _generate(args: GenerateArguments, backend_args: BackendArguments, backend) -> dict:
    check_backend_arguments(backend_args)
    constitution = load_constitution(args.constitution)
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    output_dir = Path(args.output_dir)
    check_run_file(output_dir, _run_settings(args, backend_args, constitution, prompts))
    rows_path = output_dir / ROWS_FILE
    items = work_items(prompts, args.num_samples)
    pending = pending_items(rows_path, items)
    if pending:
        backend = backend or build_backend(backend_args)
        generate_rows(
            backend,
            constitution,
            pending,
            rows_path,
            SimpleNamespace(**dataclasses.asdict(args), **dataclasses.asdict(backend_args)),
            total=len(items),
        )
    summary = write_training_files(output_dir, read_rows(rows_path))
    summary["generated_now"] = len(pending)
    return summary


def main(argv: list[str]) -> int:
    try:
        args, backend_args = parse_args((GenerateArguments, BackendArguments), argv)
        summary = generate_dataset(args, backend_args)
    except (ConfigError, ConstitutionError, PromptsError, RowsError, BackendError) as error:
        print(f"genesis-hf constitution generate: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps({key: value for key, value in summary.items() if key != "principles"}))
    return 0


def forward_to(main_function):
    """An argparse `func` that hands the raw flags to `main_function` (parsed there with `genesis_hf.args`)."""
    return lambda namespace: main_function(namespace.argv)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf constitution generate` and `genesis-hf constitution harmbench` to the top-level `subparsers`."""
    help = "Critique-and-revise data for SFT and DPO."
    parser = add_command(subparsers, "constitution", help=help, description=__doc__)
    commands = parser.add_subparsers(dest="constitution_command", required=True, metavar="SUBCOMMAND")
    # Their options are dataclasses parsed like a recipe's (`main`, `harmbench.main`), --help and --config included.
    help = "Answer, critique and revise; write sft.jsonl and dpo.jsonl."
    add_command(commands, "generate", help=help, func=forward_to(main), forward=True)
    help = "HarmBench-style attack success rate from local behaviours and a local classifier."
    add_command(commands, "harmbench", help=help, func=lambda namespace: _harmbench_main(namespace.argv), forward=True)


def _harmbench_main(argv: list[str]) -> int:
    from .harmbench import main as harmbench_main

    return harmbench_main(argv)
