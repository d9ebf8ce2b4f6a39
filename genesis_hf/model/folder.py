"""The one writer of Hugging Face model folders: weights, config, remote code, tokenizer, generation config, model
card, and the proof that the folder reproduces the model it was written from.

`write_model_folder(source, out_dir, export_format=...)` writes one of three formats:

- `hf`: Genesis safetensors (sharded above `max_shard_size`), `config.json` with `auto_map` and `architectures:
  ["LlamaForCausalLM"]` (the name serving engines resolve), the configuration and modeling files for
  `trust_remote_code=True`, `generation_config.json` (stop ids from `genesis_hf.layout.eos_token_ids`: a chat model
  stops on `<|im_end|>` and `<|endoftext|>`), the tokenizer with its chat template, `genesis_checkpoint.json` (step,
  tokens seen, loss) and a model card.
- `llama`: the same as a plain `LlamaForCausalLM` folder (`genesis_hf.model.convert.to_llama`), no remote code: ready for
  vLLM, TGI and llama.cpp's converter.
- `gguf`: one llama-architecture GGUF file with the byte-level BPE tokenizer in its metadata (`tokenizer.ggml.model =
  "gpt2"`), plus card and `genesis_checkpoint.json`. Query and key projections are stored permuted the way llama.cpp's
  `convert_hf_to_gguf.py` stores them (its rotary kernel pairs adjacent dimensions; HF pairs the two halves), and
  transformers' GGUF loader permutes them back. 2D weights are F32, BF16 or F16; norms stay F32 as llama.cpp keeps them.

Every folder is reloaded the way users will load it (an hf folder both through its `auto_map` remote code and as the
`LlamaForCausalLM` its `architectures` names, a llama folder as `LlamaForCausalLM`, GGUF with transformers' GGUF
loader) and its logits on fixed prompts are compared in fp32 with the source model's, whose weights are rounded to the
exported dtype first so that only real mismatches count. The tokenizer is reloaded too and must encode the prompts to
the same ids. Above the tolerance the write fails and nothing is left at the destination. This is the check the seed
project lacked: its published evaluations sat at chance level because the evaluated export did not match the trained
model.

Nothing of the user's is ever deleted. The destination must not be, contain or lie inside a training checkpoint or a
run folder's `checkpoints/`, nor overlap the source. An existing non-empty destination is replaced only with
`overwrite`, and only when it is an earlier export: it holds the marker `.genesis_export.json` (written last, listing
every file of the export with its size) and nothing else, unchanged.

Users: pretraining's `final/` (`genesis_hf.pretrain.final`), post-training's `final/` (`genesis_hf.posttrain.outputs`),
evaluation of training checkpoints (`genesis_hf.evaluate.harness`), `genesis-hf export` and the Hub pusher
(`genesis_hf.publish`). This module imports only the model stage and `genesis_hf.layout`.
"""

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import genesis_hf
from genesis_hf.layout import (
    CHATML_TEMPLATE,
    CHECKPOINT_METADATA_FILE,
    CHECKPOINTS_DIR,
    EVAL_RESULTS_FILE,
    EXPORT_MARKER_FILE,
    IM_END,
    IM_START,
    METRICS_FILE,
    REMOTE_CODE_FILES,
    RUN_CONFIG_FILE,
    STEP_ANY,
    eos_token_ids,
    holds_training_state,
    is_run_folder,
)

from . import card as model_card
from .convert import to_llama
from .lineage import hub_id_of, is_hub_repo_id, model_name_of
from .modeling_genesis import GenesisForCausalLM

