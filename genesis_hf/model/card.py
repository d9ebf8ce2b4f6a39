"""Model cards for exported checkpoints: architecture, training run, data mixture, loss curve, evaluations, usage.

The card is a `huggingface_hub.ModelCard`: YAML metadata (license, library, tags, and `model-index` built from
`EvalResult`s when evaluation results exist) followed by markdown. The loss curve is a PNG drawn with Pillow from the
run's `metrics.jsonl`, so no plotting library is needed. The usage snippet in the card is tested: it is extracted,
pointed at the exported folder, and run.

Secrets never reach a card: keys that name credentials are dropped from the training configuration, strings that look
like Hugging Face tokens are masked, and callers pass any token they hold in `redact`.
"""

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from genesis_hf.layout import EVAL_RESULTS_FILE, METRICS_FILE, RUN_CONFIG_FILE

from .sizes import parameter_counts

LICENSE = "apache-2.0"
LOSS_CURVE_FILE = "loss_curve.png"
# Config keys whose values are credentials; compared after lower-casing.
_SECRET_KEYS = {
    "token",
    "hub_token",
    "hf_token",
    "push_to_hub_token",
    "api_key",
    "password",
    "secret",
    "wandb_api_key",
}
_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9_]{8,}")
_LOSS_KEYS = ("loss", "train_loss", "train/loss")
_STEP_KEYS = ("step", "global_step", "train/step")
# lm-evaluation-harness metric names ("acc_norm,none") -> the metric type shown in `model-index`.
_EVAL_METRICS = ("acc_norm", "acc", "exact_match", "perplexity", "word_perplexity", "f1", "mc2", "mc1")

ARCHITECTURE_FIELDS = (
    ("parameters", None),
    ("hidden_size", "hidden size"),
    ("num_hidden_layers", "layers"),
    ("num_attention_heads", "attention heads"),
    ("num_key_value_heads", "key/value heads (GQA)"),
    ("head_dim", "head dimension"),
    ("intermediate_size", "FFN (SwiGLU)"),
    ("max_position_embeddings", "context length"),
    ("vocab_size", "vocabulary"),
    ("rope_theta", "RoPE theta"),
    ("rms_norm_eps", "RMSNorm epsilon"),
    ("tie_word_embeddings", "tied embeddings"),
)


def redact_secrets(value: Any, redact: Iterable[str] = ()) -> Any:
    """A copy of a config structure with credential keys removed and token-like strings masked.

    Args:
        value: dicts, lists and scalars (a parsed YAML or JSON config).
        redact: exact strings (e.g. the token in use) to mask wherever they appear.
    """
    redact = [secret for secret in redact if secret]
    if isinstance(value, dict):
        return {
            key: redact_secrets(item, redact) for key, item in value.items() if str(key).lower() not in _SECRET_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item, redact) for item in value]
    if isinstance(value, str):
        for secret in redact:
            value = value.replace(secret, "***")
        return _TOKEN_PATTERN.sub("hf_***", value)
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: metrics, evaluation results


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON records of a `metrics.jsonl` file; lines that are not JSON objects are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def loss_points(records: Iterable[dict]) -> list[tuple[float, float]]:
    """`(step, loss)` pairs of the records that have both (keys `step`/`global_step` and `loss`/`train_loss`)."""
    points = []
    for record in records:
        step = next((record[key] for key in _STEP_KEYS if isinstance(record.get(key), (int, float))), None)
        loss = next((record[key] for key in _LOSS_KEYS if isinstance(record.get(key), (int, float))), None)
        if step is not None and loss is not None and math.isfinite(loss):
            points.append((float(step), float(loss)))
    return sorted(points)


