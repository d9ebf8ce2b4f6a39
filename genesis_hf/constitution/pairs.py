"""From generated rows to training files: `sft.jsonl` (`messages`) and `dpo.jsonl` (`prompt`/`chosen`/`rejected`).

Both are TRL's conversational formats, so `recipes/sft.py` and `recipes/dpo.py` (and TRL's own scripts) read them as
they are. A DPO pair prefers the final revision over the original answer, or, with AI feedback, whichever answer the
model judged to follow the principle better.

Anti-hedging data has a known failure: a DPO model that learns "never decline" turns snarky or helps with anything.
`pair_or_reason` guards against it: a pair on a harmful prompt (or drawn for `refuse_specifically`) is kept only if
its chosen answer is still a refusal and a specific one; a pair on a benign prompt is dropped when the revision
turned a real answer into a refusal. Dropped pairs are counted by reason in the summary.
"""

from .flags import is_generic_refusal, is_refusal

REFUSE_SPECIFICALLY = "refuse_specifically"


def sft_example(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["final"]}]}


def chosen_and_rejected(row: dict) -> tuple[str, str]:
    """The revision over the original, unless the AI-feedback judge preferred the original."""
    if row.get("judge") == "original":
        return row["original"], row["final"]
    return row["final"], row["original"]


def pair_or_reason(row: dict, harmful_categories: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """The DPO example of `row`, or `None` and the reason it is dropped."""
    chosen, rejected = chosen_and_rejected(row)
    if not chosen.strip() or not rejected.strip():
        return None, "empty answer"
    if chosen.strip() == rejected.strip():
        return None, "revision identical to the original"
    must_refuse = row.get("category") in harmful_categories or row.get("principle") == REFUSE_SPECIFICALLY
    if must_refuse and not is_refusal(chosen):
        return None, "harmful prompt: chosen answer does not refuse"
    if must_refuse and is_generic_refusal(chosen):
        return None, "harmful prompt: chosen refusal is generic"
    if not must_refuse and is_refusal(chosen) and not is_refusal(rejected):
        return None, "benign prompt: chosen answer refuses"
    example = {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    return example, None


def parse_judgement(text: str) -> str | None:
    """`A` or `B` from a judge's reply ("A", "Answer B.", "B is better"), `None` when it names neither or both."""
    words = {word.strip(".,:;!()*\"'").upper() for word in text.split()[:8]}
    picked = words & {"A", "B"}
    return picked.pop() if len(picked) == 1 else None
