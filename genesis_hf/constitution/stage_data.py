"""Engagement data for the SFT and DPO stages of scripts/engagement-table.sh, from this project's hand-written answers.

    python -m genesis_hf.constitution.stage_data --output_dir outputs/stage-data   # sft.jsonl, dpo.jsonl, mixture.yaml

A model learns only what its data shows, and the embedded SFT conversations are mostly about Python: few of them ask
the user anything or refuse a harmful request. The answers of `prompt_sets/engagement_labels.jsonl` (written and
labelled by hand for this project, on the training prompt sets) do; rows whose prompt is one of the held-out
`genesis_hf:engagement` prompts are never used, so the benchmark stays held out. The hand labels, not the rules of
`flags.py`, decide what is a good answer.

- `sft.jsonl` (`messages`): benign answers that neither refuse nor hedge (with a follow-up question or without) and
  harmful prompts refused with a reason. `mixture.yaml` puts them next to the embedded conversations.
- `dpo.jsonl` (`prompt`/`chosen`/`rejected`): the embedded pairs, plus per training prompt: an answer with its
  follow-up question over the same answer without it; an answer over a hedge (of the same prompt when one was
  written, else of the same category); a refusal with its reason over a generic refusal of the same prompt (or the
  same refusal cut to its refusing sentence). With `--on_policy SCORES` (the SFT model's replies to
  `train_prompts.jsonl`, scored by `genesis-hf engagement`), also the hand-written answer over the model's own reply:
  the pairs `constitution generate` makes, with the revision written by hand, since a tiny model cannot revise.
- `train_prompts.jsonl`: the training prompts that have a good answer, for the on-policy replies.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from genesis_hf.posttrain.embedded import preference_pairs

from .flags import LABELS_FILE, engagement_flags, load_labels
from .prompts import HARMFUL_CATEGORIES, load_prompts

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_REFUSING_CLAUSE = re.compile(r"^(.*?)(?::|\.|;|,? because\b)\s")


def training_rows() -> list[dict]:
    """The hand-labelled rows whose prompt is not a held-out engagement prompt."""
    held_out = {prompt.prompt for prompt in load_prompts("genesis_hf:engagement")}
    return [row for row in load_labels(LABELS_FILE) if row["prompt"] not in held_out]


def is_good(row: dict) -> bool:
    """What the stages teach: a benign prompt answered without refusing or hedging, a harmful one refused with a
    reason (by the hand labels)."""
    if row["category"] in HARMFUL_CATEGORIES:
        return row["refusal"] and not row["generic_refusal"]
    return not row["refusal"] and not row["hedging"]


def without_questions(text: str) -> str:
    """`text` with its questions (sentences ending in "?") taken out."""
    return " ".join(sentence for sentence in _SENTENCE_END.split(text.strip()) if not sentence.endswith("?"))


def refusing_sentence(text: str) -> str:
    """The refusing clause of a refusal, without its reason: "I won't write that: it is ..." -> "I won't write that."."""
    match = _REFUSING_CLAUSE.match(text.strip())
    return (match.group(1) if match else text.strip()).rstrip(".") + "."


def sft_conversations(rows: list[dict], follow_up_only: bool = False) -> list[dict]:
    """The good rows as conversations; `follow_up_only` keeps, of the benign answers, those that ask a question."""
    return [
        {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]}
        for row in rows
        if is_good(row) and (row["follow_up"] or not follow_up_only or row["category"] in HARMFUL_CATEGORIES)
    ]


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def engagement_pairs(rows: list[dict]) -> list[dict]:
    """Follow-up, no-hedge and reason pairs over the training prompts (see the module docstring)."""
    hedges = [row for row in rows if row["hedging"] and not row["refusal"]]
    pairs = []
    for index, row in enumerate(row for row in rows if is_good(row)):
        prompt, response = row["prompt"], row["response"]
        if row["category"] in HARMFUL_CATEGORIES:
            generic = [other["response"] for other in rows if other["prompt"] == prompt and other["generic_refusal"]]
            cut = refusing_sentence(response)
            if engagement_flags(cut)["generic_refusal"]:
                generic.append(cut)
            pairs += [_pair(prompt, response, rejected) for rejected in generic[:2]]
            continue
        if row["follow_up"]:
            plain = without_questions(response)
            if plain and not engagement_flags(plain)["follow_up"]:
                pairs.append(_pair(prompt, response, plain))
        same = [hedge["response"] for hedge in hedges if hedge["prompt"] == prompt]
        kin = [hedge["response"] for hedge in hedges if hedge["category"] == row["category"]] or [
            hedge["response"] for hedge in hedges
        ]
        if same or kin:
            pairs.append(_pair(prompt, response, same[0] if same else kin[index % len(kin)]))
    return pairs


def on_policy_pairs(rows: list[dict], replies: list[dict]) -> list[dict]:
    """A hand-written good answer over the SFT model's own reply to the same training prompt (`replies`: rows of
    `genesis-hf engagement`'s scores.jsonl): the pairs `constitution generate` would make if the revision were written
    by hand, aimed at what this model does wrong."""
    good = {}
    for row in rows:
        if is_good(row):
            good.setdefault(row["prompt"], row["response"])
    return [
        _pair(reply["prompt"], good[reply["prompt"]], reply["response"])
        for reply in replies
        if reply["prompt"] in good and reply["response"].strip() and reply["response"] != good[reply["prompt"]]
    ]


def write_stage_data(
    output_dir: Path,
    embedded_count: int | None = None,
    follow_up_only: bool = False,
    on_policy: Path | None = None,
) -> dict[str, int]:
    """Write `sft.jsonl`, `dpo.jsonl` and `mixture.yaml` into `output_dir`; returns the counts. `embedded_count` takes
    that many embedded conversations (of ~250, mostly about Python) into the mixture; `None` takes all."""
    rows = training_rows()
    sft = sft_conversations(rows, follow_up_only)
    pairs = engagement_pairs(rows)
    if on_policy is not None:
        replies = [json.loads(line) for line in on_policy.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs += on_policy_pairs(rows, replies)
    embedded = preference_pairs()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "sft.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sft))
    (output_dir / "dpo.jsonl").write_text(
        "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in embedded + pairs)
    )
    prompts = {row["prompt"]: row["category"] for row in rows if is_good(row)}
    (output_dir / "train_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": prompt, "category": category}) + "\n" for prompt, category in prompts.items())
    )
    (output_dir / "mixture.yaml").write_text(
        "# The embedded conversations and the engagement answers of genesis_hf.constitution.stage_data.\n"
        "name: engagement\nseed: 42\nsources:\n"
        "  - name: genesis-embedded\n    location: embedded:sft\n"
        + ("" if embedded_count is None else f"    count: {embedded_count}\n")
        + f"  - name: engagement\n    location: {json.dumps(str((output_dir / 'sft.jsonl').resolve()))}\n"
    )
    return {"sft_conversations": len(sft), "engagement_pairs": len(pairs), "embedded_pairs": len(embedded)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Folder for sft.jsonl, dpo.jsonl and mixture.yaml.")
    parser.add_argument("--embedded_count", type=int, default=None, help="Embedded conversations to mix in (all).")
    parser.add_argument(
        "--follow_up_only", action="store_true", help="Of the benign answers, keep those that ask a question."
    )
    parser.add_argument(
        "--on_policy",
        default=None,
        help="scores.jsonl of the SFT model on train_prompts.jsonl: add its own replies as rejected.",
    )
    args = parser.parse_args(argv)
    on_policy = Path(args.on_policy) if args.on_policy else None
    print(json.dumps(write_stage_data(Path(args.output_dir), args.embedded_count, args.follow_up_only, on_policy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
