"""lm-eval task lists (the seed's suite, the `aligned` group) and offline task folders over local benchmark files.

`genesis-hf eval_tasks --data_dir LOCAL --output_dir TASKS` writes one lm-eval task YAML per benchmark found in
`LOCAL/<task>/<split>.jsonl` (or `.json`, `.parquet`): each YAML `include`s lm-eval's own definition of the task (same
prompts, metrics and version) and only swaps the Hub dataset for the local files (`dataset_path: json` with
`data_files`). Tasks keep their lm-eval names, so `--include_path TASKS --tasks hellaswag` reads the local copy, with
`genesis-hf eval` and with the `lm_eval` CLI alike, and no request leaves the machine.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from genesis_hf.args import add_command

# The seed's published suite (step 40,000 base model), in its table order.
SEED_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "lambada_openai", "mmlu")
# For SFT/DPO models: honesty (TruthfulQA mc2) and instruction following (IFEval), as the `aligned` group.
ALIGNED_TASKS = ("truthfulqa_mc2", "ifeval")
# Task folders shipped with genesis_hf (the `aligned` group); always on the include path of `genesis-hf eval`.
PACKAGED_TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval_tasks"
# Accuracy of guessing uniformly among the choices (ARC has a few 3- and 5-choice questions; 4 dominates).
RANDOM_BASELINES = {
    "arc_challenge": 0.25,
    "arc_easy": 0.25,
    "hellaswag": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "lambada_openai": 0.0,
    "mmlu": 0.25,
    "gsm8k": 0.0,
}
# lm-eval's definition of each benchmark we know the local layout of, relative to lm_eval/tasks.
TASK_DEFINITIONS = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
    "ifeval": "ifeval/ifeval.yaml",
}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HEADER_START = "# Written by `genesis-hf eval_tasks`"
# A Hub parquet shard, `test-00000-of-00001.parquet`: its split is `test`.
_SHARD_NAME = re.compile(r"^(\w+)-\d{5}-of-\d{5}$")


class TaskFolderError(ValueError):
    """The local benchmark files cannot be turned into task YAMLs; the message names the file and the fix."""


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _split_files(task_dir: Path) -> tuple[str, dict[str, str]]:
    """`(dataset_path, {split: file})` of one local benchmark folder."""
    files = sorted(path for path in task_dir.iterdir() if path.suffix in _FORMATS and path.is_file())
    formats = {_FORMATS[path.suffix] for path in files}
    if len(formats) != 1:
        found = ", ".join(path.name for path in files) or "no .jsonl/.json/.parquet file"
        raise TaskFolderError(
            f"{str(task_dir)!r} must hold the splits of one benchmark in one format, named <split>.jsonl (or .json, "
            f".parquet), e.g. validation.jsonl; found: {found}."
        )
    splits = {}
    for path in files:
        shard = _SHARD_NAME.match(path.stem)
        split = shard.group(1) if shard else path.stem
        if split in splits:
            raise TaskFolderError(f"{str(task_dir)!r} holds two files of split {split!r}; keep one per split.")
        splits[split] = str(path.resolve())
    return formats.pop(), splits


def offline_task_config(task: str, task_dir: Path) -> dict:
    """The YAML mapping of one offline task: lm-eval's definition of `task`, reading the files in `task_dir`.

    Args:
        task: an lm-eval task name from `TASK_DEFINITIONS`.
        task_dir: a folder of `<split>.jsonl` files in the benchmark's own record format.
    """
    return task_config_from(lm_eval_tasks_dir() / TASK_DEFINITIONS[task], task, task_dir)


def task_config_from(definition: Path, task: str, task_dir: Path) -> dict:
    """`offline_task_config` for lm-eval's task YAML `definition` (task name `task`)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    upstream = load_yaml(definition, resolve_func=False)
    dataset_path, files = _split_files(task_dir)
    config = {
        "include": str(definition),
        "task": task,
        "dataset_path": dataset_path,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
    }
    for key in _SPLIT_KEYS:
        split = upstream.get(key)
        if split is not None and split not in files:
            config[key] = None
    # lm-eval scores the test split when the task has one, else validation: the local copy must score the same one.
    scored = upstream.get("test_split") or upstream.get("validation_split")
    if scored not in files:
        raise TaskFolderError(
            f"{task}: lm-eval scores this task on its {scored!r} split, but {str(task_dir)!r} holds only "
            f"{', '.join(files)}. Add {str(task_dir / (str(scored) + '.jsonl'))!r}."
        )
    fewshot = upstream.get("fewshot_split") or upstream.get("training_split")
    if upstream.get("num_fewshot") and fewshot not in files:
        raise TaskFolderError(
            f"{task} is a {upstream['num_fewshot']}-shot task that draws its examples from the {fewshot!r} split; add "
            f"{str(task_dir / (str(fewshot) + '.jsonl'))!r}."
        )
    return config


