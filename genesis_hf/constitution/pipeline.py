"""Critique and revise (Bai et al. 2022, "Constitutional AI"), resumable, on a model you run yourself.

For every prompt and sample: the model answers; then, `rounds` times, a principle is drawn, the model critiques its
current answer against it and revises it. Each finished item is one row of `<output_dir>/rows.jsonl` with the
prompt, its category, the original answer, every round's principle, critique and revision, the final answer, the
model and the constitution. Rows are appended atomically (see `rows`), so a relaunch of the same command reads what
is there and generates only the missing items: no duplicate, no gap. `sft.jsonl`, `dpo.jsonl` and `summary.json` are
rebuilt from all rows at the end of every run.

A principle is drawn by a generator seeded with (seed, item, round), so which principle an item gets does not depend
on batch composition or on where a previous run stopped.
"""

import dataclasses
import hashlib
import json
import os
import random
import zlib
from collections import Counter, defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .backends import Conversation
from .flags import engagement_flags
from .pairs import parse_judgement
from .principles import Constitution, Principle
from .prompts import Prompt
from .rows import RowsError, append_rows, read_rows

ROWS_FILE = "rows.jsonl"
RUN_FILE = "run.json"

JUDGE_TEMPLATE = (
    "Principle: {principle}\n\nA user asked: {prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
    "Which answer follows the principle better? Reply with the single letter A or B."
)


@dataclasses.dataclass(frozen=True)
class WorkItem:
    id: str
    prompt: Prompt
    sample: int


def work_items(prompts: list[Prompt], num_samples: int) -> list[WorkItem]:
    """One item per (prompt, sample); the id is the prompt's position and the sample number."""
    return [
        WorkItem(f"{index:06d}-{sample}", prompt, sample)
        for index, prompt in enumerate(prompts)
        for sample in range(num_samples)
    ]


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    payload = json.dumps([[prompt.prompt, prompt.category] for prompt in prompts]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def check_run_file(output_dir: Path, settings: dict) -> None:
    """Record the settings that shape the rows; refuse to resume a run made with different ones."""
    path = output_dir / RUN_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RowsError(
                f"{path} is not valid JSON (edited by hand?); restore it or use a new --output_dir."
            ) from None
        changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
            raise RowsError(
                f"{output_dir} holds rows made with other settings ({details}); relaunch with the same flags to "
                "resume, or pass a new --output_dir."
            )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    # Written whole and renamed into place: a kill here must not leave a half file that blocks every relaunch.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(temporary, path)


def pending_items(rows_path: Path, items: list[WorkItem]) -> list[WorkItem]:
    """The items without a row yet; raises if the rows file holds duplicates or ids this run does not know."""
    counts = Counter(row.get("id") for row in read_rows(rows_path))
    duplicated = [item_id for item_id, count in counts.items() if count > 1]
    unknown = set(counts) - {item.id for item in items}
    if duplicated or unknown:
        raise RowsError(
            f"{rows_path} holds duplicated ids {sorted(duplicated)[:5]} or ids not in this prompt set "
            f"{sorted(unknown, key=str)[:5]}; it was edited or mixed with another run. Use a new --output_dir."
        )
    return [item for item in items if item.id not in counts]


def draw_principle(constitution: Constitution, item: WorkItem, round_index: int, seed: int) -> Principle:
    candidates = constitution.principles_for(item.prompt.category)
    return random.Random(f"{seed}:{item.id}:{round_index}").choice(candidates)


def few_shot_turns(constitution: Constitution, num_few_shot: int) -> Conversation:
    """Each example as a worked conversation: question, answer, critique request, critique, revision request, revision."""
    examples = constitution.few_shot if num_few_shot < 0 else constitution.few_shot[:num_few_shot]
    turns = []
    for example in examples:
        principle = constitution.principle(example.principle)
        turns += [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.answer},
            {"role": "user", "content": principle.critique_request},
            {"role": "assistant", "content": example.critique},
            {"role": "user", "content": principle.revision_request},
            {"role": "assistant", "content": example.revision},
        ]
    return turns


def _stage_seed(seed: int, items: list[WorkItem], stage: str) -> int:
    return zlib.crc32(f"{seed}:{items[0].id}:{stage}".encode())


