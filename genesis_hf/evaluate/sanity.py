"""The sanity gate: catch a model that does not match its tokenizer or its export before spending hours on a suite.

The seed published a base model at chance on every task with LAMBADA perplexity 3,360,048 after a training loss of
~1.93: a mismatch between what trained and what was evaluated, not too little training. Three checks find that class
of bug in seconds, on a few thousand held-out tokens:

1. **Perplexity against the recorded loss.** The model's loss on held-out text (the run's validation split when the
   run's mixture is known, else held-out documents of the embedded corpus) must stay near the loss the run recorded
   (`eval_loss`, else the training loss), and below guessing uniformly over the vocabulary.
2. **RoPE layout probe.** Query/key rows re-paired the other way (HF halves vs llama.cpp's interleaved pairs) or
   rotated in the other direction must not fit the text better than the weights as loaded; if one does, the export
   stored Q/K in the wrong layout.
3. **Tokenizer round trip.** Prose, code, digits and ChatML decode back to the same text, with every id inside the
   embedding matrix.
"""

import dataclasses
import math
from collections.abc import Callable

import torch

# Loss margins in nats (a perplexity ratio of e^margin). On the run's own validation split, a healthy model sits within
# ~0.5 nat of its recorded loss; on other text (the embedded sample) the domain shift adds up to a nat or two.
VALIDATION_MARGIN = 1.0
OTHER_TEXT_MARGIN = 1.5
OTHER_TEXT_RELATIVE_MARGIN = 0.5
# A layout variant must beat the loaded weights by this much to count (below it, an undertrained model's noise).
ROPE_PROBE_MARGIN = 0.01
CHANCE_FRACTION = 0.9
# Held-out perplexity in the thousands means a broken model whatever its size (healthy small models sit in the tens).
PERPLEXITY_LIMIT = 1000.0
# After the suite, "at chance" is within 2 standard errors or 5 points of it (the seed's PIQA was 53.6 against 50).
CHANCE_SCORE_TOLERANCE = 0.05
# Below this many documents a task's score says nothing about chance (a --limit smoke run).
MIN_DOCUMENTS_FOR_CHANCE = 100
HOLDOUT_EVERY = 20  # the default mixture's: documents 19, 39, ... of each embedded source never reach training
# The embedded sample stops reading prose at half the tokens wanted; code fills the rest.
EMBEDDED_SOURCE_SHARE = {"stdlib-docs": 0.5, "stdlib-code": 1.0}
ROUND_TRIP_TEXTS = (
    "The history of science is the study of how people came to understand the natural world.",
    "def mean(values):\n    return sum(values) / len(values)  # 3.14159, 2026\n",
    "Zürich, naïve café: 1,234.5 km — 100% ✓",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
)


@dataclasses.dataclass
class SanityReport:
    """What the gate measured and what it concluded (`problems` empty means quiet)."""

    held_out_loss: float
    held_out_source: str
    num_tokens: int
    vocab_size: int
    recorded_loss: float | None = None
    recorded_loss_kind: str | None = None
    rope_variant_losses: dict[str, float] = dataclasses.field(default_factory=dict)
    round_trip_failures: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def held_out_perplexity(self) -> float:
        return math.exp(min(self.held_out_loss, 700.0))

    def message(self) -> str:
        if self.ok:
            recorded = f", recorded {self.recorded_loss_kind} {self.recorded_loss:.3f}" if self.recorded_loss else ""
            return (
                f"Sanity gate passed: held-out loss {self.held_out_loss:.3f} (perplexity {self.held_out_perplexity:,.1f}) "
                f"on {self.num_tokens} tokens of {self.held_out_source}{recorded}; tokenizer round trip OK."
            )
        return "This model does not match its tokenizer or its export: " + " ".join(self.problems)


def embedded_sample_rows(tokenizer, seq_len: int, max_rows: int) -> torch.Tensor:
    """Held-out documents of the embedded corpus (never in the default mixture's training stream) as `(rows, seq_len)`
    token ids, EOS-separated and packed like pretraining."""
    from genesis_hf import corpus

    ids: list[int] = []
    needed = seq_len * max_rows
    for source in corpus.EMBEDDED_SOURCES:
        for index, document in enumerate(corpus.iter_documents(source)):
            if index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
                ids += tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"] + [
                    tokenizer.eos_token_id
                ]
            if len(ids) >= needed * EMBEDDED_SOURCE_SHARE[source]:
                break
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)[:max_rows]