def write_offline_tasks(
    data_dir: str | Path, output_dir: str | Path, mmlu_subjects: list[str] | None = None
) -> dict[str, Path]:
    """Write one task YAML per benchmark folder in `data_dir`; returns `{task: yaml path}`.

    Args:
        data_dir: holds `<task>/<split>.jsonl` for tasks of `TASK_DEFINITIONS` and `mmlu/` (see
            `genesis_hf.evaluate.mmlu`); other folders are an error.
        output_dir: the task folder to create; pass it to `--include_path`. Existing YAMLs of other names are kept.
        mmlu_subjects: write only these MMLU subjects and no `mmlu` group; None: all 57 must be there.
    """
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if not data_dir.is_dir():
        raise TaskFolderError(
            f"--data_dir {str(data_dir)!r} is not a folder; pass the folder holding <task>/<split>.jsonl."
        )
    task_dirs = sorted(path for path in data_dir.iterdir() if path.is_dir())
    unknown = [path.name for path in task_dirs if path.name not in TASK_DEFINITIONS and path.name != "mmlu"]
    if unknown or not task_dirs:
        raise TaskFolderError(
            f"{str(data_dir)!r}: folders must be named after lm-eval tasks; unknown: {', '.join(unknown) or 'none found'}. "
            f"Known: {', '.join(TASK_DEFINITIONS)}, mmlu."
        )
    if mmlu_subjects is not None and not (data_dir / "mmlu").is_dir():
        raise TaskFolderError(f"--subjects given, but {str(data_dir / 'mmlu')!r} is not a folder of MMLU files.")
    configs = {path.name: offline_task_config(path.name, path) for path in task_dirs if path.name != "mmlu"}
    if (data_dir / "mmlu").is_dir():
        from genesis_hf.evaluate.mmlu import mmlu_task_configs

        configs.update(mmlu_task_configs(data_dir / "mmlu", output_dir, mmlu_subjects))
    # Only YAMLs this command wrote may be replaced: a task file of the user's is never overwritten.
    foreign = [
        str(output_dir / f"{task}.yaml")
        for task in configs
        if (output_dir / f"{task}.yaml").exists()
        and not (output_dir / f"{task}.yaml").read_text(encoding="utf-8").startswith(_HEADER_START)
    ]
    if foreign:
        raise TaskFolderError(
            f"{', '.join(foreign)} already exist and were not written by eval_tasks; pass another --output_dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, config in configs.items():
        path = output_dir / f"{task}.yaml"
        source = data_dir / ("mmlu" if task.startswith("mmlu") else task)
        header = f"{_HEADER_START} from {source}: lm-eval's own task, local files.\n"
        path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        written[task] = path
    return written


def _run_eval_tasks(args: argparse.Namespace) -> int:
    try:
        subjects = (
            [subject.strip() for subject in args.subjects.split(",") if subject.strip()] if args.subjects else None
        )
        written = write_offline_tasks(args.data_dir, args.output_dir, subjects)
    except TaskFolderError as error:
        print(f"genesis-hf eval_tasks: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"include_path": str(Path(args.output_dir).resolve()), "tasks": sorted(written)}))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf eval_tasks` to the top-level `subparsers`."""
    help = "Write lm-eval task YAMLs that read local copies of the benchmarks (offline evaluation)."
    parser = add_command(subparsers, "eval_tasks", help=help, description=__doc__, func=_run_eval_tasks)
    parser.add_argument("--data_dir", required=True, help="Folder of <task>/<split>.jsonl benchmark files.")
    parser.add_argument("--output_dir", required=True, help="Task folder to write; pass it as --include_path.")
    parser.add_argument(
        "--subjects",
        help="MMLU only: write just these subjects (comma-separated, e.g. anatomy,astronomy) and no mmlu group; by "
        "default all 57 subjects' files must be in DATA_DIR/mmlu.",
    )


__all__ = [
    "ALIGNED_TASKS",
    "PACKAGED_TASKS_DIR",
    "RANDOM_BASELINES",
    "SEED_TASKS",
    "TASK_DEFINITIONS",
    "TaskFolderError",
    "offline_task_config",
    "register_cli",
    "task_config_from",
    "write_offline_tasks",
]