def read_eval_results(path: str | Path, dataset_names: dict[str, str] | None = None) -> list[EvalResult]:
    """Evaluation results as `EvalResult`s, from lm-evaluation-harness output or a plain list.

    Accepted shapes: `{"results": {task: {"acc_norm,none": 0.26, "acc_norm_stderr,none": ..., ...}}}` (the harness)
    or `[{"task": ..., "metric": ..., "value": ...}, ...]`.

    Args:
        path: the JSON file.
        dataset_names: optional display names per task.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    dataset_names = dataset_names or {}
    results = []
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        for task, metrics in sorted(data["results"].items()):
            for metric_key, value in metrics.items():
                metric = metric_key.split(",")[0]
                if metric not in _EVAL_METRICS or not isinstance(value, (int, float)):
                    continue
                results.append(_eval_result(task, metric, value, dataset_names))
    elif isinstance(data, list):
        for item in data:
            results.append(_eval_result(str(item["task"]), str(item["metric"]), item["value"], dataset_names))
    else:
        raise ValueError(
            f"Evaluation results in {str(path)!r} have an unknown shape; expected lm-evaluation-harness output "
            '({"results": {task: {metric: value}}}) or a list of {"task", "metric", "value"}.'
        )
    return results


def _eval_result(task: str, metric: str, value: float, dataset_names: dict[str, str]) -> EvalResult:
    return EvalResult(
        task_type="text-generation",
        task_name="Text Generation",
        dataset_type=task,
        dataset_name=dataset_names.get(task, task),
        metric_type=metric,
        metric_name=metric,
        metric_value=round(float(value), 4),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loss curve


def render_loss_curve(
    points: list[tuple[float, float]], path: str | Path, *, title: str = "Training loss", size=(720, 420)
) -> Path:
    """Draw `(step, loss)` points as a line chart PNG with axes and tick labels (Pillow only).

    Args:
        points: `(step, loss)` pairs; at least one.
        path: the PNG to write.
        title: the chart title.
        size: `(width, height)` in pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not points:
        raise ValueError("render_loss_curve needs at least one (step, loss) point.")
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    x_min, x_max = min(steps), max(steps)
    y_min, y_max = min(losses), max(losses)
    if x_max == x_min:
        x_max = x_min + 1
    if y_max == y_min:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    pad = (y_max - y_min) * 0.05
    y_min, y_max = y_min - pad, y_max + pad

    def to_pixel(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x_min) / (x_max - x_min) * (width - left - right)
        y = top + (y_max - loss) / (y_max - y_min) * (height - top - bottom)
        return x, y

    # Grid, ticks and labels: five divisions on each axis.
    for index in range(6):
        fraction = index / 5
        y_value = y_min + fraction * (y_max - y_min)
        _, y = to_pixel(x_min, y_value)
        draw.line([(left, y), (width - right, y)], fill=(230, 230, 230))
        draw.text((5, y - 6), f"{y_value:.3g}", fill="black", font=font)
        x_value = x_min + fraction * (x_max - x_min)
        x, _ = to_pixel(x_value, y_min)
        draw.line([(x, top), (x, height - bottom)], fill=(230, 230, 230))
        draw.text((x - 15, height - bottom + 6), f"{x_value:.6g}", fill="black", font=font)
    draw.rectangle([(left, top), (width - right, height - bottom)], outline="black")
    draw.text((left, 12), title, fill="black", font=font)
    draw.text((width // 2 - 10, height - 20), "step", fill="black", font=font)

    pixels = [to_pixel(step, loss) for step, loss in points]
    if len(pixels) == 1:
        x, y = pixels[0]
        draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=(31, 119, 180))
    else:
        draw.line(pixels, fill=(31, 119, 180), width=2)
    path = Path(path)
    image.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The card


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}"
    return str(value)


def _human_count(count: int) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.1f}{suffix}"
    return str(count)


def architecture_rows(config) -> list[tuple[str, str]]:
    """`(field, value)` rows describing the architecture, from a Genesis or Llama config."""
    rope = getattr(config, "rope_parameters", None) or {}
    rows = []
    for field, label in ARCHITECTURE_FIELDS:
        if field == "parameters":
            rows.append(("parameters", f"{parameter_counts(config).total:,}"))
            continue
        value = rope.get("rope_theta") if field == "rope_theta" else getattr(config, field, None)
        if value is not None:
            rows.append((label, _format_value(value)))
    return rows


