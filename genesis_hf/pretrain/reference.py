"""What a run's held-out loss is compared with, and what a finished run shows its user.

A language model that has learned only word frequencies reaches the unigram entropy of the text: the entropy of the
held-out tokens' own frequency distribution, in nats per token under the run's tokenizer. A held-out loss below it
measures what the model learned from context; `unigram_entropy` computes that reference from the very batches the
held-out loss is computed on, so the two are comparable for any corpus and tokenizer.
"""

import math
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

# Held-out tokens the reference is computed on: the entropy of a small sample is biased low (rare tokens are missing
# from it), by ~0.4 nats at 4,096 tokens under the default tokenizer and ~0.06 at 131,072.
REFERENCE_TOKENS = 131_072
# Greedy continuations printed at the end of a run: prose and code, like the default corpus.
SAMPLE_PROMPTS = ("The", "self.")
SAMPLE_NEW_TOKENS = 24


def unigram_entropy(batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Entropy (nats per token) of the frequency distribution of the predicted tokens in `batches`.

    Args:
        batches: held-out batches with `labels` (batch, seq); `-100` entries are not counted. The first label of each
            row is never predicted (the loss shifts by one), so it is left out as the loss leaves it out.
    """
    counts: torch.Tensor | None = None
    for batch in batches:
        # (rows * (seq - 1),): the targets the shifted loss predicts
        targets = batch["labels"][:, 1:].reshape(-1)
        targets = targets[targets != -100]
        batch_counts = torch.bincount(targets)
        if counts is None:
            counts = batch_counts
        else:
            size = max(len(counts), len(batch_counts))
            counts = torch.nn.functional.pad(counts, (0, size - len(counts)))
            counts += torch.nn.functional.pad(batch_counts, (0, size - len(batch_counts)))
    if counts is None or counts.sum() == 0:
        raise ValueError("No held-out tokens to compute the unigram entropy on; check the mixture's holdout_every.")
    probabilities = counts[counts > 0].double() / counts.sum()
    return float(-(probabilities * probabilities.log()).sum())


def held_out_unigram_entropy(mixture, tokenizer, *, seq_len: int, tokenized_dir: str | None = None) -> float:
    """`unigram_entropy` of `REFERENCE_TOKENS` held-out tokens of `mixture` (the stream the held-out loss reads).

    Args:
        mixture: the run's mixture name, path or config.
        tokenizer: the run's tokenizer.
        seq_len: the run's sequence length.
        tokenized_dir: the run's pre-tokenized shards, if any.
    """
    from genesis_hf.data import build_validation_batches

    batch_size = 8
    with warnings.catch_warnings():
        # A small held-out split repeats to fill the batches; repeating rows does not change the word frequencies.
        warnings.filterwarnings("ignore", message=".*validation rows repeat.*")
        batches = build_validation_batches(
            mixture,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            num_batches=math.ceil(REFERENCE_TOKENS / (batch_size * seq_len)),
            tokenized_dir=tokenized_dir,
        )
    return unigram_entropy(batches)


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: Iterable[str] = SAMPLE_PROMPTS, new_tokens: int = SAMPLE_NEW_TOKENS):
    """`{prompt: plain greedy continuation}` from `model` (KV cache on, no repetition penalty: what the model knows)."""
    samples = {}
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        samples[prompt] = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return samples


def end_of_run_report(eval_loss: float | None, unigram: float | None, samples: dict[str, str], output_dir) -> str:
    """The lines a finished run prints: held-out loss against the unigram reference, samples, the playground command.

    Args:
        eval_loss: the final held-out loss (nats per token).
        unigram: the unigram entropy of the held-out text (nats per token).
        samples: `{prompt: continuation}` from the final model.
        output_dir: the run folder.
    """
    lines = []
    if eval_loss is not None and unigram is not None and math.isfinite(eval_loss):
        below = unigram - eval_loss
        where = f"{below:.3f} nats below it" if below >= 0 else f"{-below:.3f} nats above it"
        verdict = "it learned from context" if below >= 1.0 else "little beyond word frequencies so far"
        lines.append(
            f"Held-out loss {eval_loss:.3f} nats/token vs {unigram:.3f} for word frequencies alone (the unigram "
            f"entropy of the held-out text): {where}, {verdict}."
        )
    for prompt, continuation in samples.items():
        lines.append(f"Sample (greedy) {prompt!r} -> {continuation!r}")
    # The console script next to this Python (the project's .venv), so the printed command runs as it is.
    script = Path(sys.executable).parent / "genesis-hf"
    command = str(script) if script.is_file() else "genesis-hf"
    lines.append(f"Watch it learn, checkpoint by checkpoint: {command} playground --runs {output_dir}")
    return "\n".join(lines)


__all__ = [
    "REFERENCE_TOKENS",
    "SAMPLE_PROMPTS",
    "end_of_run_report",
    "greedy_samples",
    "held_out_unigram_entropy",
    "unigram_entropy",
]
