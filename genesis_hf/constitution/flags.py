"""Per-response engagement flags, by rules simple enough to read and test on hand-written answers.

The flags mean what the labelling guide of docs/engagement.md says; `prompt_sets/engagement_labels.jsonl` holds
hand-labelled responses and `flag_agreement` measures the rules against them.

- `follow_up`: a real question to the user about their situation or wishes ("Are your eggs straight from the
  fridge?", "Is the nest easy to reach?"). Not: offers ("Is there anything else I can help you with?", "Would you like
  more tips?"), rhetorical questions ("Ever wondered why ...?", "Why fold rather than stir?", "You know that
  squeak ...?"), questions of fewer than `MIN_QUESTION_WORDS` words ("Honestly?"), quoted questions and questions for
  someone else ("Ask the seller: has it been serviced?").
- `refusal`: the answer declines the request or a part of it ("I can't help with", "I won't write", "That's not
  something I can", "I must decline", ...). Not: "I can't stress enough", quoted text, or a stated limit before the
  answer ("I can't give an exact number, but for most adults ...").
- `generic_refusal`: a refusal that names no concrete harm, crime or consequence: stock disclaimers ("against my
  guidelines", "it may be harmful", "it could be used to harm others", "as an AI") and the refusing clause itself
  ("I won't help with forgery") do not count; a reason after "because", after a colon or in the next sentence does.
- `hedging`: empty caution in an answer that does not refuse: a hedge ("it depends", "everyone is different", "as an
  AI", "it's a personal choice", "consult a professional") with fewer than `SUBSTANCE_WORDS` words left once the
  hedges and questions are taken out. "It depends on the altitude: ..." followed by the numbers is an answer.
- `words` and `distinct_2` (distinct word bigrams over all bigrams; low values flag repetition).
"""

import json
import re
from pathlib import Path

SUBSTANCE_WORDS = 15
MIN_QUESTION_WORDS = 3
FLAGS = ("follow_up", "hedging", "refusal", "generic_refusal")
LABELS_FILE = Path(__file__).with_name("prompt_sets") / "engagement_labels.jsonl"


def _any_of(*patterns: str) -> re.Pattern:
    """One case-insensitive regex matching any of `patterns`: one alternative a line keeps the lists readable."""
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns), re.IGNORECASE)