EXPORT_FORMATS = ("hf", "llama", "gguf")
EXPORT_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_TOLERANCE = 1e-4
DEFAULT_MAX_SHARD_SIZE = "2GB"
EXPORT_MARKER_KIND = "genesis-hf export"
GGUF_BASENAME = "genesis"
# Prose, code, digits and ChatML: each exercises a different part of the tokenizer and the model.
VERIFY_PROMPTS = (
    "The history of science is the study of how people came to understand the natural world.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
)
MAX_VERIFY_TOKENS = 48
# Held while genesis_hf loads models to export or verify them. transformers' `from_pretrained` swaps process-wide
# functions while it loads (`torch.nn.init.*` and `PreTrainedModel.tie_weights` become no-ops, see
# `transformers.initialization.no_init_weights`/`no_tie_weights`) and puts back what it found: two threads loading at
# once (the Hub pusher's export of a checkpoint and the run's final export) can leave them no-ops, and a tied model then
# loads with an uninitialised head.
MODEL_LOADING_LOCK = threading.RLock()
# The class name `config.json` gives under `architectures` (a Genesis model is Llama's classes): the name serving
# engines resolve, since they ignore auto_map.
SERVING_ARCHITECTURE = "LlamaForCausalLM"


class ExportError(ValueError):
    """The checkpoint or the arguments cannot be exported; the message names the value and the fix."""


class ExportMismatchError(ExportError):
    """The reloaded export does not reproduce the source model (logits or tokenization)."""


@dataclasses.dataclass
class LoadedCheckpoint:
    """A model ready to export (fp32, eval mode), with what is known about the run it comes from."""

    model: GenesisForCausalLM
    tokenizer: object
    path: Path
    # "training" (DCP checkpoint), "hf" (model folder) or "memory" (a model just trained in this process; `path` then
    # only says where its run's files are, for the card)
    kind: str
    step: int | None = None
    tokens_seen: int | None = None
    loss: float | None = None
    trainer_state: dict | None = None
    run_config: dict | None = None
    # What made the model (`genesis_hf.model.lineage`): recorded by the recipes, carried into every export's metadata.
    lineage: dict | None = None

    @classmethod
    def from_folder(cls, model, tokenizer, path: Path, kind: str, state: dict, **fields) -> "LoadedCheckpoint":
        """A model loaded from `path`, with the step, tokens and loss its recorded `state` (a trainer state or
        `genesis_checkpoint.json`) says and the run config saved next to it (a pretraining checkpoint's lineage is in
        its run config, an exported folder's in its metadata)."""
        run_config = read_yaml_mapping(path / RUN_CONFIG_FILE)
        return cls(
            model=model,
            tokenizer=tokenizer,
            path=path,
            kind=kind,
            step=state.get("step"),
            tokens_seen=state.get("tokens_seen"),
            loss=state.get("loss"),
            run_config=run_config,
            # A pretraining checkpoint (DCP shards) of a run that recorded no lineage was still trained from scratch.
            lineage=state.get("lineage")
            or (run_config or {}).get("lineage")
            or ({"stage": "pretraining"} if kind == "training" else None),
            **fields,
        )


@dataclasses.dataclass
class VerificationResult:
    max_abs_diff: float
    max_abs_diff_vs_fp32: float
    tolerance: float
    num_prompts: int
    num_tokens: int
    # Greedy generation with the KV cache against one uncached forward pass over the generated text, on the reload.
    max_abs_diff_cached: float = 0.0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.max_abs_diff_cached <= self.tolerance

    def describe(self, export_format: str, dtype: str) -> str:
        return (
            f"Verified {export_format} ({dtype}) export: max |logit difference| = {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.3g}; {self.max_abs_diff_vs_fp32:.3g} vs the fp32 weights, the rounding to "
            "the export dtype)."
        )


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    export_format: str
    dtype: str
    files: list[str]
    verification: VerificationResult | None
    gguf_file: str | None = None


def read_yaml_mapping(path: Path) -> dict | None:
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    return values if isinstance(values, dict) else None


def _parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"Unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}.")
    return EXPORT_DTYPES[dtype]


def generation_config_for(config, tokenizer) -> GenerationConfig:
    eos = eos_token_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else config.eos_token_id),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id,
    )


