"""Turn rows of the common instruction-data schemas into `messages` conversations, and check them.

Schemas recognised (by their columns; `schema:` in a mixture source names one explicitly):

| schema | columns | used by |
|---|---|---|
| `messages` | `messages: [{role, content}]` | SmolTalk, Tulu 3 SFT mixture, the constitution pipeline |
| `sharegpt` | `conversations: [{from, value}]` (`human`/`gpt`/`system`) | OpenHermes-2.5 |
| `instruction` | `instruction`, optional `input`, `output` (or `response`) | Alpaca-style sets |
| `query` | `query`, `response` | MetaMathQA |
| `prompt_completion` | `prompt`, `completion` (strings) | TRL's prompt-completion format |

A conversation is valid when every role is `system`, `user` or `assistant`, a system message only comes first, every
content is a string, no assistant turn is empty and the last turn is the assistant's. Bad rows raise
`ConversationError` naming the row and the fix, or are skipped and counted (`on_bad_example="skip"`).
"""

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

ROLES = ("system", "user", "assistant")
SCHEMAS = ("messages", "sharegpt", "instruction", "query", "prompt_completion")
BAD_EXAMPLE_POLICIES = ("error", "skip")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(ValueError):
    """A row cannot become a valid conversation; the message names the row, the problem and the fix."""


def detect_schema(columns: Iterable[str]) -> str:
    """The schema of a dataset from its column names.

    Raises:
        ConversationError: no known schema fits; the message lists the columns found.
    """
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and ({"output", "response"} & columns):
        return "instruction"
    if {"query", "response"} <= columns:
        return "query"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    raise ConversationError(
        f"Cannot convert a dataset with columns {sorted(columns)} to conversations. Known schemas: messages "
        "(messages), sharegpt (conversations with from/value), instruction (instruction, input, output), query "
        "(query, response), prompt_completion (prompt, completion). Rename the columns to those of one schema "
        "(e.g. with datasets' rename_column, or in the file)."
    )


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value)


def to_messages(row: dict[str, Any], schema: str) -> list[dict[str, str]]:
    """Convert one row of `schema` to a list of `{"role", "content"}` messages (not yet validated)."""
    if schema == "messages":
        return [{"role": message.get("role"), "content": message.get("content")} for message in row["messages"]]
    if schema == "sharegpt":
        messages = []
        for turn in row["conversations"]:
            speaker = turn.get("from")
            messages.append({"role": _SHAREGPT_ROLES.get(speaker, speaker), "content": turn.get("value")})
        return messages
    if schema == "instruction":
        prompt = _text(row, "instruction").strip()
        extra = _text(row, "input").strip()
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        answer = row.get("output", row.get("response"))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        system = _text(row, "system").strip()
        return ([{"role": "system", "content": system}] if system else []) + messages
    if schema == "query":
        return [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": row["response"]}]
    if schema == "prompt_completion":
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    raise ConversationError(f"Unknown schema {schema!r}; use one of {', '.join(SCHEMAS)}.")


def conversation_problem(messages: list[dict[str, Any]]) -> str | None:
    """Why `messages` is not a trainable conversation, or `None` when it is."""
    if not messages:
        return "it has no messages"
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {index} has unknown role {role!r} (valid roles: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"message {index} ({role}) has content of type {type(content).__name__}, not a string"
        if role == "system" and index != 0:
            return f"message {index} is a system message after the first turn"
        if role == "assistant" and not content.strip():
            return f"message {index} is an empty assistant turn"
    if messages[-1]["role"] != "assistant":
        return f"it ends with a {messages[-1]['role']} turn instead of the assistant's reply"
    if not any(message["role"] == "user" for message in messages):
        return "it has no user turn"
    return None


class SkipCounter(Counter):
    """Rows skipped, by reason (`"unknown role"`, `"too long"`, ...)."""

    def describe(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in sorted(self.items())) or "none"


def conversation_reason(problem: str) -> str:
    """The short reason of a `conversation_problem` (`"unknown role"`, `"empty assistant"`, ...), to count skips by."""
    for key in ("unknown role", "empty assistant", "ends with", "no messages", "no user", "system message", "content"):
        if key in problem:
            return key
    return "invalid"


def convert_rows(
    rows: Iterable[dict[str, Any]],
    schema: str,
    *,
    source: str,
    on_bad_example: str = "error",
    skipped: SkipCounter | None = None,
) -> Iterator[list[dict[str, str]]]:
    """Yield the valid conversations of `rows`; bad ones raise or are counted in `skipped`.

    Args:
        rows: dataset rows in `schema`.
        schema: one of `SCHEMAS`.
        source: the source name, for messages.
        on_bad_example: `error` (raise `ConversationError`) or `skip` (count the row in `skipped`).
        skipped: the counter of skipped rows, by reason.
    """
    if on_bad_example not in BAD_EXAMPLE_POLICIES:
        raise ConversationError(f"on_bad_example={on_bad_example!r}; use one of {', '.join(BAD_EXAMPLE_POLICIES)}.")
    skipped = SkipCounter() if skipped is None else skipped
    for index, row in enumerate(rows):
        try:
            messages = to_messages(row, schema)
            problem = conversation_problem(messages)
        except (KeyError, TypeError, AttributeError) as error:
            problem = f"it does not fit the {schema} schema ({type(error).__name__}: {error})"
        if problem is None:
            yield messages
            continue
        if on_bad_example == "skip":
            skipped[f"{source}: {conversation_reason(problem)}"] += 1
            continue
        raise ConversationError(
            f"{source} row {index}: {problem}. Fix the data, or pass --on_bad_example skip to skip and count such rows."
        )


def conversation_key(messages: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    """A hashable identity for deduplication: roles and whitespace-normalised contents."""
    return tuple((message["role"], " ".join(message["content"].split())) for message in messages)


__all__ = [
    "BAD_EXAMPLE_POLICIES",
    "ROLES",
    "SCHEMAS",
    "ConversationError",
    "SkipCounter",
    "conversation_key",
    "conversation_problem",
    "conversation_reason",
    "convert_rows",
    "detect_schema",
    "to_messages",
]