def usage_snippet(repo_id: str, export_format: str, revision: str | None = None, gguf_file: str | None = None) -> str:
    """Python that loads the model from `repo_id` and generates, as it will appear in the card."""
    revision_argument = f', revision="{revision}"' if revision else ""
    lines = [
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'repo_id = "{repo_id}"',
    ]
    if export_format == "gguf":
        lines += [
            f'gguf_file = "{gguf_file}"',
            f"tokenizer = AutoTokenizer.from_pretrained(repo_id, gguf_file=gguf_file{revision_argument})",
            f"model = AutoModelForCausalLM.from_pretrained(repo_id, gguf_file=gguf_file{revision_argument})",
        ]
    else:
        remote_code = ", trust_remote_code=True" if export_format == "hf" else ""
        # The tokenizer too: AutoTokenizer reads config.json, whose auto_map would otherwise make it ask on stdin.
        lines += [
            f"tokenizer = AutoTokenizer.from_pretrained(repo_id{revision_argument}{remote_code})",
            f"model = AutoModelForCausalLM.from_pretrained(repo_id{revision_argument}{remote_code})",
        ]
    lines += [
        "",
        'inputs = tokenizer("The history of science", return_tensors="pt")',
        "with torch.no_grad():",
        "    output_ids = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
        "print(tokenizer.decode(output_ids[0], skip_special_tokens=True))",
    ]
    return "\n".join(lines)


def extract_python_snippet(card_text: str) -> str:
    """The first ```python block of a card (what `tests/test_export.py` runs)."""
    match = re.search(r"```python\n(.*?)```", card_text, flags=re.DOTALL)
    if match is None:
        raise ValueError("The card has no ```python block.")
    return match.group(1)


def build_model_card(
    config,
    *,
    repo_id: str,
    export_format: str = "hf",
    dtype: str = "bf16",
    revision: str | None = None,
    gguf_file: str | None = None,
    model_name: str | None = None,
    step: int | None = None,
    tokens_seen: int | None = None,
    loss: float | None = None,
    run_config: dict | None = None,
    data_mixture: dict | None = None,
    eval_results: list[EvalResult] | None = None,
    loss_curve_file: str | None = None,
    verification: dict | None = None,
    lineage: dict | None = None,
    source: str | None = None,
    source_hub_id: str | None = None,
    redact: Iterable[str] = (),
) -> ModelCard:
    """Build the model card of an export, following the Hub's conventions for its kind of folder.

    A pretrained model is trained from scratch (no `base_model`); an SFT or DPO model names the Hub id of the model it
    was trained from as `base_model` with `base_model_relation: finetune`; a GGUF file names the model it was
    converted from with `base_model_relation: quantized` and says how to run it with llama.cpp and Ollama. Local
    paths go into the text only: the Hub resolves `base_model` and `datasets` as repos.

    Args:
        config: the model config (`GenesisConfig` or `LlamaConfig`).
        repo_id: where the model is (or will be) published; used in the usage snippet.
        export_format: `hf`, `llama` or `gguf`: decides the loading code in the snippet.
        dtype: the dtype of the stored weights.
        revision: the branch of a training checkpoint (`step-0000400`), shown in the snippet.
        gguf_file: the GGUF file name, for `gguf` exports.
        model_name: the title; defaults to the lineage's model name, then the repo name.
        step: optimizer steps of the checkpoint.
        tokens_seen: training tokens of the checkpoint.
        loss: training loss at the checkpoint.
        run_config: the resolved training configuration (secrets are removed).
        data_mixture: source -> weight (or token count) of the pretraining data.
        eval_results: evaluation results, written to the `model-index` metadata and a table.
        loss_curve_file: a PNG next to the card to embed.
        verification: `{"max_abs_diff": ..., "tolerance": ...}` from the export's logit check.
        lineage: what made the model (`genesis_hf.model.lineage`): stage, recipe command, base model, data.
        source: the folder or checkpoint the export was written from (named in a GGUF card).
        source_hub_id: the Hub id of that source, when it is published (a GGUF card's `base_model`).
        redact: strings (tokens) that must never appear in the card.
    """
    lineage = lineage or {}
    stage = lineage.get("stage")  # None: a folder that does not say how it was made
    title = model_name or lineage.get("model_name") or repo_id.rstrip("/").split("/")[-1]
    if export_format == "gguf":
        base_model, relation = source_hub_id, "quantized"
    else:
        base_model, relation = lineage.get("base_model_hub_id"), "finetune"
    gguf_tags = ["gguf"] if export_format == "gguf" else []
    card_data = _card_data(
        "gguf" if export_format == "gguf" else "transformers",
        [*_STAGE_TAGS[stage], *gguf_tags],
        lineage,
        base_model=base_model if stage in ("sft", "dpo") or export_format == "gguf" else None,
        relation=relation,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
    )
    summary = _summary(config, stage, lineage, step, tokens_seen)
    if export_format == "gguf":
        summary += f" This folder holds it as one GGUF file, converted from `{source_hub_id or source or title}`."
    shown_config = {key: value for key, value in (run_config or {}).items() if key != "lineage"}
    facts = [("step", step), ("tokens seen", tokens_seen), ("training loss", loss)]
    card = ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        kind="model",
        title=title,
        summary=summary,
        stage=stage,
        export_format=export_format,
        dtype=dtype,
        format_note=_FORMAT_NOTES.get(export_format, ""),
        usage_block=_python_block(usage_snippet(repo_id, export_format, revision, gguf_file)),
        gguf_file=gguf_file,
        ollama_name=re.sub(r"[^a-z0-9._-]+", "-", title.lower()),
        architecture_rows=architecture_rows(config),
        lineage=lineage,
        training_facts=[(label, _format_value(value)) for label, value in facts if value is not None],
        loss_curve_file=loss_curve_file,
        data_mixture=[(name, _format_value(share)) for name, share in (data_mixture or {}).items()],
        run_config_yaml=yaml.safe_dump(redact_secrets(shown_config, redact), sort_keys=True).strip()
        if shown_config
        else None,
        evaluation_rows=[
            (result.dataset_name, result.metric_type, result.metric_value) for result in eval_results or []
        ],
        verification=verification,
    )
    return ModelCard(redact_secrets(str(card), redact))


