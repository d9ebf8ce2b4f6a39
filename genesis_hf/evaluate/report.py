"""`genesis-hf report`: compare evaluation results (base, SFT, DPO, ...) in a markdown table and a bar chart.

    genesis-hf report outputs/eval/base.json outputs/eval/sft.json outputs/eval/dpo.json --output_dir outputs/report

Each input is an lm-evaluation-harness results file (`genesis-hf eval`, `lm_eval --output_path`, or any JSON of the
shape `{"results": {task: {metric: value, "<metric>_stderr": stderr}}}`, such as the engagement benchmark's); the
model is named after the file. Writes `report.md` (task, metric, model, value, stderr, random baseline, delta against
the first file) and `report.png` (accuracy-like metrics as grouped bars, chance marked).
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from genesis_hf.args import add_command
from genesis_hf.evaluate.tasks import RANDOM_BASELINES

REPORT_MARKDOWN = "report.md"
REPORT_CHART = "report.png"
# Metrics that are not a 0..1 score go in the table only.
_UNBOUNDED_METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


class ReportError(ValueError):
    """An input cannot be read as evaluation results; the message names the file and the fix."""


@dataclasses.dataclass
class Score:
    task: str
    metric: str  # lm-eval's "acc_norm,none" keeps the filter after the comma; shown without it when "none"
    value: float
    stderr: float | None


def read_scores(path: str | Path) -> list[Score]:
    """The scores of one results file, in the file's task order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(
            f"Cannot read results {str(path)!r} ({error}); pass JSON files written by genesis-hf eval."
        ) from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ReportError(
            f'{str(path)!r} has no "results" mapping; expected lm-evaluation-harness output '
            '({"results": {task: {metric: value}}}).'
        )
    scores = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, metric_filter = key.partition(",")
            if name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr" + (f",{metric_filter}" if metric_filter else ""))
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            label = name if metric_filter in ("", "none") else f"{name} ({metric_filter})"
            scores.append(Score(task, label, float(value), stderr))
    return scores


def random_baseline(task: str, metric: str) -> float | None:
    if metric.split(" ")[0] in _UNBOUNDED_METRICS:
        return None
    return RANDOM_BASELINES.get(task)


def _format(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:+,.0f}" if signed else f"{value:,.0f}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown_table(runs: dict[str, list[Score]]) -> str:
    """One row per task, metric and model; the delta is against the first model's value."""
    names = list(runs)
    first = {(score.task, score.metric): score.value for score in runs[names[0]]}
    keys = list(dict.fromkeys((score.task, score.metric) for scores in runs.values() for score in scores))
    lines = [
        "| task | metric | model | value | stderr | random | delta vs " + names[0] + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, metric in keys:
        for name in names:
            score = next((s for s in runs[name] if (s.task, s.metric) == (task, metric)), None)
            if score is None:
                continue
            delta = score.value - first[(task, metric)] if (task, metric) in first and name != names[0] else None
            row = [task, metric, name, _format(score.value), _format(score.stderr)]
            row += [_format(random_baseline(task, metric)), _format(delta, signed=True)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: dict[str, list[Score]], path: str | Path) -> Path:
    """Grouped bars of the 0..1 metrics, one colour per model, chance as a dashed tick over each group."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    keys = [
        key
        for key in dict.fromkeys((s.task, s.metric) for scores in runs.values() for s in scores)
        if key[1].split(" ")[0] not in _UNBOUNDED_METRICS
    ]
    width = 0.8 / max(len(runs), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(keys) + 2), 4.5), dpi=110)
    for index, (name, scores) in enumerate(runs.items()):
        by_key = {(s.task, s.metric): s for s in scores}
        positions = [k + (index - (len(runs) - 1) / 2) * width for k, key in enumerate(keys) if key in by_key]
        present = [by_key[key] for key in keys if key in by_key]
        errors = [s.stderr or 0.0 for s in present]
        axes.bar(positions, [s.value for s in present], width, yerr=errors, capsize=2, label=name)
    for k, (task, metric) in enumerate(keys):
        baseline = random_baseline(task, metric)
        if baseline:
            axes.hlines(baseline, k - 0.45, k + 0.45, colors="black", linestyles="dashed", linewidth=1)
    axes.set_xticks(range(len(keys)), [f"{task}\n{metric}" for task, metric in keys], fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("score (dashed: random baseline)")
    axes.set_title("lm-evaluation-harness results")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def write_report(result_files: list[str | Path], output_dir: str | Path) -> dict[str, Path]:
    """Write `report.md` and `report.png` for the result files; returns their paths.

    Args:
        result_files: results JSON files; the first is the reference of the delta column.
        output_dir: created if needed; existing report files are not overwritten.
    """
    names = [Path(path).stem for path in result_files]
    if len(set(names)) != len(names):
        raise ReportError(f"Two results files have the same name ({', '.join(names)}); the model is named after it.")
    runs = {name: read_scores(path) for name, path in zip(names, result_files)}
    output_dir = Path(output_dir)
    targets = {"markdown": output_dir / REPORT_MARKDOWN, "chart": output_dir / REPORT_CHART}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing:
        raise ReportError(f"{', '.join(existing)} already exist; pass another --output_dir.")
    output_dir.mkdir(parents=True, exist_ok=True)
    sources = ", ".join(f"`{name}` ({path})" for name, path in zip(names, result_files))
    text = f"# Evaluation report\n\nModels: {sources}.\n\n" + markdown_table(runs)
    text += f"\n![Scores]({REPORT_CHART})\n"
    targets["markdown"].write_text(text, encoding="utf-8")
    bar_chart(runs, targets["chart"])
    return targets


def _run_report(args: argparse.Namespace) -> int:
    try:
        written = write_report(args.results, args.output_dir)
    except ReportError as error:
        print(f"genesis-hf report: error: {error}", file=sys.stderr)
        return 2
    print(written["markdown"].read_text(encoding="utf-8"))
    print(f"Wrote {written['markdown']} and {written['chart']}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf report` to the top-level `subparsers`."""
    help = "Markdown table and bar chart over evaluation results files (base vs SFT vs DPO)."
    parser = add_command(subparsers, "report", help=help, description=__doc__, func=_run_report)
    parser.add_argument("results", nargs="+", help="Results JSON files; the first is the reference for deltas.")
    parser.add_argument("--output_dir", required=True, help="Folder for report.md and report.png.")


__all__ = [
    "REPORT_CHART",
    "REPORT_MARKDOWN",
    "ReportError",
    "markdown_table",
    "read_scores",
    "register_cli",
    "write_report",
]
