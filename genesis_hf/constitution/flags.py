"""Per-response engagement flags, by rules simple enough to read and test on hand-written answers.

- `follow_up`: a sentence ending in "?" that addresses the user ("you", "your"), not a stock offer such as "Is there
  anything else I can help you with?".
- `refusal`: the answer declines ("I can't help with", "I won't write", "I must decline", ...).
- `generic_refusal`: a refusal that gives no specific reason: no "because", "since", "which would", ..., once stock
  disclaimers ("against my guidelines", "it may be harmful", "as an AI") are taken out.
- `hedging`: empty caution: a hedge ("it depends", "as an AI", "I can't be sure", "everyone is different") with fewer
  than `SUBSTANCE_WORDS` words left once the hedges and questions are taken out. "It depends on the altitude: ..."
  followed by the numbers is an answer, not a hedge.
- `words` and `distinct_2` (distinct word bigrams over all bigrams; low values flag repetition).
"""

import json
import re
from pathlib import Path

SUBSTANCE_WORDS = 15
FLAGS = ("follow_up", "hedging", "refusal", "generic_refusal")
LABELS_FILE = Path(__file__).with_name("prompt_sets") / "engagement_labels.jsonl"

_REFUSAL = re.compile(
    r"\bI(?:'m|\s+am)?\s+(?:can(?:no|')t|cannot|won't|will\s+not|(?:not\s+able|unable)\s+to|not\s+going\s+to|"
    r"refuse\s+to|decline\s+to)\s+(?:help|assist|provide|do|write|give|share|support|comply|create|tell|explain|make|"
    r"offer|generate|produce|fulfil+|engage|take\s+part)\b"
    r"|\bI\s+(?:must|have\s+to|will|need\s+to)\s+decline\b"
    r"|\b(?:I'm|I\s+am)\s+(?:sorry|afraid),?\s+but\s+I\s+(?:can(?:no|')t|cannot|won't)\b",
    re.IGNORECASE,
)
_GENERIC_DISCLAIMERS = re.compile(
    r"against\s+my\s+(?:guidelines|policies|policy|programming|principles)|as\s+an\s+ai(?:\s+language\s+model)?|"
    r"(?:may|might|could)\s+be\s+(?:harmful|inappropriate|unethical|dangerous)|not\s+appropriate|"
    r"(?:i'm|i\s+am)\s+not\s+comfortable",
    re.IGNORECASE,
)
_REASON = re.compile(
    r"\b(?:because|since|due\s+to|given\s+that|the\s+reason|so\s+that|as\s+(?:it|this|that)\s+(?:would|could|is|can|"
    r"will)|which\s+(?:would|could|can|is|means)|that\s+(?:would|could)|it\s+(?:would|could|is|can)\s+(?:be\s+)?"
    r"(?:illegal|used|harm|hurt|dangerous|put|cause|let|give|expose|enable))\b",
    re.IGNORECASE,
)
_HEDGES = re.compile(
    r"\bit\s+(?:all\s+)?depends\b|\bas\s+an\s+ai(?:\s+language\s+model)?\b|\bas\s+a\s+language\s+model\b|"
    r"\bI\s+(?:can't|cannot|can\s+not)\s+be\s+(?:sure|certain)\b|\b(?:it's|it\s+is)\s+(?:hard|difficult)\s+to\s+say\b|"
    r"\beveryone\s+is\s+different\b|\bthere\s+(?:is|'s)\s+no\s+(?:one|single|right)\s+answer\b|"
    r"\b(?:consult|ask)\s+a\s+professional\b|\bI\s+don't\s+have\s+(?:personal\s+)?(?:opinions|preferences|feelings)\b|"
    r"\b(?:it's|it\s+is)\s+subjective\b|\b(?:many|various|several)\s+factors\b|\b(?:can|may)\s+vary\b",
    re.IGNORECASE,
)
_STOCK_OFFERS = re.compile(
    r"anything\s+else|something\s+else|(?:can|may|could)\s+I\s+(?:help|assist)|how\s+(?:can|may)\s+I\s+(?:help|assist)",
    re.IGNORECASE,
)
_SECOND_PERSON = re.compile(r"\b(?:you|your|yours|you're|you've|you'd|you'll)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[\w']+")


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(_normalise(text)))