def build_adapter_card(lineage: dict, *, title: str, redact: Iterable[str] = ()) -> ModelCard:
    """The card of a LoRA run's `adapter/`: PEFT's conventions (`library_name: peft`, `base_model_relation: adapter`).

    Args:
        lineage: the run's lineage (`genesis_hf.model.lineage.finetune_lineage`).
        title: the model's name.
        redact: strings (tokens) that must never appear in the card.
    """
    stage = lineage.get("stage") or "sft"
    card_data = _card_data(
        "peft", ["lora", *_STAGE_TAGS[stage]], lineage, base_model=lineage.get("base_model_hub_id"), relation="adapter"
    )
    usage = "\n".join(
        [
            "from peft import AutoPeftModelForCausalLM",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("path/to/adapter", trust_remote_code=True)',
            "merged = model.merge_and_unload()  # the run's final/ holds this merged model",
        ]
    )
    summary = f"The LoRA adapter of `{title}`: " + _STAGE_SUMMARIES[stage].format(base=_base_words(lineage)) + "."
    card = ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        kind="adapter",
        title=f"{title} (LoRA adapter)",
        summary=summary,
        stage=stage,
        usage_block=_python_block(usage),
        lineage=lineage,
    )
    return ModelCard(redact_secrets(str(card), redact))