def _judge(backend, items: list[WorkItem], originals: list[str], finals: list[str], principles, seed: int) -> list:
    """AI feedback: which of the two answers follows the principle better (`revision`, `original` or `None`)."""
    conversations, revision_first = [], []
    for item, original, final, principle in zip(items, originals, finals, principles):
        first_is_revision = random.Random(f"{seed}:{item.id}:judge").random() < 0.5
        first, second = (final, original) if first_is_revision else (original, final)
        text = JUDGE_TEMPLATE.format(
            principle=principle.summary, prompt=item.prompt.prompt, first=first, second=second
        )
        conversations.append([{"role": "user", "content": text}])
        revision_first.append(first_is_revision)
    verdicts = []
    for reply, first_is_revision in zip(
        backend.chat(conversations, seed=_stage_seed(seed, items, "judge")), revision_first
    ):
        letter = parse_judgement(reply)
        verdicts.append(
            None if letter is None else ("revision" if (letter == "A") == first_is_revision else "original")
        )
    return verdicts


def process_items(backend, constitution: Constitution, items: list[WorkItem], config) -> list[dict]:
    """Answer, then critique and revise `config.rounds` times, for a batch of items; returns their rows."""
    examples = few_shot_turns(constitution, config.num_few_shot)
    questions = [[{"role": "user", "content": item.prompt.prompt}] for item in items]
    originals = backend.chat(questions, seed=_stage_seed(config.seed, items, "answer"))
    current, history, principles = list(originals), [[] for _ in items], []
    for round_index in range(config.rounds):
        principles = [draw_principle(constitution, item, round_index, config.seed) for item in items]
        critique_chats = [
            examples
            + question
            + [{"role": "assistant", "content": answer}, {"role": "user", "content": p.critique_request}]
            for question, answer, p in zip(questions, current, principles)
        ]
        critiques = backend.chat(critique_chats, seed=_stage_seed(config.seed, items, f"critique{round_index}"))
        revision_chats = [
            chat + [{"role": "assistant", "content": critique}, {"role": "user", "content": p.revision_request}]
            for chat, critique, p in zip(critique_chats, critiques, principles)
        ]
        revisions = backend.chat(revision_chats, seed=_stage_seed(config.seed, items, f"revision{round_index}"))
        for steps, p, critique, revision in zip(history, principles, critiques, revisions):
            steps.append({"principle": p.name, "critique": critique, "revision": revision})
        current = revisions
    verdicts = [None] * len(items)
    if config.dpo_mode == "judge":
        verdicts = _judge(backend, items, originals, current, principles, config.seed)
    return [
        {
            "id": item.id,
            "prompt": item.prompt.prompt,
            "category": item.prompt.category,
            "sample": item.sample,
            "principle": steps[-1]["principle"],
            "critique": steps[-1]["critique"],
            "original": original,
            "final": final,
            "rounds": steps,
            "judge": verdict,
            "model": backend.name,
            "constitution": f"{constitution.name} v{constitution.version} ({constitution.fingerprint})",
        }
        for item, original, final, steps, verdict in zip(items, originals, current, history, verdicts)
    ]


def generate_rows(backend, constitution: Constitution, pending: list[WorkItem], rows_path: Path, config, total: int):
    """Process `pending` in batches of `config.batch_size`, appending each batch's rows as soon as it is done."""
    with tqdm(total=total, initial=total - len(pending), desc="constitution", unit="row") as progress:
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start : start + config.batch_size]
            append_rows(rows_path, process_items(backend, constitution, batch, config))
            progress.update(len(batch))


def principle_summary(rows: list[dict], kept_reasons: list[str | None]) -> dict:
    """Per principle (of the last round): rows, pairs kept, mean words and follow-up/hedging/refusal rates before/after."""
    groups = defaultdict(list)
    for row, reason in zip(rows, kept_reasons):
        groups[row["principle"]].append((row, reason))
    summary = {}
    for name, members in sorted(groups.items()):
        before = [engagement_flags(row["original"]) for row, _ in members]
        after = [engagement_flags(row["final"]) for row, _ in members]
        entry = {"rows": len(members), "dpo_pairs": sum(reason is None for _, reason in members)}
        for key in ("words", "follow_up", "hedging", "refusal"):
            entry[f"{key}_original"] = round(sum(flags[key] for flags in before) / len(members), 3)
            entry[f"{key}_final"] = round(sum(flags[key] for flags in after) / len(members), 3)
        summary[name] = entry
    return summary


__all__ = [
    "ROWS_FILE",
    "RUN_FILE",
    "WorkItem",
    "check_run_file",
    "draw_principle",
    "few_shot_turns",
    "generate_rows",
    "pending_items",
    "principle_summary",
    "process_items",
    "prompts_fingerprint",
    "work_items",
]