def is_generic_refusal(text: str) -> bool:
    """A refusal with no specific reason once stock disclaimers are taken out (False for non-refusals)."""
    text = _normalise(text)
    return is_refusal(text) and not _REASON.search(_GENERIC_DISCLAIMERS.sub(" ", text))


def asks_follow_up(text: str) -> bool:
    sentences = [sentence.strip() for sentence in _SENTENCE_END.split(_normalise(text))]
    return any(
        sentence.endswith("?") and _SECOND_PERSON.search(sentence) and not _STOCK_OFFERS.search(sentence)
        for sentence in sentences
    )


def is_hedging(text: str) -> bool:
    text = _normalise(text)
    if not _HEDGES.search(text):
        return False
    sentences = [
        sentence for sentence in _SENTENCE_END.split(_HEDGES.sub(" ", text)) if not sentence.strip().endswith("?")
    ]
    return sum(len(_WORD.findall(sentence)) for sentence in sentences) < SUBSTANCE_WORDS


def distinct_2(text: str) -> float:
    words = [word.lower() for word in _WORD.findall(text)]
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def engagement_flags(text: str) -> dict:
    """The flags of one response: `follow_up`, `hedging`, `refusal`, `generic_refusal`, `words`, `distinct_2`."""
    refusal = is_refusal(text)
    return {
        "follow_up": asks_follow_up(text),
        "hedging": is_hedging(text),
        "refusal": refusal,
        "generic_refusal": refusal and is_generic_refusal(text),
        "words": len(_WORD.findall(text)),
        "distinct_2": round(distinct_2(text), 4),
    }


def load_labels(path: str | Path = LABELS_FILE) -> list[dict]:
    """Hand-labelled responses: `prompt`, `category`, `response`, a boolean per flag and `split` (tune, held_out)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def flag_agreement(rows: list[dict]) -> dict:
    """How the rules agree with the hand labels of `rows`: per flag, precision, recall and the counts behind them.

    Precision (recall) is None when the rules (the labels) mark no row, as there is nothing to be right about.
    """
    predicted = [engagement_flags(row["response"]) for row in rows]
    result = {}
    for flag in FLAGS:
        pairs = [(bool(flags[flag]), bool(row[flag])) for flags, row in zip(predicted, rows)]
        true_positive = sum(guess and label for guess, label in pairs)
        flagged, positive = sum(guess for guess, _ in pairs), sum(label for _, label in pairs)
        result[flag] = {
            "precision": round(true_positive / flagged, 4) if flagged else None,
            "recall": round(true_positive / positive, 4) if positive else None,
            "n": len(pairs),
            "n_positive": positive,
            "n_flagged": flagged,
            "false_positives": flagged - true_positive,
            "false_negatives": positive - true_positive,
        }
    return result


def agreement_table(rows: list[dict]) -> str:
    """A markdown table of `flag_agreement` on each split of `rows` (tune, held_out) and on all of them."""
    splits = sorted({row.get("split", "all") for row in rows}, key=lambda name: (name != "tune", name))
    groups = [(name, [row for row in rows if row.get("split", "all") == name]) for name in splits]
    if len(groups) > 1:
        groups.append(("all", rows))
    lines = ["| split | flag | precision | recall | positives | flagged |", "|---|---|---|---|---|---|"]
    for name, group in groups:
        for flag, entry in flag_agreement(group).items():
            cells = ["-" if entry[key] is None else f"{entry[key]:.3f}" for key in ("precision", "recall")]
            lines.append(
                f"| {name} ({len(group)}) | {flag} | {cells[0]} | {cells[1]} | {entry['n_positive']} | "
                f"{entry['n_flagged']} |"
            )
    return "\n".join(lines) + "\n"