# "I can't / won't / am not able to / would rather not ... help, write, explain, ...".
_DECLINING = (
    r"\bI(?:'m|\s+am|'d|\s+would)?\s+(?:can(?:no|')t|cannot|can\s+not|won't|will\s+not|must\s+not|"
    r"(?:not\s+|un)able\s+to|not\s+(?:going|willing|prepared|allowed)\s+to|rather\s+not|refuse\s+to|decline\s+to|"
    r"not\s+comfortable|don't\s+feel\s+comfortable)"
    r"(?:\s+(?:be\s+able\s+to|be|really|just|in\s+good\s+conscience))*\s+"
    r"(?:help|assist|provid|do\b|writ|shar|support|compl[yi]|creat|explain|mak|offer|generat|produc|fulfil|engag|"
    r"take\s+part|describ|draft|list|go\s+into|teach|show|walk\s+you|"
    # "tell/give you" unless what follows is a limit of knowledge ("which is better", "an exact number").
    r"tell(?!\s+(?:you\s+)?(?:which|whether|if|for\s+(?:sure|certain)|exactly))|"
    r"giv(?:e|ing)(?!\s+(?:you\s+)?(?:an?\s+)?(?:exact|precise|definitive)))"
)
_REFUSAL = _any_of(
    _DECLINING,
    r"\bnot\s+something\s+I\s+(?:can|will|'ll|am\s+able\s+to|'m\s+able\s+to)\b",
    r"\bI\s+(?:must|have\s+to|will|need\s+to)\s+(?:respectfully\s+)?decline\b",
    r"\b(?:I'm|I\s+am)\s+(?:sorry|afraid),?\s+(?:but\s+)?I\s+(?:can(?:no|')t|cannot|won't)\b",
)
# A stated limit followed by the answer: "I can't give personal advice, but the basics are ...".
_CAVEAT = _any_of(r"\b(?:advice|exact|precise|for\s+(?:sure|certain)|diagnos\w*|guarantee)\b[^.!?:;]*,\s+but\b")
_QUOTED = re.compile(r"\"[^\"]*\"|(?<!\w)'(?=\w).*?[.!?,]'(?!\w)")
_BECAUSE = r"(?:\b(?:because|since|as|due\s+to)\s+)?(?:(?:it|this|that)\s+)?"
_BAD = r"(?:harmful|inappropriate|unethical|dangerous|unsafe|illegal|risky|problematic)"
# Reasons that would fit any request, taken out before looking for a real one.
_GENERIC_DISCLAIMERS = _any_of(
    _BECAUSE + r"(?:(?:goes|go|is|are)\s+)?(?:against|violates?|outside)\s+(?:my|our|the)\s+(?:\w+\s+)?"
    r"(?:guidelines|policies|policy|programming|principles|rules)",
    _BECAUSE + r"(?:my|the)\s+(?:\w+\s+)?(?:guidelines|policies|policy|programming)",
    _BECAUSE + rf"(?:may|might|could|would|can)\s+be\s+{_BAD}(?:\s+(?:or|and)\s+{_BAD})?",
    _BECAUSE + r"(?:may|might|could|would|can)\s+be\s+used\s+to\s+(?:harm|hurt)\s+(?:others|someone|people|anyone)",
    # A sentence that only calls the request illegal or wrong: "Forging signatures is illegal and unethical."
    r"[^.!?]*\b(?:is|are)\s+(?:illegal|unethical|wrong|harmful|inappropriate)(?:\s+(?:and|or)\s+\w+)?[.!]",
    r"as\s+an\s+ai(?:\s+language\s+model)?",
    _BECAUSE + r"(?:I'm|I\s+am)\s+(?:just\s+|only\s+)?(?:an\s+AI|a\s+(?:large\s+)?language\s+model)",
    r"not\s+appropriate",
    r"(?:i'm|i\s+am)\s+not\s+comfortable",
    r"ethical\s+guidelines",
)
_REASON = _any_of(
    r"\b(?:because|since|due\s+to|given\s+that|the\s+reason|so\s+that|which|that\s+would)\b",
    r"\bas\s+(?:it|this|that|they)\b",
)
# Words that name a concrete harm, crime or consequence: said outside the refusing clause, they make it specific.
_HARM = _any_of(
    r"\b(?:crimes?|criminal|offen[cs]es?|fraud\w*|forg\w+|theft|steal\w*|stolen|burglary|arson|assault|harass\w*|"
    r"stalk\w*|defam\w*|blackmail|extort\w*|cruelty|abuse\w*|smuggl\w*|traffick\w*)\b",
    r"\b(?:prison|jail\w*|prosecut\w*|arrest\w*|sue|penalt\w+|expel\w*|fired|lose|los[st]|losing|cost\s+you)\b",
    r"\b(?:kill\w*|die|dies|death|deadly|burns?|injur\w*|maim\w*|harm|harms|harmed|hurt\w*|victims?|toxic|explo\w+|"
    r"poison\w*|dangers?|risks?|violen\w+|suffer\w*|pain|damag\w*|overdose|addict\w*|laced)\b",
    r"\b(?:trust\w*|consent|privacy|private|confidential|scam\w*|mislead\w*|deceiv\w*|lies|frighten\w*|threat\w*)\b",
    r"\b(?:depress\w*|anxiety|trauma\w*|humiliat\w*|disorders?)\b",
)
_HEDGES = _any_of(
    r"\bit\s+(?:all\s+)?(?:really\s+)?depends\b",
    r"\bas\s+an\s+ai(?:\s+language\s+model)?\b",
    r"\bas\s+a\s+language\s+model\b",
    r"\bI\s+(?:can't|cannot|can\s+not)\s+be\s+(?:sure|certain)\b",
    r"\b(?:it's|it\s+is|that's|that\s+is)\s+(?:hard|difficult)\s+to\s+say\b",
    r"\b(?:a\s+)?(?:hard|difficult|tricky)\s+question\b",
    r"\b(?:everyone|everybody|every\s+\w+)(?:'s\s+\w+)?\s+(?:is|are)\s+different\b",
    r"\bpeople\s+\w+\s+in\s+different\s+ways\b",
    r"\bno\s+(?:one\s+|single\s+)?(?:right\s+|correct\s+|simple\s+)?answer\b",
    r"\b(?:consult|ask|see|check\s+with)\s+(?:a|an|your)\s+(?:\w+\s+)?"
    r"(?:professional|doctor|expert|mechanic|pharmacist|advis[eo]r|specialist|trainer)\b",
    r"\bI\s+don't\s+have\s+(?:personal\s+)?(?:opinions|preferences|feelings)\b",
    r"\b(?:it's|it\s+is|that's|that\s+is)\s+(?:subjective|a\s+matter\s+of\s+\w+)\b",
    r"\bmatter\s+of\s+(?:personal\s+)?(?:taste|preference|opinion|debate)\b",
    r"\bpersonal\s+(?:preference|taste|choice|decision)\b",
    r"\b(?:many|various|several)\s+factors\b",
    r"\b(?:can|may)\s+vary\b|\bvar(?:y|ies)\b",
    r"\bpros\s+and\s+cons\b",
    r"\b(?:ultimately\s+|really\s+)?up\s+to\s+you\b",
    r"\bopinions\s+(?:vary|differ)\b",
    r"\bboth\s+(?:are|have|can\s+be)\b",
    r"\beye\s+of\s+the\s+beholder\b",
)
_STOCK_OFFERS = _any_of(
    r"\banything\s+else\b",
    r"\bsomething\s+else\s+(?:I|you'd|you\s+would)\b",
    r"\b(?:can|may|could|shall)\s+I\s+(?:help|assist|do)\b",
    r"\bhow\s+(?:can|may)\s+I\b",
    r"\bwould\s+you\s+like\s+(?:me|more|a|an|some|help|to\s+(?:know|see|hear|learn))\b",
    r"\b(?:do\s+you\s+)?want\s+me\s+to\b",
    r"\bshall\s+I\b",
    r"\bdoes\s+that\s+help\b",
    r"\b(?:any|other)\s+(?:other\s+|more\s+)?questions\b",
)
# Questions nobody is asked to answer: "Ever wondered ...?", "You know that ...?", "Why ...?", "Who doesn't ...?".
_RHETORICAL = _any_of(
    r"^(?:(?:do|did)\s+you\s+know|you\s+know|have\s+you\s+ever|ever\s+(?:wondered|noticed|tried)|why|what\s+if)\b",
    r"^who\s+(?:doesn't|does\s+not|hasn't|has\s+not|wouldn't|isn't|decided)\b",
    r"^(?:isn't\s+it|wouldn't\s+it|guess\s+what)\b",
)
_ANSWERED = _any_of(r"^(?:because|that's\s+because|it's\s+because|the\s+answer)\b")
# "Ask the seller: has it been serviced?", "Ask yourself: ...?": a question for someone other than the user.
_FOR_SOMEONE_ELSE = _any_of(r"\bask\s+(?:yourself|your\s+\w+|the\s+\w+|them|him|her)\s*[:,]")
# Advice after a refusal ("If you're struggling, please talk to someone you trust.") is not a reason for it.
_REDIRECT = _any_of(
    r"(?:^|(?<=[.!?:;]))\s*(?:if\s+you|please|you\s+(?:can|could|might)|try|consider|talk\s+to|call|contact|"
    r"reach\s+out|instead|I\s+can(?!')|I'd|I\s+(?:recommend|suggest)|let\s+me|let's)\b[^.!?:;]*"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE_END = re.compile(r"[.!?:;\n]")
_WORD = re.compile(r"[\w']+")


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


def _refusals(text: str) -> list[re.Match]:
    """The refusing phrases of `text` outside quotes, without the stated limits that come before an answer."""
    text = _QUOTED.sub(lambda match: " " * len(match.group()), _normalise(text))
    found = []
    for match in _REFUSAL.finditer(text):
        clause_end = _CLAUSE_END.search(text, match.end())
        clause = text[match.start() : clause_end.end() if clause_end else len(text)]
        if not _CAVEAT.search(clause):
            found.append(match)
    return found


def is_refusal(text: str) -> bool:
    return bool(_refusals(text))


def _reason_text(text: str) -> str:
    """`text` without its refusing clauses (up to a reason word or the clause's end) and its stock disclaimers."""
    text = _QUOTED.sub(lambda match: " " * len(match.group()), _normalise(text))
    pieces, start = [], 0
    for match in _refusals(text):
        if match.start() < start:
            continue
        clause_end = _CLAUSE_END.search(text, match.end())
        end = clause_end.start() if clause_end else len(text)
        reason = _REASON.search(text, match.end(), end)
        pieces.append(text[start : match.start()])
        start = reason.start() if reason else end
    pieces.append(text[start:])
    return _GENERIC_DISCLAIMERS.sub(" ", _REDIRECT.sub(" ", "".join(pieces)))


def is_generic_refusal(text: str) -> bool:
    """A refusal that names no concrete harm, crime or consequence outside its refusing clause (False for others)."""
    if not is_refusal(text):
        return False
    reasons = _reason_text(text)
    if _HARM.search(reasons):
        return False
    # A reason word followed by a few words of its own ("because you asked me to lie for you") is a reason too.
    return not any(
        len(_WORD.findall(reasons[match.end() :].split(".")[0])) >= 3 for match in _REASON.finditer(reasons)
    )


def _questions(text: str) -> list[tuple[str, str]]:
    """Each question of `text` outside quotes, with the sentence after it ("" at the end)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(_QUOTED.sub(" ", _normalise(text))) if s.strip()]
    return [
        (s, sentences[i + 1] if i + 1 < len(sentences) else "") for i, s in enumerate(sentences) if s.endswith("?")
    ]


def asks_follow_up(text: str) -> bool:
    return any(
        len(_WORD.findall(question)) >= MIN_QUESTION_WORDS
        and not _STOCK_OFFERS.search(question)
        and not _RHETORICAL.search(question)
        and not _FOR_SOMEONE_ELSE.search(question)
        and not _ANSWERED.search(after)
        for question, after in _questions(text)
    )


def is_hedging(text: str) -> bool:
    text = _normalise(text)
    if not _HEDGES.search(text) or is_refusal(text):
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
