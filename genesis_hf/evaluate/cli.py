"""`genesis-hf eval MODEL`: the seed's lm-eval suite on any checkpoint, behind a sanity gate, saved as JSON.

    genesis-hf eval outputs/genesis-tiny/checkpoints/step-0000200
    genesis-hf eval you/genesis-1b@step-0040000 --tasks hellaswag,piqa --batch_size auto:2
    genesis-hf eval outputs/export --include_path outputs/eval_tasks --limit 100 --output_path outputs/eval/base.json

Flags are lm-eval's own (`--tasks --include_path --num_fewshot --limit --batch_size --output_path --device
--log_samples`); `--config file.yaml` gives defaults for any of them. The sanity gate runs first (see
`genesis_hf.evaluate.sanity`): when it fires, the command prints why and exits 1 without running the suite, unless
`--no_sanity_gate` is given (the gate's verdict is then kept in the results). Exit code 2 is bad input.
"""

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from genesis_hf.args import ConfigError, add_command, config_and_flags
from genesis_hf.evaluate.tasks import RANDOM_BASELINES, SEED_TASKS
from genesis_hf.writer_lock import create_exclusively, hold_folder

DEFAULT_OUTPUT_DIR = "outputs/eval"


@dataclasses.dataclass
class EvalArguments:
    """Arguments of `genesis-hf eval` (lm-eval's flag names)."""

    model: str | None = dataclasses.field(
        default=None, metadata={"help": "Checkpoint, run or model folder, .gguf file, or Hub owner/name[@revision]."}
    )
    tasks: str = dataclasses.field(
        default=",".join(SEED_TASKS),
        metadata={"help": "Comma-separated lm-eval tasks or groups (default: seed suite)."},
    )
    include_path: str | None = dataclasses.field(
        default=None, metadata={"help": "Extra task folder(s), comma-separated (e.g. from `genesis-hf eval_tasks`)."}
    )
    num_fewshot: int | None = dataclasses.field(default=None, metadata={"help": "Few-shot examples per task."})
    limit: float | None = dataclasses.field(
        default=None, metadata={"help": "Documents per task (or a fraction below 1); for quick checks only."}
    )
    batch_size: str = dataclasses.field(default="auto", metadata={"help": "Batch size, `auto` or `auto:N`."})
    output_path: str | None = dataclasses.field(
        default=None, metadata={"help": f"Results .json file or folder (default: {DEFAULT_OUTPUT_DIR}/)."}
    )
    device: str | None = dataclasses.field(
        default=None, metadata={"help": "cuda, cuda:1 or cpu (default: cuda if any)."}
    )
    log_samples: bool | None = dataclasses.field(default=None, metadata={"help": "Keep every document's responses."})
    no_sanity_gate: bool | None = dataclasses.field(
        default=None, metadata={"help": "Run the suite even when the sanity gate fires (its verdict is still saved)."}
    )


def parse_eval_arguments(namespace: argparse.Namespace) -> EvalArguments:
    """`--config` YAML values as defaults, command-line flags on top; checks everything cheap to check."""
    values = config_and_flags(namespace, EvalArguments)
    arguments = EvalArguments(**values)
    if not arguments.model:
        raise ConfigError(
            "MODEL is required: a checkpoint, model folder, .gguf file or Hub repo (or `model:` in --config)."
        )
    if not re.fullmatch(r"auto(:\d+)?|\d+", str(arguments.batch_size)):
        raise ConfigError(f"--batch_size {arguments.batch_size!r}: pass a number, `auto` or `auto:N`.")
    if arguments.limit is not None and arguments.limit <= 0:
        raise ConfigError(f"--limit {arguments.limit}: pass a positive number of documents (or a fraction below 1).")
    for folder in split_list(arguments.include_path):
        if not Path(folder).is_dir():
            raise ConfigError(f"--include_path {folder!r} is not a folder; write one with `genesis-hf eval_tasks`.")
    if not split_list(arguments.tasks):
        raise ConfigError("--tasks is empty; pass lm-eval task names, e.g. --tasks hellaswag,piqa.")
    return arguments


def split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def results_path(arguments: EvalArguments) -> Path:
    """Where the results go; an existing file is never overwritten (checked before anything expensive)."""
    if arguments.output_path and arguments.output_path.endswith(".json"):
        path = Path(arguments.output_path)
    else:
        name = re.sub(r"[^\w.-]+", "_", arguments.model.strip("/")).strip("_") or "model"
        path = Path(arguments.output_path or DEFAULT_OUTPUT_DIR) / f"{name}.json"
    if path.exists():
        raise ConfigError(f"Results file {str(path)!r} already exists; pass another --output_path (a .json file).")
    return path


