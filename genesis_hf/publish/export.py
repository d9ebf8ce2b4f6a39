"""`genesis-hf export CHECKPOINT OUT [--format hf|llama|gguf] [--dtype bf16|fp32|fp16]`: export a checkpoint as a
folder that loads everywhere, and prove that it does.

CHECKPOINT is a training checkpoint (`<output_dir>/checkpoints/step-XXXXXXX/`, DCP shards loaded on CPU, no GPU or
process group needed) or a Hugging Face model folder (Genesis or Llama). This module loads it (`load_checkpoint`,
with the checks that the weights fit the config and the tokenizer fits the model) and hands it to the one writer of
model folders, `genesis_hf.model.folder.write_model_folder`, which documents the formats, the verification (reload,
compare logits; exit code 1 and nothing at OUT on a mismatch) and the rules that keep OUT from ever replacing
anything of the user's.
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from genesis_hf.args import add_command
from genesis_hf.layout import (
    CHECKPOINT_METADATA_FILE,
    TRAINER_STATE_FILE,
    WEIGHT_FILES,
    has_weights,
    is_pretraining_checkpoint,
)
from genesis_hf.model.convert import from_llama
from genesis_hf.model.folder import (
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_TOLERANCE,
    EXPORT_DTYPES,
    EXPORT_FORMATS,
    MODEL_LOADING_LOCK,
    ExportError,
    ExportMismatchError,
    ExportResult,
    LoadedCheckpoint,
    check_export_settings,
    check_output_folder,
    write_model_folder,
)
from genesis_hf.model.modeling_genesis import GenesisForCausalLM


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        present = ", ".join(sorted(item.name for item in path.iterdir())[:12]) or "nothing"
        raise ExportError(
            f"{str(path)!r} is not a complete checkpoint: config.json is missing (found: {present}). Pass a training "
            "checkpoint (<output_dir>/checkpoints/step-XXXXXXX) or a folder written by save_pretrained; a checkpoint "
            "copied while it was being written is partial, copy it again."
        )
    index_files = [name for name in WEIGHT_FILES if name.endswith(".index.json") and (path / name).is_file()]
    if index_files:
        weight_map = json.loads((path / index_files[0]).read_text())["weight_map"]
        missing = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if missing:
            raise ExportError(
                f"{str(path)!r} is partial: {index_files[0]} lists weight shards that are missing: {', '.join(missing)}. "
                "Copy the complete folder (every shard named in the index)."
            )
    elif not has_weights(path):
        raise ExportError(
            f"{str(path)!r} has config.json but no weights (expected model.safetensors or a sharded "
            "model.safetensors.index.json with its shards). The checkpoint is partial: copy it again, or point at a "
            "training checkpoint directory with its DCP shards."
        )


def _load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ExportError(
            f"Could not load a tokenizer from {str(path)!r} ({error}). Pass --tokenizer with the folder holding the "
            "run's tokenizer (tokenizer.json, tokenizer_config.json)."
        ) from None


def _find_tokenizer_dir(path: Path) -> Path | None:
    for candidate in (path / "tokenizer", path):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
            return candidate
    return None


def _load_model_folder(path: Path) -> GenesisForCausalLM:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type == "genesis":
        model_class = GenesisForCausalLM
    elif model_type == "llama":
        model_class = LlamaForCausalLM
    else:
        raise ExportError(
            f"{str(path / 'config.json')!r} has model_type={model_type!r}; genesis-hf export reads Genesis "
            "(model_type 'genesis') and Llama (model_type 'llama') checkpoints."
        )
    try:
        model, info = model_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise ExportError(
            f"The weights in {str(path)!r} do not fit its config.json ({str(error).splitlines()[0]}). The folder mixes "
            "files of different models: use the config.json saved with these weights."
        ) from None
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [key for key in info.get("missing_keys", []) if key not in tied]
    problems = {
        "missing": missing,
        "unexpected": list(info.get("unexpected_keys", [])),
        "mismatched": [str(item) for item in info.get("mismatched_keys", [])],
    }
    if any(problems.values()):
        details = "; ".join(f"{kind}: {', '.join(keys[:6])}" for kind, keys in problems.items() if keys)
        raise ExportError(
            f"The weights in {str(path)!r} do not match its config.json ({details}). Exporting would publish randomly "
            "initialised or dropped weights: use the config.json and weights saved together."
        )
    if model_type == "llama":
        model = from_llama(model)
    return model.float().eval()


def load_checkpoint(checkpoint: str | Path, tokenizer_path: str | Path | None = None) -> LoadedCheckpoint:
    """Load a training checkpoint or a model folder on CPU in fp32, with its tokenizer and run metadata.

    Args:
        checkpoint: a training checkpoint directory or a Hugging Face model folder.
        tokenizer_path: use this tokenizer instead of the checkpoint's own.

    Raises:
        ExportError: the path is missing or partial, the weights do not fit the config, or the tokenizer does not fit
            the model.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(
            f"Checkpoint {str(path)!r} does not exist or is not a directory. Pass a training checkpoint "
            "(<output_dir>/checkpoints/step-XXXXXXX) or a folder written by save_pretrained; "
            "`genesis-hf checkpoints <output_dir>` lists them."
        )
    if is_pretraining_checkpoint(path):
        if not (path / "config.json").is_file():
            raise ExportError(
                f"Training checkpoint {str(path)!r} is partial: config.json is missing. Checkpoints become visible "
                "only once complete; pick another step (`genesis-hf checkpoints`) or copy this one again."
            )
        from genesis_hf.pretrain.final import checkpoint_source  # here: the CLI's start-up does not load pretraining

        try:
            loaded = checkpoint_source(path)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise ExportError(
                f"Could not load training checkpoint {str(path)!r}: {error}. The DCP shards may be incomplete or from "
                "another model config; pick another step or copy the checkpoint again."
            ) from None
    else:
        _check_model_folder(path)
        loaded = _loaded_model_folder(path)
    if tokenizer_path is not None:
        loaded.tokenizer = _load_tokenizer(Path(tokenizer_path))
    elif loaded.tokenizer is None:
        tokenizer_dir = _find_tokenizer_dir(path)
        if tokenizer_dir is None:
            raise ExportError(
                f"No tokenizer in {str(path)!r} (no tokenizer.json, tokenizer_config.json or tokenizer/ folder). "
                "Pass --tokenizer with the folder of the tokenizer the model was trained with."
            )
        loaded.tokenizer = _load_tokenizer(tokenizer_dir)
    check_tokenizer_fits(loaded.model.config, loaded.tokenizer, source=str(tokenizer_path or path))
    return loaded