def validation_rows(mixture: str, tokenizer, seq_len: int, max_rows: int) -> torch.Tensor:
    """The run's held-out split (`build_validation_batches` of its mixture) as `(rows, seq_len)` token ids."""
    from genesis_hf.data import build_validation_batches

    batches = build_validation_batches(mixture, tokenizer, seq_len=seq_len, batch_size=max_rows, num_batches=1)
    return batches[0]["input_ids"]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats) of `model` over `(rows, seq_len)` token ids."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum")
        total += losses.item()
        count += batch[:, 1:].numel()
    return total / count


def _pair_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # (heads * head_dim, in) rows of each head reordered from [halves] to [interleaved pairs]
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _pair_halves(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    return weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def _reverse_rotation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # Negating the second half of every head of q and k turns each rotation by +theta into one by -theta.
    heads = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).clone()
    heads[:, 1] *= -1
    return heads.reshape(weight.shape)


ROPE_VARIANTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "q/k paired as interleaved (llama.cpp) dimensions": _pair_interleaved,
    "q/k paired as halves (HF) after an interleaved layout": _pair_halves,
    "q/k rotated the other way": _reverse_rotation,
}


@torch.no_grad()
def rope_variant_losses(model: torch.nn.Module, rows: torch.Tensor) -> dict[str, float]:
    """Held-out loss of the model with its q/k projections rewritten by each of `ROPE_VARIANTS` (restored after)."""
    config = model.config
    attentions = [layer.self_attn for layer in model.model.layers]
    originals = [(attention.q_proj.weight.clone(), attention.k_proj.weight.clone()) for attention in attentions]
    losses = {}
    try:
        for name, transform in ROPE_VARIANTS.items():
            for attention, (q_weight, k_weight) in zip(attentions, originals):
                attention.q_proj.weight.copy_(transform(q_weight, config.num_attention_heads))
                attention.k_proj.weight.copy_(transform(k_weight, config.num_key_value_heads))
            losses[name] = mean_loss(model, rows)
    finally:
        for attention, (q_weight, k_weight) in zip(attentions, originals):
            attention.q_proj.weight.copy_(q_weight)
            attention.k_proj.weight.copy_(k_weight)
    return losses


def tokenizer_round_trip_failures(tokenizer, vocab_size: int) -> list[str]:
    """Texts that do not survive encode -> decode, or encode to ids outside the embedding matrix."""
    failures = []
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text:
            failures.append(f"{text[:40]!r} decodes back as {decoded[:40]!r}")
        elif ids and max(ids) >= vocab_size:
            failures.append(f"{text[:40]!r} encodes to id {max(ids)} >= vocab_size {vocab_size}")
    return failures


def judge(report: SanityReport) -> SanityReport:
    """Fill `report.problems` (replacing any earlier verdict) in plain words, with the numbers."""
    report.problems = []
    loss, perplexity = report.held_out_loss, report.held_out_perplexity
    measured = f"held-out perplexity {perplexity:,.1f} (loss {loss:.3f} nats) on {report.num_tokens} tokens of " + (
        report.held_out_source
    )
    recorded = ""
    if report.recorded_loss is not None:
        recorded = (
            f"the run recorded {report.recorded_loss_kind} {report.recorded_loss:.3f} (perplexity "
            f"{math.exp(report.recorded_loss):,.1f})"
        )
    at_chance = loss >= CHANCE_FRACTION * math.log(report.vocab_size)
    if at_chance or perplexity >= PERPLEXITY_LIMIT:
        where = (
            f"at or above guessing uniformly over its {report.vocab_size:,} tokens (perplexity {report.vocab_size:,})"
            if at_chance
            else f"above {PERPLEXITY_LIMIT:,.0f}, where no trained model sits on ordinary prose and code"
        )
        report.problems.append(
            f"{measured} is {where}: its scores will sit at chance" + (f", yet {recorded}." if recorded else ".")
        )
        return _judge_tokenizer(report)  # at chance every layout variant is noise: the probe says nothing more
    if report.recorded_loss is not None:
        if report.held_out_source.startswith("the run's validation split"):
            margin = VALIDATION_MARGIN
        else:
            margin = OTHER_TEXT_MARGIN + OTHER_TEXT_RELATIVE_MARGIN * report.recorded_loss
        if loss > report.recorded_loss + margin:
            report.problems.append(f"{measured}, but {recorded}: more than {margin:.2f} nats apart.")
    if report.rope_variant_losses:
        name, variant_loss = min(report.rope_variant_losses.items(), key=lambda item: item[1])
        if variant_loss < loss - ROPE_PROBE_MARGIN:
            report.problems.append(
                f"With {name} the held-out loss drops from {loss:.3f} to {variant_loss:.3f}: the query/key weights are "
                "stored in the wrong rotary layout (export with `genesis-hf export`, which verifies it)."
            )
    return _judge_tokenizer(report)


