"""Run lm-evaluation-harness on any Genesis model: find what MODEL is, gate it, evaluate it, save the results.

MODEL may be a training checkpoint (exported on the fly, with `genesis-hf export`'s verification, to a temporary
folder), a run's output folder (its `final/` model, written by pretraining, SFT and DPO, else its newest checkpoint),
an exported folder (hf with remote code, or plain llama), a GGUF file, or a Hub repo `owner/name[@revision]`. The
harness loads it through its own `HFLM` (`--model hf`) with the same `model_args` the seed's `lm_eval` command line
would use, so the two give the same numbers.
"""

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from genesis_hf.evaluate.sanity import SanityReport, run_sanity_gate
from genesis_hf.evaluate.tasks import PACKAGED_TASKS_DIR
from genesis_hf.layout import (
    CHECKPOINT_METADATA_FILE,
    FINAL_POINTER_FILE,
    RUN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    is_pretraining_checkpoint,
)

_RUN_FILES_DEPTH = 3  # a checkpoint's run files sit in it, its parent or its grandparent (checkpoints/step-X)


class EvalError(ValueError):
    """MODEL or an argument cannot be evaluated; the message names the value and the fix."""


@dataclasses.dataclass
class EvalTarget:
    """What `MODEL` resolved to: how lm-eval's `HFLM` should load it, and what is known about its training run."""

    source: str
    kind: str  # training-checkpoint, hf, llama, gguf, hub
    pretrained: str
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    step: int | None = None
    tokens_seen: int | None = None
    recorded_loss: float | None = None
    recorded_loss_kind: str | None = None
    mixture: str | None = None
    checkpoint: str | None = None  # the training checkpoint an on-the-fly export was made from

    def model_args(self, dtype: str) -> str:
        """The `--model_args` string of the `lm_eval` CLI that loads this model the same way."""
        args = [f"pretrained={self.pretrained}", f"dtype={dtype}"]
        if self.revision:
            args.append(f"revision={self.revision}")
        if self.gguf_file:
            args.append(f"gguf_file={self.gguf_file}")
        if self.trust_remote_code:
            args.append("trust_remote_code=True")
        return ",".join(args)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_metadata(target: EvalTarget, folder: Path) -> EvalTarget:
    """Fill step, tokens seen, recorded loss and the data mixture from the files a run leaves next to its model."""
    # A pretraining run's final/ names the checkpoint it was saved from (training_checkpoint.json).
    source = _read_json(folder / FINAL_POINTER_FILE).get("checkpoint")
    source_dir = Path(source) if isinstance(source, str) and Path(source).is_dir() else None
    state = _read_json(source_dir / TRAINER_STATE_FILE) if source_dir else {}
    state = {**state, **_read_json(folder / TRAINER_STATE_FILE), **_read_json(folder / CHECKPOINT_METADATA_FILE)}
    history = [entry for entry in state.get("log_history") or [] if isinstance(entry, dict)]  # TRL's trainer_state
    target.step = state.get("step", state.get("global_step"))
    target.tokens_seen = state.get("tokens_seen")
    for kind in ("eval_loss", "loss"):
        value = state.get(kind)
        if value is None:
            value = next((entry[kind] for entry in reversed(history) if kind in entry), None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            target.recorded_loss, target.recorded_loss_kind = float(value), kind
            break
    for directory in ([source_dir] if source_dir else []) + [folder, *folder.parents][:_RUN_FILES_DEPTH]:
        if (directory / RUN_CONFIG_FILE).is_file():
            run_config = yaml.safe_load((directory / RUN_CONFIG_FILE).read_text(encoding="utf-8")) or {}
            mixture = run_config.get("mixture") if isinstance(run_config, dict) else None
            target.mixture = mixture if isinstance(mixture, str) and not run_config.get("tokenized_dir") else None
            break
    return target


def _hub_metadata(target: EvalTarget, workdir: Path) -> EvalTarget:
    """Step, tokens seen and loss from the `genesis_checkpoint.json` a genesis_hf upload carries, when it has one."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = hf_hub_download(target.pretrained, CHECKPOINT_METADATA_FILE, revision=target.revision)
    except RevisionNotFoundError:
        raise EvalError(
            f"Hub repo {target.pretrained!r} has no revision {target.revision!r}; `genesis-hf checkpoints "
            f"{target.pretrained}` lists its step branches."
        ) from None
    except RepositoryNotFoundError:
        raise EvalError(
            f"Hub repo {target.pretrained!r} does not exist or is private (log in with `hf auth login` or set "
            "HF_TOKEN); for a local folder, check the path."
        ) from None
    except LocalEntryNotFoundError:
        raise EvalError(
            f"Cannot reach the Hub for {target.pretrained!r} and it is not in the local cache (HF_HUB_OFFLINE, or no "
            "network). Download it while online (`hf download REPO --revision REV`), or pass a local folder."
        ) from None
    except EntryNotFoundError:
        return target  # not uploaded by genesis_hf: evaluated all the same, without training metadata
    metadata_dir = workdir / "hub-metadata"
    metadata_dir.mkdir(exist_ok=True)
    (metadata_dir / CHECKPOINT_METADATA_FILE).write_bytes(Path(path).read_bytes())
    return _run_metadata(target, metadata_dir)


def _export_training_checkpoint(checkpoint: Path, workdir: Path, dtype: str, log: Callable[[str], None]) -> Path:
    # The one model-folder writer, verified, as pretraining's final/ is written.
    from genesis_hf.model.folder import ExportError
    from genesis_hf.pretrain.checkpoint import CheckpointError
    from genesis_hf.pretrain.final import write_checkpoint_folder

    out_dir = workdir / "export"
    try:
        write_checkpoint_folder(checkpoint, out_dir, dtype=dtype, log=log)
    except (CheckpointError, ExportError) as error:
        raise EvalError(f"Could not export training checkpoint {str(checkpoint)!r} for evaluation: {error}") from None
    return out_dir


def check_safetensors_complete(folder: Path) -> None:
    """Refuse a model folder whose safetensors files are cut short (a copy or download that stopped), from their
    headers alone: each file must hold the bytes its header declares.

    Raises:
        EvalError: naming the file, its size and what its header needs.
    """
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        with open(weights, "rb") as handle:
            prefix = handle.read(8)
            header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
            try:
                header = json.loads(handle.read(header_size)) if header_size and header_size <= size else None
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                header = None
        if header is None:
            raise EvalError(
                f"{weights} is truncated or not a safetensors file ({size} bytes, no complete header); export or "
                "download the model again."
            )
        needed = 8 + header_size + max(ends, default=0)
        if size < needed:
            raise EvalError(
                f"{weights} is truncated ({size} of the {needed} bytes its header declares); export or download the "
                "model again."
            )


def resolve_target(model: str, workdir: Path, *, log: Callable[[str], None]) -> EvalTarget:
    """Find out what `model` is and how to load it (cheap: a training checkpoint is exported later, by
    `export_for_evaluation`).

    Args:
        model: a checkpoint, run folder, model folder, GGUF file or `owner/name[@revision]`.
        workdir: a temporary folder (a Hub repo's `genesis_checkpoint.json`).
        log: called with progress lines.
    """
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        target = EvalTarget(model, "gguf", str(path.parent.resolve()), gguf_file=path.name)
        return _run_metadata(target, path.parent)
    if path.is_dir():
        from genesis_hf.pretrain.checkpoint import list_checkpoints

        if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
            log(f"{model}: evaluating the run's final model, {path / 'final'}.")
            path = path / "final"
        elif not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            checkpoints = list_checkpoints(path)
            if not checkpoints:
                raise EvalError(f"Run folder {model!r} has no complete checkpoint yet (checkpoints/ is empty).")
            log(f"{model}: evaluating its newest checkpoint, {checkpoints[-1].path.name}.")
            path = checkpoints[-1].path
        if is_pretraining_checkpoint(path):
            target = EvalTarget(model, "training-checkpoint", str(path.resolve()), trust_remote_code=True)
            return _run_metadata(target, path)  # exported by `export_for_evaluation`, once the tasks are checked
        if (path / "config.json").is_file():
            check_safetensors_complete(path)
            config = _read_json(path / "config.json")
            kind = "llama" if config.get("model_type") == "llama" else "hf"
            target = EvalTarget(model, kind, str(path.resolve()), trust_remote_code=bool(config.get("auto_map")))
            return _run_metadata(target, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_target(str(ggufs[0]), workdir, log=log)
        raise EvalError(
            f"{model!r} is a folder but not a model: no config.json, no checkpoints/ and not exactly one .gguf file. "
            "Pass a training checkpoint (<output_dir>/checkpoints/step-XXXXXXX), an exported folder or a GGUF file."
        )
    repo_id, _, revision = model.partition("@")
    if Path(repo_id.split("/")[0]).is_dir() or model.startswith((".", "~")):
        # "outputs/step-200" looks like owner/name, but outputs/ is here: a mistyped local path, not a Hub repo.
        raise EvalError(
            f"{model!r} does not exist (checked as a local path since {repo_id.split('/')[0]!r} is a local folder). "
            "Check the path; `genesis-hf checkpoints RUN_DIR` lists a run's checkpoints."
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        target = EvalTarget(model, "hub", repo_id, revision=revision or None, trust_remote_code=True)
        return _hub_metadata(target, workdir)
    raise EvalError(
        f"MODEL {model!r} does not exist locally and is not a Hub repo id (owner/name or owner/name@revision). Pass "
        "a training checkpoint, a run or model folder, a .gguf file, or a Hub repo."
    )


def export_for_evaluation(target: EvalTarget, workdir: Path, *, export_dtype: str, log: Callable[[str], None]):
    """Point a training checkpoint's target at its verified hf export in `workdir`; other targets are left as they are.

    Args:
        target: from `resolve_target`.
        workdir: a temporary folder for the export.
        export_dtype: `fp32` (CPU) or `bf16` (GPU).
        log: called with progress lines.
    """
    if target.kind == "training-checkpoint" and target.checkpoint is None:
        target.checkpoint = target.pretrained
        target.pretrained = str(_export_training_checkpoint(Path(target.pretrained), workdir, export_dtype, log))
    return target


def load_for_gate(target: EvalTarget, device: str):
    """The model (fp32) and tokenizer exactly as `HFLM` will load them, for the sanity gate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {
        "revision": target.revision,
        "trust_remote_code": target.trust_remote_code,
        "gguf_file": target.gguf_file,
    }
    kwargs = {key: value for key, value in kwargs.items() if value}
    model = AutoModelForCausalLM.from_pretrained(target.pretrained, dtype=torch.float32, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(target.pretrained, **kwargs)
    return model, tokenizer


def sanity_check(target: EvalTarget, device: str, log: Callable[[str], None]) -> SanityReport:
    """Run the sanity gate on `target` as lm-eval will load it, against the run's recorded loss and mixture.

    Args:
        target: from `resolve_target` (and `export_for_evaluation`).
        device: where the gate's forward passes run.
        log: called with progress lines.
    """
    model, tokenizer = load_for_gate(target, device)
    try:
        return run_sanity_gate(
            model,
            tokenizer,
            recorded_loss=target.recorded_loss,
            recorded_loss_kind=target.recorded_loss_kind or "loss",
            mixture=target.mixture,
            log=log,
        )
    finally:
        del model


def task_leaves(index: dict, name: str) -> list[str]:
    """The task names a task, group or tag stands for, in lm-eval's task index."""
    entry = index.get(name)
    if entry is None:
        return [name]  # unknown names are reported by lm-eval itself
    if entry.kind.name == "TAG":
        return sorted(entry.tags)
    if entry.kind.name == "GROUP":
        members = [item if isinstance(item, str) else item.get("task") for item in entry.cfg.get("task", [])]
        return [leaf for member in members if isinstance(member, str) for leaf in task_leaves(index, member)]
    return [name]


def split_by_output_type(task_manager, tasks: list[str]) -> tuple[list[str], list[str]]:
    """`(log-likelihood tasks, generative tasks)`: generative ones run with the chat template, the others without.

    A group is generative when every task it names is; a mixed group (`aligned`) is split into its tasks.
    """
    index = task_manager.task_index

    def leaves(name: str) -> list[str]:
        return task_leaves(index, name)

    def generative(name: str) -> bool:
        entry = index.get(name)
        return bool(entry and entry.cfg and entry.cfg.get("output_type") == "generate_until")

    loglikelihood, generation = [], []
    for name in tasks:
        kinds = {generative(leaf) for leaf in leaves(name)}
        if kinds == {True}:
            generation.append(name)
        elif kinds == {False}:
            loglikelihood.append(name)
        else:
            for leaf in leaves(name):
                (generation if generative(leaf) else loglikelihood).append(leaf)
    return loglikelihood, generation


def _merge(total: dict | None, part: dict) -> dict:
    if total is None:
        return part
    for key in (
        "results",
        "groups",
        "group_subtasks",
        "configs",
        "versions",
        "n-shot",
        "higher_is_better",
        "n-samples",
    ):
        if isinstance(part.get(key), dict):
            total.setdefault(key, {}).update(part[key])
    if isinstance(part.get("samples"), dict):
        total.setdefault("samples", {}).update(part["samples"])
    return total


def load_task_manager(tasks: list[str], include_path: list[str]):
    """lm-eval's `TaskManager` over the include path, plus lm-eval's own tasks only when a task needs them; raises
    `EvalError` for task names neither knows (before any model is loaded).

    Indexing lm-eval's ~15,000 task YAMLs takes 10-20 s; offline task folders `include` their definitions by path,
    so a run over local tasks skips it.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(PACKAGED_TASKS_DIR), *include_path]
    task_manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(
        leaf in task_manager.task_index for name in tasks for leaf in task_leaves(task_manager.task_index, name)
    ):
        task_manager = TaskManager(include_path=paths)
    unknown = [name for name in tasks if name not in task_manager.task_index]
    if unknown:
        raise EvalError(
            f"Unknown task(s) {', '.join(unknown)}: not in lm-eval nor in --include_path "
            f"{', '.join(include_path) or '(none)'}. `lm_eval ls tasks` lists lm-eval's; write local copies with "
            "`genesis-hf eval_tasks`."
        )
    return task_manager


def evaluate_target(
    target: EvalTarget,
    tasks: list[str],
    *,
    task_manager,
    num_fewshot: int | None,
    limit: float | None,
    batch_size: str,
    device: str,
    dtype: str,
    log_samples: bool,
) -> dict:
    """Run `lm_eval.simple_evaluate` with lm-eval's `HFLM` on `target`; return the harness's results dictionary.

    Log-likelihood tasks are scored on raw text; generative ones with the tokenizer's chat template when it has one
    (stopping at `<|im_end|>`: the export's `generation_config` lists it as an end-of-sequence token).

    Args:
        target: from `resolve_target` (and `export_for_evaluation`).
        tasks: lm-eval task, group or tag names.
        task_manager: from `load_task_manager(tasks, ...)`.
        num_fewshot: overrides the tasks' few-shot count when given.
        limit: documents per task (or a fraction below 1); `None` for all.
        batch_size: a number, `auto` or `auto:N`.
        device: `cuda`, `cuda:N` or `cpu`.
        dtype: `bfloat16` or `float32` (HFLM's `dtype`).
        log_samples: keep every document's requests and responses under `samples`.
    """
    import lm_eval

    model_args = target.model_args(dtype)
    max_batch_size = 64 if device.startswith("cuda") else 8
    lm = lm_eval.api.registry.get_model("hf").create_from_arg_string(
        model_args, {"batch_size": batch_size, "max_batch_size": max_batch_size, "device": device}
    )
    loglikelihood, generation = split_by_output_type(task_manager, tasks)
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    results = None
    for names, chat in ((loglikelihood, False), (generation, has_template)):
        if not names:
            continue
        part = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=log_samples,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
        )
        results = _merge(results, part)
    results["config"] = {**part.get("config", {}), "model": "hf", "model_args": model_args, "batch_size": batch_size}
    results["config"]["device"] = device
    return results


__all__ = [
    "EvalError",
    "EvalTarget",
    "evaluate_target",
    "export_for_evaluation",
    "load_for_gate",
    "load_task_manager",
    "resolve_target",
    "sanity_check",
    "split_by_output_type",
]
