"""Offline MMLU for `genesis-hf eval_tasks`: lm-eval's 57 subject tasks and the `mmlu` group over local files.

Two local layouts, both of the `cais/mmlu` Hub dataset (records with question, subject, choices, answer):
`LOCAL/mmlu/<subject>/<split>.jsonl` (one folder per subject config, e.g. `anatomy/test.jsonl`; the Hub's
`test-00000-of-00001.parquet` names work too), or, when there is no subject folder, one file per split with a
`subject` column, `LOCAL/mmlu/<split>.jsonl` (or the Hub's `all/` config), which is split by subject into
`OUTPUT/mmlu_data/<subject>/<split>.jsonl`. lm-eval scores the test split; dev holds the few-shot examples.
"""

from pathlib import Path

from genesis_hf.evaluate import tasks as _tasks

_DEFAULT_DIR = "mmlu/default"
_GROUPS = ("mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities")


def mmlu_subjects() -> dict[str, Path]:
    """`{dataset_name: lm-eval's subject YAML}` of lm-eval's default MMLU tasks (57 subjects)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = _tasks.lm_eval_tasks_dir() / _DEFAULT_DIR
    return {
        load_yaml(path, resolve_func=False, recursive=False)["dataset_name"]: path
        for path in sorted(folder.glob("mmlu_*.yaml"))
    }


def _split_by_subject(mmlu_dir: Path, subjects: list[str], data_dir: Path) -> dict[str, Path]:
    """Write `data_dir/<subject>/<split>.jsonl` from the one-file-per-split layout; returns `{subject: folder}`."""
    import datasets

    dataset_path, files = _tasks._split_files(mmlu_dir)
    for split, file in files.items():
        records = datasets.load_dataset(dataset_path, data_files=file, split="train")
        if "subject" not in records.column_names:
            raise _tasks.TaskFolderError(
                f"{file!r} has no 'subject' column ({', '.join(records.column_names)}); MMLU files in one file per "
                "split need cais/mmlu's 'subject' field, or put them in per-subject folders <subject>/<split>.jsonl."
            )
        by_subject = records.to_pandas().groupby("subject")
        for subject, frame in by_subject:
            if subject in subjects:
                (data_dir / subject).mkdir(parents=True, exist_ok=True)
                frame.to_json(data_dir / subject / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)
    return {subject: data_dir / subject for subject in subjects if (data_dir / subject).is_dir()}


def _local_subject_dirs(mmlu_dir: Path, subjects: list[str], output_dir: Path) -> dict[str, Path]:
    """`{subject: folder of its split files}`: the per-subject folders when there are any (a Hub snapshot of
    cais/mmlu holds both them and `all/`), else the one-file-per-split layout, split by subject."""
    folders = {path.name: path for path in mmlu_dir.iterdir() if path.is_dir()}
    if any(subject in folders for subject in subjects):
        return folders
    combined = folders.get("all", mmlu_dir)
    if not any(path.suffix in _tasks._FORMATS for path in combined.iterdir() if path.is_file()):
        return {}
    return _split_by_subject(combined, subjects, output_dir / "mmlu_data")


def mmlu_task_configs(mmlu_dir: Path, output_dir: Path, subjects: list[str] | None) -> dict[str, dict]:
    """`{yaml name: mapping}`: one task per subject (lm-eval's definition, local files) and, when all 57 subjects
    are there, lm-eval's `mmlu` group and its four category groups.

    Args:
        mmlu_dir: `LOCAL/mmlu`, in one of the two layouts of the module docstring.
        output_dir: the task folder (the one-file-per-split layout is split by subject into `mmlu_data/` there).
        subjects: write only these subjects (lm-eval's `dataset_name`s, e.g. `anatomy`), without the `mmlu` group;
            None: all 57, and a subject without files is an error.
    """
    known = mmlu_subjects()
    wanted = list(known) if subjects is None else subjects
    unknown = [subject for subject in wanted if subject not in known]
    if unknown:
        raise _tasks.TaskFolderError(
            f"--subjects {','.join(unknown)}: not MMLU subjects; lm-eval's are {', '.join(known)}."
        )
    local = _local_subject_dirs(mmlu_dir, wanted, output_dir)
    missing = [subject for subject in wanted if subject not in local]
    if missing:
        raise _tasks.TaskFolderError(
            f"{str(mmlu_dir)!r} lacks {len(missing)} of the {len(wanted)} MMLU subjects: {', '.join(missing)}; add "
            "their files, or pass --subjects with the ones you have (the mmlu group is then not written)."
        )
    configs = {}
    for subject in wanted:
        config = _tasks.task_config_from(known[subject], f"mmlu_{subject}", local[subject])
        if subjects is not None:
            config["tag"] = []  # a subset must not stand in for lm-eval's mmlu group (its tags would collect it)
        configs[f"mmlu_{subject}"] = config
    if subjects is None:
        from lm_eval.tasks._yaml_loader import load_yaml

        folder = _tasks.lm_eval_tasks_dir() / _DEFAULT_DIR
        for group in _GROUPS:
            configs[group] = load_yaml(folder / f"_{group}.yaml", resolve_func=False)
    return configs
