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
    redact: Iterable[str] = (),
) -> ModelCard:
    """Build the model card of an export.

    Args:
        config: the model config (`GenesisConfig` or `LlamaConfig`).
        repo_id: where the model is (or will be) published; used in the usage snippet.
        export_format: `hf`, `llama` or `gguf`: decides the loading code in the snippet.
        dtype: the dtype of the stored weights.
        revision: the branch of a training checkpoint (`step-0000400`), shown in the snippet.
        gguf_file: the GGUF file name, for `gguf` exports.
        model_name: the title; defaults to the repo name.
        step: optimizer steps of the checkpoint.
        tokens_seen: training tokens of the checkpoint.
        loss: training loss at the checkpoint.
        run_config: the resolved training configuration (secrets are removed).
        data_mixture: source -> weight (or token count) of the pretraining data.
        eval_results: evaluation results, written to the `model-index` metadata and a table.
        loss_curve_file: a PNG next to the card to embed.
        verification: `{"max_abs_diff": ..., "tolerance": ...}` from the export's logit check.
        redact: strings (tokens) that must never appear in the card.
    """
    redact = [secret for secret in redact if secret]
    model_name = model_name or repo_id.rstrip("/").split("/")[-1]
    tags = ["genesis", "llama", "text-generation", "pretraining"]
    if export_format == "gguf":
        tags.append("gguf")
    card_data = ModelCardData(
        language=["en"],
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    sections = [
        *_introduction_section(config, model_name, export_format, dtype, step, tokens_seen),
        *["## Usage", "", "```python", usage_snippet(repo_id, export_format, revision, gguf_file), "```", ""],
        *_architecture_section(config),
        *_training_section(step, tokens_seen, loss, loss_curve_file, data_mixture, run_config, redact),
        *_evaluation_section(eval_results or []),
        *_export_check_section(verification),
        *["## License", "", "Apache 2.0.", ""],
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections)
    content = redact_secrets(content, redact)
    return ModelCard(content)


_FORMAT_NOTES = {
    "hf": "Genesis weights with their modeling code: load with `trust_remote_code=True`.",
    "llama": "A plain `LlamaForCausalLM` checkpoint: no remote code; ready for vLLM, TGI and llama.cpp.",
    "gguf": "A llama-architecture GGUF file for llama.cpp and compatible runtimes.",
}


def _introduction_section(
    config, model_name: str, export_format: str, dtype: str, step: int | None, tokens_seen: int | None
) -> list[str]:
    """The title, what the model is (size, checkpoint step) and the format of the export."""
    parameters = parameter_counts(config).total
    summary = f"A {_human_count(parameters)}-parameter Llama-style decoder-only language model trained from scratch"
    summary += " with genesis_hf."
    if step is not None:
        summary += f" This is the training checkpoint at step {step:,}"
        summary += f" ({tokens_seen:,} tokens seen)." if tokens_seen is not None else "."
    format_line = f"Format: **{export_format}** ({dtype} weights). {_FORMAT_NOTES.get(export_format, '')}"
    return [f"# {model_name}", "", summary, "", format_line, ""]


def _architecture_section(config) -> list[str]:
    rows = [f"| {label} | {value} |" for label, value in architecture_rows(config)]
    return ["## Architecture", "", "| field | value |", "|---|---|", *rows, ""]


def _training_section(
    step: int | None,
    tokens_seen: int | None,
    loss: float | None,
    loss_curve_file: str | None,
    data_mixture: dict | None,
    run_config: dict | None,
    redact: list[str],
) -> list[str]:
    """The checkpoint's step, tokens and loss, the loss curve, the data mixture and the (redacted) configuration."""
    sections = ["## Training", ""]
    facts = [("step", step), ("tokens seen", tokens_seen), ("training loss", loss)]
    facts = [(label, value) for label, value in facts if value is not None]
    if facts:
        sections += ["| | |", "|---|---|", *[f"| {label} | {_format_value(value)} |" for label, value in facts], ""]
    if loss_curve_file:
        sections += [f"![Training loss]({loss_curve_file})", ""]
    if data_mixture:
        sections += ["### Data mixture", "", "| source | share |", "|---|---|"]
        sections += [f"| {source} | {_format_value(share)} |" for source, share in data_mixture.items()]
        sections.append("")
    if run_config:
        config_text = yaml.safe_dump(redact_secrets(run_config, redact), sort_keys=True).strip()
        sections += ["### Training configuration", "", "```yaml", config_text, "```", ""]
    if not (facts or loss_curve_file or data_mixture or run_config):
        sections += ["No training metadata was found next to this checkpoint.", ""]
    return sections


def _evaluation_section(eval_results: list[EvalResult]) -> list[str]:
    if not eval_results:
        return []
    rows = [f"| {result.dataset_name} | {result.metric_type} | {result.metric_value} |" for result in eval_results]
    header = ["## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
    return [*header, *rows, "", "Results from lm-evaluation-harness.", ""]


def _export_check_section(verification: dict | None) -> list[str]:
    if verification is None:
        return []
    return [
        "## Export check",
        "",
        f"The exported files were reloaded and their logits compared with the training checkpoint on fixed prompts "
        f"(fp32): max absolute difference {verification['max_abs_diff']:.3g} "
        f"(tolerance {verification['tolerance']:.3g}).",
        "",
    ]


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