def _tokenizer_for_export(tokenizer):
    """A copy with the ChatML template installed when the tokenizer has the ChatML tokens but no template."""
    tokenizer = copy.deepcopy(tokenizer)
    vocab = tokenizer.get_vocab()
    if not getattr(tokenizer, "chat_template", None) and IM_START in vocab and IM_END in vocab:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _parse_shard_size(max_shard_size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = 0
    if size <= 0:
        raise ExportError(
            f"--max_shard_size {max_shard_size!r} is not a size; write a positive number with a unit, e.g. 2GB, 500MB."
        )
    return size


def _write_hf(model: GenesisForCausalLM, tokenizer, out_dir: Path, dtype: torch.dtype, max_shard_size) -> None:
    export_model = copy.deepcopy(model).to(dtype)
    export_model.generation_config = generation_config_for(model.config, tokenizer)
    export_model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    # save_pretrained copies the modeling files because genesis_hf registers the classes for auto_map; check it, since
    # without them the folder only loads where genesis_hf is installed.
    package_dir = Path(__file__).parent
    config = json.loads((out_dir / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    for name in REMOTE_CODE_FILES:
        if not (out_dir / name).is_file():
            shutil.copy2(package_dir / name, out_dir / name)
    if "AutoModelForCausalLM" not in auto_map:
        config["auto_map"] = {
            **auto_map,
            "AutoConfig": "configuration_genesis.GenesisConfig",
            "AutoModelForCausalLM": "modeling_genesis.GenesisForCausalLM",
        }
    # `transformers serve` and vLLM look the model class up by this name (`getattr(transformers, name)`, vLLM's own
    # registry) and ignore auto_map; a Genesis model is Llama's classes, so Llama's name loads it in both (checked by
    # `verify_export`). The Auto classes keep resolving `model_type: genesis` through auto_map.
    config["architectures"] = [SERVING_ARCHITECTURE]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _tokenizer_for_export(tokenizer).save_pretrained(out_dir)


def _write_llama(model: GenesisForCausalLM, tokenizer, out_dir: Path, dtype: torch.dtype, max_shard_size) -> None:
    llama = to_llama(model).to(dtype)
    llama.generation_config = generation_config_for(model.config, tokenizer)
    llama.save_pretrained(out_dir, max_shard_size=max_shard_size)
    _tokenizer_for_export(tokenizer).save_pretrained(out_dir)


def gguf_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's interleaved one, per head (`convert_hf_to_gguf.py`'s `permute`).

    Rows of a q/k projection are `(heads, head_dim)`; HF rotates dimension `i` with `i + head_dim/2`, llama.cpp with
    `i + 1`. Reordering each head's rows as `(2, head_dim/2) -> (head_dim/2, 2)` makes the two agree; transformers'
    GGUF loader applies the inverse when it reads the file.

    Args:
        weights: `(num_heads * head_dim, in_features)` weight or `(num_heads * head_dim,)` bias.
        num_heads: query heads for q_proj, key/value heads for k_proj.
    """
    rest = weights.shape[1:]
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *rest).swapaxes(1, 2).reshape(weights.shape)
    )


def _gguf_tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Tokens, token types and merges of a byte-level BPE tokenizer, padded to `vocab_size` like llama.cpp pads."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend.get("model", {}).get("type") != "BPE":
        raise ExportError(
            f"GGUF export supports byte-level BPE tokenizers (genesis_hf.tokenizer); this one is "
            f"{backend.get('model', {}).get('type')!r}. Export with --format hf or llama instead."
        )
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in backend["model"]["merges"]]
    added = {token["id"]: token for token in backend.get("added_tokens", [])}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    token_types = []
    for index in range(len(tokens)):
        if index in added:
            kind = gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        token_types.append(kind)
    # Embedding rows past the tokenizer (a vocab padded for speed) get placeholder tokens that never occur.
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        token_types.append(gguf.TokenType.UNUSED)
    return {"tokens": tokens, "token_types": token_types, "merges": merges}


def _write_gguf(model: GenesisForCausalLM, tokenizer, out_dir: Path, dtype_name: str, permute: bool = True) -> str:
    import gguf
    from gguf import GGMLQuantizationType, LlamaFileType

    config = model.config
    file_types = {
        "fp32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32, "F32"),
        "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, "BF16"),
        "fp16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, "F16"),
    }
    tensor_type, file_type, suffix = file_types[dtype_name]
    file_name = f"{GGUF_BASENAME}-{suffix}.gguf"
    head_dim = config.head_dim
    writer = gguf.GGUFWriter(out_dir / file_name, "llama")
    writer.add_name(GGUF_BASENAME)
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)

    vocabulary = _gguf_tokenizer_metadata(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    # llama.cpp's "smollm" pre-tokenizer is exactly genesis_hf's: single digits, then GPT-2's byte-level split.
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["token_types"])
    writer.add_token_merges(vocabulary["merges"])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is not None:
        writer.add_eot_token_id(im_end)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    export_tokenizer = _tokenizer_for_export(tokenizer)
    if getattr(export_tokenizer, "chat_template", None):
        writer.add_chat_template(export_tokenizer.chat_template)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp ties the output to token_embd when output.weight is absent
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"No GGUF tensor name for {name!r}; the model has a tensor llama.cpp does not know.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = gguf_permute(data, config.num_attention_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = gguf_permute(data, config.num_key_value_heads)
        if data.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif tensor_type == GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            packed = gguf.quants.quantize(np.ascontiguousarray(data), GGMLQuantizationType.BF16)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file_name


def verify_prompt_ids(tokenizer, max_tokens: int = MAX_VERIFY_TOKENS) -> list[list[int]]:
    """Token ids of `VERIFY_PROMPTS` under `tokenizer` (no special tokens added), at most `max_tokens` each."""
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_tokens] for prompt in VERIFY_PROMPTS]


def _rounded_reference(model: torch.nn.Module, export_format: str, dtype: torch.dtype) -> torch.nn.Module:
    """The source model in fp32 with each weight rounded the way the export stores it."""
    reference = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            if export_format == "gguf" and parameter.ndim == 1:
                continue  # GGUF keeps norms in F32
            parameter.copy_(parameter.to(dtype).float())
    return reference


@torch.no_grad()
def _logits(model: torch.nn.Module, prompt_ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(torch.tensor([ids])).logits[0].float() for ids in prompt_ids if ids]


@torch.no_grad()
def cached_generation_difference(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int = 8) -> float:
    """Max |logit difference| between greedy `generate()` with the KV cache and an uncached forward pass.

    One forward pass compares the weights; this compares the cache path too, which transformers drives through an
    interface that has changed between releases (5.24 passes the cache as `cache=`): a model that ignores the cache
    loses its context from the second new token on, with the first token and every single-pass check still right.
    """
    prompt = torch.tensor([prompt_ids])
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    # (new_tokens, vocab): the logits that chose each new token, with and without the cache.
    cached = torch.cat(output.logits).float()
    uncached = model(output.sequences, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    return (cached - uncached).abs().max().item()


def _reload_tokenizer(out_dir: Path, gguf_file: str | None):
    return (
        AutoTokenizer.from_pretrained(out_dir, gguf_file=gguf_file)
        if gguf_file
        else AutoTokenizer.from_pretrained(out_dir)
    )


def _reloaders(out_dir: Path, export_format: str, gguf_file: str | None) -> list[tuple[str, Callable]]:
    """Each way users load the export, as `(how, load)`; `load()` returns the model in fp32 (one copy at a time)."""
    config = {} if export_format == "gguf" else json.loads((out_dir / "config.json").read_text())
    if export_format == "hf":
        # The class named by the folder's auto_map, imported from the folder's own files: in this process genesis_hf
        # is registered for `model_type: genesis`, and AutoModelForCausalLM would pick the installed class instead of
        # the remote code that users without genesis_hf run.
        auto_map = config.get("auto_map") or {}
        if "AutoModelForCausalLM" not in auto_map:
            raise ExportMismatchError(f"{out_dir / 'config.json'} has no auto_map for AutoModelForCausalLM.")
        remote_class = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], out_dir)

        def load_by_architecture():
            # `transformers serve` and vLLM: the class named by `architectures`, with the folder's config.
            architectures = config.get("architectures") or [None]
            if architectures[0] != SERVING_ARCHITECTURE:
                raise ExportMismatchError(
                    f"{out_dir / 'config.json'} names architectures {architectures}: `transformers serve` and vLLM, "
                    f"which load that class by name, cannot load it. Re-export it to name [{SERVING_ARCHITECTURE!r}]."
                )
            return LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)

        return [
            ("through its auto_map", lambda: remote_class.from_pretrained(out_dir, dtype=torch.float32)),
            (f"as {SERVING_ARCHITECTURE}", load_by_architecture),
        ]
    if export_format == "llama":
        if config.get("auto_map") or config.get("model_type") != "llama":
            raise ExportMismatchError(
                f"{out_dir / 'config.json'} is not a plain Llama config (auto_map or model_type)."
            )
        return [("llama", lambda: LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32))]
    return [("gguf", lambda: AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=gguf_file, dtype=torch.float32))]


def verify_export(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | Path,
    *,
    export_format: str,
    dtype: str,
    tolerance: float = DEFAULT_TOLERANCE,
    gguf_file: str | None = None,
) -> VerificationResult:
    """Reload an export and compare its logits (fp32) and tokenization with the source model's.

    Args:
        model: the source model.
        tokenizer: the source tokenizer.
        out_dir: the export folder.
        export_format: `hf`, `llama` or `gguf`.
        dtype: the exported dtype; the source weights are rounded to it before comparing.
        tolerance: the largest acceptable absolute logit difference.
        gguf_file: the GGUF file name inside `out_dir`.

    Raises:
        ExportMismatchError: the logits differ by more than `tolerance`, or the reloaded tokenizer encodes the prompts
            differently.
    """
    out_dir = Path(out_dir)
    prompt_ids = verify_prompt_ids(tokenizer)
    # One extra copy of the model at a time (the rounded reference, then the reloaded export), not two at once.
    fp32_logits = _logits(model.float().eval(), prompt_ids)
    export_dtype = _parse_dtype(dtype)
    if export_dtype == torch.float32:
        expected_logits = fp32_logits
    else:
        reference = _rounded_reference(model, export_format, export_dtype)
        expected_logits = _logits(reference, prompt_ids)
        del reference
    reloaded_ids = verify_prompt_ids(_reload_tokenizer(out_dir, gguf_file))
    for prompt, expected, got in zip(VERIFY_PROMPTS, prompt_ids, reloaded_ids):
        if expected != got:
            raise ExportMismatchError(
                f"The {export_format} export's tokenizer encodes {prompt!r} as {got[:12]}... but the source tokenizer "
                f"gives {expected[:12]}...: a model evaluated with this tokenizer would see other tokens than it was "
                "trained on."
            )
    max_diff = max_diff_fp32 = cached_diff = 0.0
    for how, load in _reloaders(out_dir, export_format, gguf_file):
        reloaded = load().eval()
        got_logits = _logits(reloaded, prompt_ids)
        cached = cached_generation_difference(reloaded, next(ids for ids in prompt_ids if ids))
        del reloaded
        diff = max((a - b).abs().max().item() for a, b in zip(expected_logits, got_logits))
        if cached > tolerance:
            raise ExportMismatchError(
                f"The {export_format} export, loaded {how}, generates differently with its KV cache than without: "
                f"max |logit difference| = {cached:.3g} > tolerance {tolerance:.3g} over 8 greedy tokens. Its modeling "
                "code does not use the cache transformers passes (re-export with this version of genesis-hf to "
                "refresh it)."
            )
        if diff > tolerance:
            raise ExportMismatchError(
                f"The {export_format} export, loaded {how}, does not reproduce the source model: max |logit "
                f"difference| = {diff:.3g} > tolerance {tolerance:.3g} on {len(got_logits)} fixed prompts. Do not "
                "publish it; this is the weight-layout/RoPE/tokenizer mismatch class of bug that puts evaluations at "
                "chance level."
            )
        cached_diff, max_diff = max(cached_diff, cached), max(max_diff, diff)
        max_diff_fp32 = max([max_diff_fp32] + [(a - b).abs().max().item() for a, b in zip(fp32_logits, got_logits)])
    result = VerificationResult(
        max_abs_diff=max_diff,
        max_abs_diff_vs_fp32=max_diff_fp32,
        tolerance=tolerance,
        num_prompts=len(got_logits),
        num_tokens=sum(len(ids) for ids in prompt_ids),
        max_abs_diff_cached=cached_diff,
    )
    return result


def _folder_kind(path: Path) -> str | None:
    if holds_training_state(path):
        return "a checkpoint"
    if is_run_folder(path):
        return "a run folder"
    return None


def _files_under(folder: Path) -> list[str]:
    """Every file, symlink and empty folder under `folder`, as POSIX paths relative to it (links are not followed)."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        base = Path(directory)
        for name in files + [name for name in subdirectories if (base / name).is_symlink()]:
            found.append((base / name).relative_to(folder).as_posix())
        if not subdirectories and not files and base != folder:
            found.append(base.relative_to(folder).as_posix() + "/")
    return sorted(found)


def _foreign_files(out_dir: Path) -> list[str]:
    """What in an existing `out_dir` an earlier export did not write (all of it when there is no marker)."""
    present = _files_under(out_dir)
    try:
        marker = json.loads((out_dir / EXPORT_MARKER_FILE).read_text())
        listed = marker["files"] if marker.get("kind") == EXPORT_MARKER_KIND else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        return present
    foreign = []
    for name in present:
        if name == EXPORT_MARKER_FILE:
            continue
        path = out_dir / name
        if name not in listed or path.is_symlink() or not path.is_file() or not _unchanged(path, listed[name]):
            foreign.append(name)
    return foreign


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def _unchanged(path: Path, recorded: Any) -> bool:
    """Whether `path` is what the export recorded: size and SHA-256 (markers before 0.x recorded the size only)."""
    if isinstance(recorded, int):
        return path.stat().st_size == recorded
    if not isinstance(recorded, dict):
        return False
    return path.stat().st_size == recorded.get("size") and _sha256(path) == recorded.get("sha256")


def check_output_folder(out_dir: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse an OUT whose replacement could destroy anything the export did not write (before any loading).

    Args:
        out_dir: the folder to create or replace.
        source: the checkpoint being exported.
        overwrite: `--overwrite`: replace an earlier export at `out_dir`.

    Raises:
        ExportError: naming OUT, what it is or holds, and the fix.
    """
    out = out_dir.expanduser().resolve()
    src = source.expanduser().resolve() if source is not None else None
    fix = "Choose a new OUT folder (e.g. exports/NAME) for the export."
    if src is not None and (out == src or out.is_relative_to(src) or src.is_relative_to(out)):
        raise ExportError(f"OUT {str(out_dir)!r} overlaps the checkpoint being exported ({str(source)!r}). {fix}")
    # Inside a run folder is fine (the Hub pusher exports to <run>/exports/); inside a checkpoint is not.
    for parent in out.parents:
        in_checkpoints = parent.name == CHECKPOINTS_DIR and any(
            STEP_ANY.match(child.name) for child in parent.iterdir()
        )
        if holds_training_state(parent) or in_checkpoints:
            kind = "a run's checkpoints folder" if in_checkpoints else "a checkpoint"
            raise ExportError(
                f"OUT {str(out_dir)!r} lies inside {kind} ({parent}); rotation and resume would trip over it. {fix}"
            )
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        what = "a symlink" if out_dir.is_symlink() else "a file"
        raise ExportError(f"OUT {str(out_dir)!r} is {what}; export writes and replaces only folders it created. {fix}")
    if _folder_kind(out_dir):
        raise ExportError(
            f"OUT {str(out_dir)!r} is {_folder_kind(out_dir)}; export never replaces training output. {fix}"
        )
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"Output {str(out_dir)!r} already exists and is not empty; pass --overwrite or a new path.")
    for directory, _, _ in os.walk(out_dir):  # only with --overwrite: a big folder is not walked for nothing
        kind = _folder_kind(Path(directory))
        if kind:
            raise ExportError(
                f"OUT {str(out_dir)!r} contains {kind} ({directory}); export never replaces training output. {fix}"
            )
    foreign = _foreign_files(out_dir)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ExportError(
            f"--overwrite replaces only an earlier export, and {str(out_dir)!r} holds files that no export wrote or "
            f"that changed since ({shown}). Move them elsewhere, or choose a new OUT folder."
        )


def write_export_marker(folder: Path) -> None:
    """Record every file of a finished export with its size and SHA-256 in `.genesis_export.json`, the proof
    `--overwrite` needs that nothing in the folder changed since (an edit of the same size included)."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in _files_under(folder)
        if (folder / name).is_file()
    }
    marker = {"kind": EXPORT_MARKER_KIND, "genesis_hf_version": genesis_hf.__version__, "files": files}
    (folder / EXPORT_MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")


def write_checkpoint_metadata(
    out_dir: Path, loaded: LoadedCheckpoint, export_format: str, dtype: str, repo_id: str | None = None
) -> None:
    """`genesis_checkpoint.json`: step, tokens, loss, format, the source's name, its lineage and the Hub repo the
    folder is written for (`hub_id`, when `repo_id` is a full `namespace/name`)."""
    metadata = {
        "step": loaded.step,
        "tokens_seen": loaded.tokens_seen,
        "loss": loaded.loss,
        "format": export_format,
        "dtype": dtype,
        "source": loaded.path.name,
        "genesis_hf_version": genesis_hf.__version__,
        "lineage": loaded.lineage,
        "hub_id": repo_id if is_hub_repo_id(repo_id) else None,
    }
    (out_dir / CHECKPOINT_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def _data_mixture(loaded: LoadedCheckpoint) -> dict | None:
    for source in (loaded.run_config or {}, loaded.trainer_state or {}):
        for key in ("mixture", "data_mixture", "dataset_mixture", "tokens_per_source"):
            value = source.get(key)
            if isinstance(value, dict) and value:
                return value
        loader_state = source.get("data_loader") or source.get("data_loader_state") or {}
        if isinstance(loader_state, dict) and isinstance(loader_state.get("tokens_per_source"), dict):
            return loader_state["tokens_per_source"]
    return None


def _replace_folder(out_dir: Path, staging: Path, overwrite: bool) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` is checked again (it may have changed during the export)
    and moved aside before it is deleted, so a crash leaves one complete folder, never a half-deleted one."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(staging, out_dir)
        return
    check_output_folder(out_dir, staging, overwrite)
    trash = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}-replaced-", dir=out_dir.parent))
    os.rename(out_dir, trash / out_dir.name)
    os.rename(staging, out_dir)
    shutil.rmtree(trash)


# ---------------------------------------------------------------------------------------------------------------------
# The whole folder


def _write_card(staging: Path, source: LoadedCheckpoint, out_dir: Path, settings: dict, verification) -> None:
    """The model card, from the run's files next to the source (metrics, run config, evaluation results)."""
    run_files = model_card.find_run_files(source.path)
    eval_results_path = settings.get("eval_results_path")
    eval_path = Path(eval_results_path) if eval_results_path else run_files.get(EVAL_RESULTS_FILE)
    eval_results = model_card.read_eval_results(eval_path) if eval_path else None
    if source.run_config is None and RUN_CONFIG_FILE in run_files:
        source.run_config = read_yaml_mapping(run_files[RUN_CONFIG_FILE])
    model_name = None  # the repo's name when it is given, else the source model's: not the OUT folder's ("gguf")
    if not settings.get("repo_id"):
        model_name = (source.lineage or {}).get("model_name") or model_name_of(source.path)
        model_name += "-GGUF" if settings["export_format"] == "gguf" else ""
    model_card.write_model_card(
        staging,
        source.model.config,
        metrics_path=run_files.get(METRICS_FILE),
        repo_id=settings.get("repo_id") or out_dir.name,
        model_name=model_name,
        export_format=settings["export_format"],
        dtype=settings["dtype"],
        revision=settings.get("revision"),
        gguf_file=settings.get("gguf_file"),
        step=source.step,
        tokens_seen=source.tokens_seen,
        loss=source.loss,
        run_config=source.run_config,
        data_mixture=_data_mixture(source),
        eval_results=eval_results,
        verification=dataclasses.asdict(verification) if verification else None,
        lineage=source.lineage,
        source=str(source.path) if source.kind != "memory" else None,
        source_hub_id=hub_id_of(source.path) if source.kind != "memory" else None,
        redact=settings.get("redact", ()),
    )


def check_export_settings(export_format: str, dtype: str, max_shard_size: str | int) -> None:
    """Raise `ExportError` for an unknown format or dtype or a bad shard size (before anything is loaded)."""
    if export_format not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {export_format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    _parse_dtype(dtype)
    if export_format != "gguf":
        _parse_shard_size(max_shard_size)


def write_model_folder(
    source: LoadedCheckpoint,
    out_dir: str | Path,
    *,
    export_format: str = "hf",
    dtype: str = "bf16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tolerance: float = DEFAULT_TOLERANCE,
    repo_id: str | None = None,
    revision: str | None = None,
    eval_results_path: str | Path | None = None,
    overwrite: bool = False,
    verify: bool = True,
    redact: Iterable[str] = (),
    extra_files: dict[str, dict] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write `source` to `out_dir` in one format, verify it, and write the model card.

    The folder is written to a sibling staging folder and renamed to `out_dir` only once verified, so `out_dir` never
    holds a partial or mismatching export.

    Args:
        source: the model, its tokenizer and what is known of its run (`LoadedCheckpoint`).
        out_dir: the folder to create.
        export_format: `hf`, `llama` or `gguf`.
        dtype: `bf16`, `fp32` or `fp16`.
        max_shard_size: safetensors shard size (`"2GB"`, `"50MB"`, or bytes) for `hf` and `llama`.
        tolerance: the largest acceptable absolute logit difference after reloading.
        repo_id: where the folder will be published (usage snippet of the card).
        revision: the branch it will be published on (usage snippet).
        eval_results_path: evaluation results JSON for the card; found next to the source when `None`.
        overwrite: replace an existing non-empty `out_dir`, if it is an earlier export (`check_output_folder`).
        verify: reload and compare.
        redact: strings (tokens) that must not appear in the card.
        extra_files: more JSON files to write into the folder (`{name: value}`), listed in its marker.
        log: called with progress lines.

    Raises:
        ExportError: bad settings, or `out_dir` may not be written or replaced (`check_output_folder`).
        ExportMismatchError: the verification failed.
    """
    log = log or (lambda message: None)
    check_export_settings(export_format, dtype, max_shard_size)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, source.path if source.kind != "memory" else None, overwrite)
    with MODEL_LOADING_LOCK:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}-partial-", dir=out_dir.parent))
        try:
            gguf_file = _write_format(source, staging, export_format, dtype, max_shard_size)
            write_checkpoint_metadata(staging, source, export_format, dtype, repo_id)
            verification = None
            if verify:
                verification = verify_export(
                    source.model,
                    source.tokenizer,
                    staging,
                    export_format=export_format,
                    dtype=dtype,
                    tolerance=tolerance,
                    gguf_file=gguf_file,
                )
                log(verification.describe(export_format, dtype))
            card = dict(export_format=export_format, dtype=dtype, repo_id=repo_id, revision=revision, redact=redact)
            card.update(gguf_file=gguf_file, eval_results_path=eval_results_path)
            _write_card(staging, source, out_dir, card, verification)
            for name, value in (extra_files or {}).items():
                (staging / name).write_text(json.dumps(value, indent=1) + "\n")
            write_export_marker(staging)
            _replace_folder(out_dir, staging, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    files = sorted(str(path.relative_to(out_dir)) for path in out_dir.rglob("*") if path.is_file())
    return ExportResult(out_dir, export_format, dtype, files, verification, gguf_file)


def _write_format(
    source: LoadedCheckpoint, staging: Path, export_format: str, dtype: str, max_shard_size
) -> str | None:
    """Write the weights, config and tokenizer of one format; returns the GGUF file name for `gguf`."""
    torch_dtype = _parse_dtype(dtype)
    if export_format == "hf":
        _write_hf(source.model, source.tokenizer, staging, torch_dtype, max_shard_size)
    elif export_format == "llama":
        _write_llama(source.model, source.tokenizer, staging, torch_dtype, max_shard_size)
    else:
        return _write_gguf(source.model, source.tokenizer, staging, dtype)
    return None


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DEFAULT_TOLERANCE",
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "MODEL_LOADING_LOCK",
    "ExportError",
    "ExportMismatchError",
    "ExportResult",
    "LoadedCheckpoint",
    "VerificationResult",
    "cached_generation_difference",
    "check_export_settings",
    "check_output_folder",
    "generation_config_for",
    "gguf_permute",
    "verify_export",
    "write_model_folder",
]