def _loaded_model_folder(path: Path) -> LoadedCheckpoint:
    """A model folder (no tokenizer yet), with the step, tokens and loss its metadata or trainer state records."""
    state = {}
    for name in (TRAINER_STATE_FILE, CHECKPOINT_METADATA_FILE):  # genesis_hf's own metadata wins
        if (path / name).is_file():
            state.update(json.loads((path / name).read_text()))
    return LoadedCheckpoint.from_folder(_load_model_folder(path), None, path, "hf", state)


def check_tokenizer_fits(config, tokenizer, source: str = "the tokenizer") -> None:
    """Raise `ExportError` when the tokenizer can produce ids the model has no embedding row for.

    Args:
        config: the model config (`vocab_size`).
        tokenizer: the tokenizer to publish with the model.
        source: where the tokenizer comes from, for the message.
    """
    vocab_size = config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ExportError(
            f"The tokenizer from {source!r} has {len(tokenizer)} tokens but the model has vocab_size={vocab_size} "
            f"embedding rows: ids {vocab_size}..{len(tokenizer) - 1} would index past the embedding. This tokenizer "
            "belongs to another model; pass --tokenizer with the tokenizer the checkpoint was trained with (a training "
            "checkpoint keeps it in its tokenizer/ folder)."
        )
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None and token_id >= vocab_size:
            raise ExportError(
                f"The tokenizer from {source!r} has {name}={token_id}, outside the model's vocab_size={vocab_size}. "
                "Pass --tokenizer with the tokenizer the checkpoint was trained with."
            )