def _judge_tokenizer(report: SanityReport) -> SanityReport:
    if report.round_trip_failures:
        report.problems.append("The tokenizer does not round-trip: " + "; ".join(report.round_trip_failures) + ".")
    return report


def scores_at_chance(results: dict, baselines: dict[str, float]) -> str | None:
    """After the suite: the plain-words verdict when every multiple-choice score (of tasks with at least 100
    documents) is within two standard errors, or 5 points, of chance and some perplexity is in the thousands (the
    seed's published table), else `None`.

    Args:
        results: lm-eval's results dictionary (`{"results": {task: {"acc,none": ..., "acc_stderr,none": ...}}}`).
        baselines: chance accuracy per task.
    """

    def documents(task: str) -> int:
        return (results.get("n-samples") or {}).get(task, {}).get("effective", 0)

    scores, chance_scores, high_perplexities = 0, [], []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, metric_filter = key.partition(",")
            if not isinstance(value, (int, float)):
                continue
            if name.endswith("perplexity") and value >= PERPLEXITY_LIMIT:
                high_perplexities.append(f"{task} {name} {value:,.0f}")
            elif name in ("acc", "acc_norm") and baselines.get(task) and documents(task) >= MIN_DOCUMENTS_FOR_CHANCE:
                scores += 1
                stderr = metrics.get(f"{name}_stderr,{metric_filter}")
                stderr = stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else 0.0
                if abs(value - baselines[task]) <= max(2 * stderr, CHANCE_SCORE_TOLERANCE):
                    chance_scores.append(f"{task} {name} {value:.4f} (chance {baselines[task]:.2f})")
    if scores and len(chance_scores) == scores and high_perplexities:
        return (
            "This model does not match its tokenizer or its export: every multiple-choice score sits at chance ("
            + "; ".join(chance_scores)
            + ") with perplexity in the thousands ("
            + "; ".join(high_perplexities)
            + ")."
        )
    return None


def run_sanity_gate(
    model: torch.nn.Module,
    tokenizer,
    *,
    recorded_loss: float | None = None,
    recorded_loss_kind: str = "loss",
    mixture: str | None = None,
    seq_len: int = 128,
    max_rows: int = 16,
    log: Callable[[str], None] | None = None,
) -> SanityReport:
    """Measure held-out perplexity, probe the RoPE layout and round-trip the tokenizer; return the verdict.

    Args:
        model: a causal LM with Llama's module names (Genesis or Llama), in eval mode.
        tokenizer: the tokenizer it is evaluated with.
        recorded_loss: the loss the run recorded for this checkpoint (validation preferred), if known.
        recorded_loss_kind: its name in the message (`eval_loss`, `loss`).
        mixture: the run's data mixture; its validation split is the held-out text when it can be read.
        seq_len: tokens per held-out row (capped by the model's context).
        max_rows: held-out rows.
        log: called with progress lines.
    """
    log = log or (lambda message: None)
    vocab_size = model.config.vocab_size
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len) or seq_len)
    rows, source = None, "held-out documents of the embedded corpus (Python standard library prose and code)"
    if mixture is not None:
        try:
            rows = validation_rows(mixture, tokenizer, seq_len, max_rows)
            source = f"the run's validation split ({mixture})"
        except Exception as error:  # an unreachable Hub source offline: fall back, and say so
            log(
                f"Sanity gate: cannot read the run's validation split of {mixture!r} ({error}); using the embedded sample."
            )
    if rows is None:
        rows = embedded_sample_rows(tokenizer, seq_len, max_rows)
    rows = rows.clamp(max=vocab_size - 1) if rows.numel() and rows.max() >= vocab_size else rows
    report = SanityReport(
        held_out_loss=mean_loss(model, rows),
        held_out_source=source,
        num_tokens=rows.numel(),
        vocab_size=vocab_size,
        recorded_loss=recorded_loss,
        recorded_loss_kind=recorded_loss_kind if recorded_loss is not None else None,
        round_trip_failures=tokenizer_round_trip_failures(tokenizer, vocab_size),
    )
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        report.rope_variant_losses = rope_variant_losses(model, rows)
    return judge(report)


__all__ = [
    "ROPE_VARIANTS",
    "scores_at_chance",
    "SanityReport",
    "embedded_sample_rows",
    "judge",
    "mean_loss",
    "rope_variant_losses",
    "run_sanity_gate",
    "tokenizer_round_trip_failures",
]
