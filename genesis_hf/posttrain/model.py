"""The glue that turns a starting point into a chat-ready model and tokenizer, and the LoRA defaults.

A starting point is any of:
- a pretraining output folder (`outputs/genesis-tiny`): its `final/`, else its newest complete checkpoint;
- a training checkpoint (`.../checkpoints/step-XXXXXXX`, DCP shards, loaded on CPU without a process group);
- a model folder written by `save_pretrained` or `genesis-hf export` (an earlier SFT run's `final/` too);
- a Hub repo id with `model_revision` (a branch such as `step-0040000`).

`load_starting_point` loads it in fp32 (or the dtype asked for) and `prepare_chat_model` (see `chat`) gives it the
ChatML tokens, template and stop token.
"""

import re
from pathlib import Path

import torch

from genesis_hf.args import ConfigError
from genesis_hf.layout import is_pretraining_checkpoint

from .chat import ChatSetup, prepare_chat_model

DEFAULT_BASE = "outputs/genesis-tiny/final"
PRETRAIN_COMMAND = ".venv/bin/accelerate launch recipes/pretrain.py"
# Every linear projection of a Llama-style block. PEFT's own default for Llama (and Genesis, which
# `modeling_genesis.register_with_peft` gives Llama's entries) is q_proj and v_proj only.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None, None: None}


def _resolve_local(path: Path) -> Path:
    """A pretraining output folder becomes its `final/` or newest checkpoint; other folders stay as they are."""
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if (path / "checkpoints").is_dir():
        from genesis_hf.pretrain.checkpoint import list_checkpoints

        checkpoints = list_checkpoints(path)
        if checkpoints:
            return checkpoints[-1].path
    raise ConfigError(
        f"model_name_or_path {str(path)!r} is a folder but holds no model: no config.json, no final/ and no complete "
        "checkpoint under checkpoints/. Pass a pretraining output folder, a checkpoint, or a save_pretrained folder."
    )


def _missing_message(name: str) -> str:
    if Path(name) == Path(DEFAULT_BASE):
        return (
            f"The starting model {name!r} does not exist yet: it is the output of the main pretraining job. Run "
            f"`{PRETRAIN_COMMAND}` first (a few minutes on a CPU), or pass --model_name_or_path with another "
            "pretraining output, checkpoint, model folder or Hub repo."
        )
    return (
        f"model_name_or_path {name!r} is neither a local folder nor a Hub repo id (namespace/name). Pass a "
        "pretraining output folder, a checkpoint (.../checkpoints/step-XXXXXXX), a model folder or a Hub repo."
    )


def load_starting_point(
    name_or_path: str | None,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
):
    """Load the model and tokenizer to post-train.

    Args:
        name_or_path: a pretraining output folder, training checkpoint, model folder or Hub repo id.
        revision: the Hub revision (branch, tag or commit) of a repo id.
        dtype: `float32`, `bfloat16`, `float16` or `auto`/`None` (fp32 for checkpoints, the saved dtype otherwise).
        attn_implementation: `eager`, `sdpa`, ...

    Raises:
        ConfigError: the path does not exist (with the command that makes the default one) or holds no model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import genesis_hf  # noqa: F401  (registers the Genesis classes with the Auto API)

    name_or_path = name_or_path or DEFAULT_BASE
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}; use one of float32, bfloat16, float16, auto.")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = _resolve_local(path)
        if is_pretraining_checkpoint(path):
            from genesis_hf.pretrain.checkpoint import load_model_from_checkpoint

            model, tokenizer, _ = load_model_from_checkpoint(path, dtype=_DTYPES[dtype] or torch.float32)
            return _with_attention(model, attn_implementation), tokenizer, str(path)
        source, kwargs = str(path), {}
    elif _REPO_ID.match(name_or_path) and not path.exists() and not name_or_path.startswith(("outputs/", "./")):
        source, kwargs = name_or_path, {"revision": revision}
    else:
        raise ConfigError(_missing_message(name_or_path))
    load_kwargs = {"dtype": _DTYPES[dtype] or "auto", "trust_remote_code": True, **kwargs}
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ConfigError(f"Cannot load the starting model {source!r}: {str(error).splitlines()[0]}") from None
    return model, tokenizer, source


def _with_attention(model, attn_implementation: str | None):
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model


def chat_model(name_or_path: str | None, **load_kwargs):
    """`load_starting_point` followed by `prepare_chat_model`: returns `(model, tokenizer, ChatSetup, source)`."""
    model, tokenizer, source = load_starting_point(name_or_path, **load_kwargs)
    setup: ChatSetup = prepare_chat_model(model, tokenizer)
    return model, tokenizer, setup, source


def lora_config(model_args, setup: ChatSetup, *, tied_embeddings: bool = True):
    """A `peft.LoraConfig` from TRL's `ModelConfig` fields, with the Genesis defaults filled in.

    `lora_target_modules` defaults to every linear projection of the blocks. When the chat setup added tokens, the
    embeddings and the head are trained and saved in full (`modules_to_save`): the new rows start at the mean and must
    learn, and with tied embeddings the head is the embedding matrix (kept tied, `ensure_weight_tying`). A base from a
    Hub branch (`model_revision`) is recorded as the adapter's `revision`.

    Args:
        model_args: TRL's `ModelConfig` (`use_peft`, `lora_r`, `lora_alpha`, `lora_target_modules`, ...).
        setup: the chat setup, which says whether tokens were added.
        tied_embeddings: the model's `config.tie_word_embeddings`.
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None:
        return None
    if not model_args.lora_target_modules:
        config.target_modules = set(LORA_TARGET_MODULES)
    if setup.added_tokens and not model_args.lora_modules_to_save:
        config.modules_to_save = ["embed_tokens", "lm_head"]
    # Trained copies of tied embeddings would drift apart, and a saved tied model keeps only one of them: the merged
    # model would not reproduce base + adapter. PEFT keeps the copies tied.
    config.ensure_weight_tying = tied_embeddings
    # The base's Hub branch (`--model_revision step-0040000`): stock PEFT loads the base named in the adapter at this
    # revision, else at main.
    if model_args.model_revision not in (None, "main"):
        config.revision = model_args.model_revision
    return config


def merge_lora(peft_model):
    """The base model with the adapter's weights added in, in eval mode (a new plain model; `peft_model` stays usable).

    `peft_model` is put in eval mode first: a copy taken in train mode keeps LoRA's dropout active after merging.
    """
    import copy

    peft_model.eval()
    return copy.deepcopy(peft_model).merge_and_unload().eval()


__all__ = [
    "DEFAULT_BASE",
    "LORA_TARGET_MODULES",
    "PRETRAIN_COMMAND",
    "chat_model",
    "load_starting_point",
    "lora_config",
    "merge_lora",
]