def export_checkpoint(
    checkpoint: str | Path | LoadedCheckpoint,
    out_dir: str | Path,
    *,
    export_format: str = "hf",
    dtype: str = "bf16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer_path: str | Path | None = None,
    step: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    lineage: dict | None = None,
    **folder_options,
) -> ExportResult:
    """Load a checkpoint and write it with `genesis_hf.model.folder.write_model_folder` (verified, with a card).

    Bad settings and an `out_dir` that may not be written are refused before the checkpoint is loaded.

    Args:
        checkpoint: a training checkpoint directory, a model folder, or an already `LoadedCheckpoint`.
        out_dir: the folder to create.
        export_format: `hf`, `llama` or `gguf`.
        dtype: `bf16`, `fp32` or `fp16`.
        max_shard_size: safetensors shard size for `hf` and `llama`.
        tokenizer_path: publish this tokenizer instead of the checkpoint's.
        step: the training step, when the caller knows it better than the checkpoint's own metadata.
        overwrite: replace an existing non-empty `out_dir`, if it is an earlier export.
        log: called with progress lines.
        lineage: what made the model (`genesis_hf.model.lineage`), when the checkpoint does not record it itself.
        folder_options: `tolerance`, `repo_id`, `revision`, `eval_results_path`, `verify`, `redact`, `extra_files`
            of `write_model_folder`.

    Raises:
        ExportError: bad input (see `load_checkpoint`), or `out_dir` may not be written or replaced.
        ExportMismatchError: the verification failed.
    """
    log = log or (lambda message: None)
    check_export_settings(export_format, dtype, max_shard_size)
    source = checkpoint.path if isinstance(checkpoint, LoadedCheckpoint) else Path(checkpoint)
    check_output_folder(Path(out_dir), source, overwrite)
    with MODEL_LOADING_LOCK:  # not while another thread is inside from_pretrained (see the lock)
        loaded = (
            checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, tokenizer_path)
        )
    if step is not None:
        loaded.step = step
    loaded.lineage = loaded.lineage or lineage
    log(f"Loaded {loaded.kind} checkpoint {loaded.path} (step {loaded.step}).")
    return write_model_folder(
        loaded,
        out_dir,
        export_format=export_format,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        log=log,
        **folder_options,
    )


def _run_export(args: argparse.Namespace) -> int:
    from genesis_hf.writer_lock import FolderInUseError, hold_folder

    try:
        check_export_settings(args.format, args.dtype, args.max_shard_size)
        check_output_folder(Path(args.out), Path(args.checkpoint), args.overwrite)
        # One writer per folder: a second export into OUT is refused while this one runs (and checked again under it).
        with hold_folder(args.out, flag="OUT"):
            result = export_checkpoint(
                args.checkpoint,
                args.out,
                export_format=args.format,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                tolerance=args.tolerance,
                tokenizer_path=args.tokenizer,
                repo_id=args.repo_id,
                eval_results_path=args.eval_results,
                overwrite=args.overwrite,
                log=print,
            )
    except ExportMismatchError as error:
        print(f"genesis-hf export: verification failed: {error}", file=sys.stderr)
        return 1
    except (ExportError, FolderInUseError) as error:
        print(f"genesis-hf export: error: {error}", file=sys.stderr)
        return 2
    verification = result.verification
    print(f"max_abs_logit_diff={verification.max_abs_diff:.3e} tolerance={verification.tolerance:.1e} OK")
    print(f"Wrote {result.export_format} ({result.dtype}) export to {result.out_dir}: {', '.join(result.files)}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf export` to the top-level `subparsers`."""
    help = "Export a checkpoint (hf, llama or gguf) and verify it reloads with the same logits."
    parser = add_command(subparsers, "export", help=help, description=__doc__, func=_run_export)
    parser.add_argument("checkpoint", help="Training checkpoint directory or Hugging Face model folder.")
    parser.add_argument("out", help="Output folder (created; must not exist or be empty unless --overwrite).")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="hf", help="Export format (default: hf).")
    parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default="bf16", help="Weight dtype (default: bf16).")
    parser.add_argument(
        "--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE, help="Safetensors shard size, e.g. 2GB (hf, llama)."
    )
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="Largest acceptable |logit difference|."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder to publish instead of the checkpoint's.")
    parser.add_argument("--repo_id", default=None, help="Repo id used in the model card's usage snippet.")
    parser.add_argument("--eval_results", default=None, help="lm-evaluation-harness results JSON for the card.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace OUT if it holds an earlier export (and nothing else)."
    )


__all__ = [
    "ExportError",
    "ExportMismatchError",
    "check_tokenizer_fits",
    "export_checkpoint",
    "load_checkpoint",
    "register_cli",
]
