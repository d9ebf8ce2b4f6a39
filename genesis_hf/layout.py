"""Every name genesis_hf gives a file or folder on disk, and the special tokens, in one place (docs/CONTRACTS.md).

A run folder (`--output_dir`) of any stage:

    <run>/
        metrics.jsonl               one JSON object per line: steps, evals, restarts (METRICS_FILE)
        run_settings.json           SFT/DPO: the settings a relaunch must match to resume (RUN_SETTINGS_FILE)
        checkpoints/step-0001200/   pretraining checkpoints (CHECKPOINTS_DIR, `checkpoint_name`)
        checkpoint-1200/            TRL's checkpoints in SFT/DPO runs (TRL_CHECKPOINT)
        final/                      the verified Hugging Face model folder the run ends with (FINAL_DIR)
        adapter/                    the LoRA adapter of a PEFT run (ADAPTER_DIR)
        hub_uploads.json            the Hub pusher's journal (HUB_JOURNAL_FILE), with hub_exports/ and .hub_staging/
        tensorboard/                trackers (TENSORBOARD_DIR)

A pretraining checkpoint holds MODEL_DIR and OPTIMIZER_DIR (DCP shards), TRAINER_STATE_FILE, RNG_STATES_FILE,
RUN_CONFIG_FILE, MODEL_CONFIG_FILE, TOKENIZER_DIR and CHECKSUMS_FILE. A model folder written by genesis_hf
(`genesis_hf.model.folder`) holds the weights, config, remote code, tokenizer, generation config and card, plus
CHECKPOINT_METADATA_FILE (where it came from) and EXPORT_MARKER_FILE (the proof that it may be replaced).

This module imports nothing of genesis_hf: every stage may use it.
"""

import re
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# Run folder

METRICS_FILE = "metrics.jsonl"
RUN_SETTINGS_FILE = "run_settings.json"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVAL_RESULTS_FILE = "eval_results.json"
HUB_JOURNAL_FILE = "hub_uploads.json"
HUB_EXPORTS_DIR = "hub_exports"
HUB_STAGING_DIR = ".hub_staging"

# ---------------------------------------------------------------------------------------------------------------------
# Pretraining checkpoints: <run>/checkpoints/step-XXXXXXX/

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_STATES_FILE = "rng_states.json"
RUN_CONFIG_FILE = "run_config.yaml"
MODEL_CONFIG_FILE = "config.json"
DCP_METADATA_FILE = ".metadata"
CHECKSUMS_FILE = "checksums.json"
STEP_DIR = re.compile(r"^step-(\d{7})$")
# A save in progress (`step-XXXXXXX.tmp-<run id>`) and a deletion in progress (`step-XXXXXXX.deleting-<run id>`).
STEP_TMP_DIR = re.compile(r"^step-\d{7}\.tmp-")
STEP_DELETING_DIR = re.compile(r"^step-\d{7}\.deleting-")
# Any of the three above: what marks a folder as a run's `checkpoints/`.
STEP_ANY = re.compile(r"^step-\d{7}")
# TRL's Trainer names its checkpoints `checkpoint-<global step>` (transformers' PREFIX_CHECKPOINT_DIR).
TRL_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    """`step-0001200`: zero-padded so that names sort like steps."""
    return f"step-{step:07d}"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def step_of(path: str | Path) -> int | None:
    """The step in a checkpoint folder's name (`step-0001200`, `checkpoint-1200`), or `None`."""
    name = Path(path).name
    match = STEP_DIR.match(name) or TRL_CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def holds_training_state(path: str | Path) -> bool:
    """A folder with training state: a pretraining checkpoint (DCP shards) or a TRL `checkpoint-N`."""
    path = Path(path)
    return (path / TRAINER_STATE_FILE).is_file() or (path / MODEL_DIR / DCP_METADATA_FILE).is_file()


def is_pretraining_checkpoint(path: str | Path) -> bool:
    """`trainer_state.json` with DCP shards under `model/`, and no safetensors weights (a TRL `checkpoint-N` has
    those, or a LoRA adapter's)."""
    path = Path(path)
    adapter = path / "adapter_model.safetensors"
    return (
        (path / TRAINER_STATE_FILE).is_file()
        and (path / MODEL_DIR).is_dir()
        and not (has_weights(path) or adapter.is_file())
    )


def is_run_folder(path: str | Path) -> bool:
    """A run's output directory (its checkpoints or its metrics)."""
    path = Path(path)
    return (path / CHECKPOINTS_DIR).is_dir() or (path / METRICS_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Model folders (exports, final/)

CHECKPOINT_METADATA_FILE = "genesis_checkpoint.json"
# In a pretraining run's final/: the checkpoint it was exported from (`{"checkpoint": path}`).
FINAL_POINTER_FILE = "training_checkpoint.json"
EXPORT_MARKER_FILE = ".genesis_export.json"
REMOTE_CODE_FILES = ("configuration_genesis.py", "modeling_genesis.py")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(folder: str | Path) -> bool:
    folder = Path(folder)
    return any((folder / name).is_file() for name in WEIGHT_FILES)


# ---------------------------------------------------------------------------------------------------------------------
# Special tokens

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
# Appended to a base tokenizer for chat, in this order (ids 49152-49155 for Genesis 1B).
CHATML_TOKENS = (IM_START, IM_END, THINK_START, THINK_END)


def eos_token_ids(tokenizer) -> list[int]:
    """Where generation stops: the tokenizer's eos id, then `<|im_end|>` and `<|endoftext|>` when the tokenizer has
    them. A chat model (eos `<|im_end|>`) stops on `[<|im_end|>, <|endoftext|>]`: a turn ends at `<|im_end|>`, and a
    document end is never generated through. A base model stops on `<|endoftext|>` (and `<|im_end|>` if it has it).
    The exported `generation_config.json`, the chat setup and the playground use it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in (IM_END, EOS_TOKEN):
        if vocab.get(token) is not None and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


# The chat template of ChatML tokenizers: assistant turns are wrapped in `{% generation %}` so that TRL's
# `assistant_only_loss` can mask everything else.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