def summary_record(target, arguments: EvalArguments, sanity) -> dict:
    """The `genesis` block of the results file: which model, from which training step, evaluated how."""
    import lm_eval

    import genesis_hf

    return {
        "model": arguments.model,
        "kind": target.kind,
        "model_path": target.checkpoint or target.pretrained,
        "revision": target.revision,
        "gguf_file": target.gguf_file,
        "step": target.step,
        "tokens_seen": target.tokens_seen,
        "recorded_loss": target.recorded_loss,
        "recorded_loss_kind": target.recorded_loss_kind,
        "lm_eval_version": lm_eval.__version__,
        "genesis_hf_version": genesis_hf.__version__,
        "sanity_gate": {**dataclasses.asdict(sanity), "ok": sanity.ok, "ignored": bool(arguments.no_sanity_gate)},
    }


def run_eval(arguments: EvalArguments, log=print) -> tuple[int, dict | None]:
    """Resolve, gate, evaluate and save; returns `(exit code, results)`: 0 evaluated, 1 stopped by the gate.

    Args:
        arguments: from `parse_eval_arguments`.
        log: called with progress lines and the results table.

    Raises:
        ConfigError, EvalError: bad input, found before the model is exported or loaded.
    """
    output = results_path(arguments)
    # One writer per results file: a second eval writing the same file is refused while this one runs.
    with hold_folder(output, flag="--output_path"):
        return _evaluate(arguments, output, log)


def _evaluate(arguments: EvalArguments, output: Path, log) -> tuple[int, dict | None]:
    import torch
    from lm_eval.utils import handle_non_serializable, make_table

    from genesis_hf.evaluate import harness
    from genesis_hf.evaluate.sanity import scores_at_chance

    tasks = split_list(arguments.tasks)
    device = arguments.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="genesis-eval-") as workdir:
        # Cheap checks first (the model's path, the task names), then the export and the model loads.
        target = harness.resolve_target(arguments.model, Path(workdir), log=log)
        task_manager = harness.load_task_manager(tasks, split_list(arguments.include_path))
        started = time.perf_counter()
        harness.export_for_evaluation(target, Path(workdir), export_dtype="bf16" if on_gpu else "fp32", log=log)
        sanity = harness.sanity_check(target, device, log)
        log(sanity.message())
        if not sanity.ok and not arguments.no_sanity_gate:
            log("Not running the suite; fix the model, or pass --no_sanity_gate to evaluate it anyway.")
            return 1, None
        results = harness.evaluate_target(
            target,
            tasks,
            task_manager=task_manager,
            num_fewshot=arguments.num_fewshot,
            limit=int(arguments.limit) if arguments.limit and arguments.limit >= 1 else arguments.limit,
            batch_size=arguments.batch_size,
            device=device,
            dtype="bfloat16" if on_gpu else "float32",
            log_samples=bool(arguments.log_samples),
        )
    results["genesis"] = summary_record(target, arguments, sanity)
    results["genesis"]["seconds"] = round(time.perf_counter() - started, 2)
    verdict = scores_at_chance(results, RANDOM_BASELINES)
    results["genesis"]["scores_at_chance"] = verdict
    text = json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
    log(make_table(results))
    try:
        create_exclusively(output, text)
        log(f"Wrote {output}")
    except FileExistsError:
        # Someone else's file appeared at the path during the run: it is kept, and these results go beside it.
        stamped = output.with_name(f"{output.stem}.{time.strftime('%Y%m%d-%H%M%S')}{output.suffix}")
        create_exclusively(stamped, text)
        log(f"{output} appeared while this evaluation ran and was kept; wrote the results to {stamped} instead.")
    if verdict and not arguments.no_sanity_gate:
        log(verdict + " (The results are saved; --no_sanity_gate accepts them.)")
        return 1, results
    return 0, results


def _run(namespace: argparse.Namespace) -> int:
    from genesis_hf.evaluate.harness import EvalError

    try:
        code, _ = run_eval(parse_eval_arguments(namespace))
    except (ConfigError, EvalError) as error:
        print(f"genesis-hf eval: error: {error}", file=sys.stderr)
        return 2
    return code


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf eval` to the top-level `subparsers`."""
    help = "Evaluate any checkpoint with lm-eval (seed suite by default), behind a sanity gate."
    parser = add_command(subparsers, "eval", help=help, description=__doc__, func=_run)
    parser.add_argument(
        "model", nargs="?", default=None, help=EvalArguments.__dataclass_fields__["model"].metadata["help"]
    )
    parser.add_argument("--config", default=None, help="YAML file with default values for any flag below.")
    # default None marks "not given", so the YAML value (or the field's default) applies.
    for field in dataclasses.fields(EvalArguments):
        if field.name == "model":
            continue
        help_text = field.metadata["help"]
        if field.type == "bool | None" or field.type == bool | None:
            parser.add_argument(f"--{field.name}", action="store_const", const=True, default=None, help=help_text)
        else:
            kind = {"num_fewshot": int, "limit": float}.get(field.name, str)
            parser.add_argument(f"--{field.name}", type=kind, default=None, help=help_text)


__all__ = ["EvalArguments", "parse_eval_arguments", "register_cli", "results_path", "run_eval"]