CARD_TEMPLATE = Path(__file__).with_name("card_template.md")
_STAGE_TAGS = {
    None: [],
    "pretraining": ["pretraining"],
    "sft": ["trl", "sft", "conversational"],
    "dpo": ["trl", "dpo", "conversational"],
}
_STAGE_SUMMARIES = {
    None: "trained with genesis_hf",
    "pretraining": "trained from scratch with genesis_hf",
    "sft": "{base} fine-tuned into a chat model with TRL's `SFTTrainer` (loss on the assistant's tokens) by genesis_hf",
    "dpo": "{base} aligned with direct preference optimisation (TRL's `DPOTrainer`) by genesis_hf",
}
_FORMAT_NOTES = {
    "hf": "Genesis weights with their modeling code: load with `trust_remote_code=True`.",
    "llama": "A plain `LlamaForCausalLM` checkpoint: no remote code; ready for vLLM, TGI and llama.cpp.",
    "gguf": "A llama-architecture GGUF file for llama.cpp and compatible runtimes.",
}


def _card_data(library_name: str, tags: list[str], lineage: dict, *, base_model, relation, **fields) -> ModelCardData:
    """The metadata every card shares; `base_model_relation` only next to a `base_model` (a Hub id)."""
    return ModelCardData(
        language=["en"],
        license=LICENSE,
        library_name=library_name,
        pipeline_tag="text-generation",
        tags=["genesis", "llama", "text-generation", *tags],
        base_model=base_model,
        base_model_relation=relation if base_model else None,
        datasets=lineage.get("datasets") or None,
        **fields,
    )


def _python_block(code: str) -> str:
    """A fenced Python block (built here: a literal one in the template would be reformatted by ruff as Python)."""
    return f"```python\n{code}\n```"


def _base_words(lineage: dict) -> str:
    return f"`{lineage.get('base_model_hub_id') or lineage.get('base_model') or 'a Genesis model'}`"


def _summary(config, stage: str, lineage: dict, step: int | None, tokens_seen: int | None) -> str:
    """What the model is (size, how it was made) and which checkpoint this is."""
    parameters = _human_count(parameter_counts(config).total)
    kind = "chat model" if stage in ("sft", "dpo") else "language model"
    summary = f"A {parameters}-parameter Llama-style decoder-only {kind}: "
    summary += _STAGE_SUMMARIES[stage].format(base=_base_words(lineage)) + "."
    if step is not None:
        finetuned = stage in ("sft", "dpo")
        summary += f" This is {'the model after' if finetuned else 'the training checkpoint at step'} {step:,}"
        summary += " steps" if finetuned else ""
        summary += f" ({tokens_seen:,} tokens seen)." if tokens_seen is not None else "."
    return summary


def find_run_files(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Files next to a checkpoint that feed the card: `run_config.yaml`, `metrics.jsonl`, `eval_results.json`.

    Looked up in the checkpoint directory, then in the run's output directory (two levels up for
    `<output_dir>/checkpoints/step-XXXXXXX`, one level up otherwise).
    """
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir, checkpoint_dir.parent, checkpoint_dir.parent.parent]
    found = {}
    for name in (RUN_CONFIG_FILE, METRICS_FILE, EVAL_RESULTS_FILE):
        for directory in candidates:
            if (directory / name).is_file():
                found[name] = directory / name
                break
    return found


def write_model_card(out_dir: str | Path, config, *, metrics_path: str | Path | None = None, **card_kwargs) -> Path:
    """Write `README.md` (and `loss_curve.png` when `metrics_path` has losses) into `out_dir`.

    Args:
        out_dir: the export folder.
        config: the model config.
        metrics_path: a `metrics.jsonl` to draw the loss curve from.
        card_kwargs: the other arguments of `build_model_card`.
    """
    out_dir = Path(out_dir)
    if metrics_path is not None and Path(metrics_path).is_file():
        points = loss_points(read_metrics(metrics_path))
        if points:
            render_loss_curve(points, out_dir / LOSS_CURVE_FILE)
            card_kwargs["loss_curve_file"] = LOSS_CURVE_FILE
    card = build_model_card(config, **card_kwargs)
    path = out_dir / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path


__all__ = [
    "LICENSE",
    "LOSS_CURVE_FILE",
    "architecture_rows",
    "build_adapter_card",
    "build_model_card",
    "extract_python_snippet",
    "find_run_files",
    "loss_points",
    "read_eval_results",
    "read_metrics",
    "redact_secrets",
    "render_loss_curve",
    "usage_snippet",
    "write_model_card",
]
