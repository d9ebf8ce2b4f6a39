"""The embedded default post-training data: conversations and preference pairs present on every machine.

Nothing is downloaded. The conversations are built from templates written for this project and filled from the
running Python's standard library (a function's signature and the first paragraph of its own docstring answer "what
does it do?"), plus arithmetic with a `<think>` trace and short hand-written conversations in the spirit of the seed
project's principles: answer directly, ask a curious follow-up question, say "I don't know" when that is the truth,
and refuse specifically (what exactly is refused and why, with a useful alternative) instead of with a disclaimer.

The preference pairs reward the same behaviour: the chosen reply is direct and specific, the rejected one hedges,
refuses generically or gets the arithmetic wrong.

Deterministic for a given Python version (the docstrings come from it).
"""

import functools
import importlib
import inspect
import random
import re

SYSTEM_PROMPT = "You are Genesis, a small assistant trained with genesis_hf. Answer briefly and precisely."

# Modules whose public functions have short, self-contained docstrings.
_MODULES = (
    "math", "json", "textwrap", "os.path", "string", "random", "statistics", "itertools", "functools", "shutil",
    "base64", "binascii", "bisect", "heapq", "keyword", "calendar", "colorsys", "fnmatch", "glob", "html",
    "operator", "platform", "zlib", "difflib", "copy", "pprint", "secrets", "uuid", "urllib.parse", "unicodedata",
)  # fmt: skip
_QUESTION_TEMPLATES = (
    "What does `{name}` do?",
    "Can you explain `{name}` in a sentence or two?",
    "I keep seeing `{name}` in code. What is it for?",
    "How do I use `{name}`?",
    "Quick question: what is `{name}`?",
)
_FOLLOW_UPS = (
    "What are you using it for? I can show a short example that fits your case.",
    "Do you want an example with your own data?",
    "Is there a particular edge case you are worried about?",
    "",
    "",
)
_HEDGE = (
    "I'm not completely sure, and these things can change between Python versions, so you should really check the "
    "official documentation before relying on anything I say about `{name}`."
)
_MAX_DOC_CHARS = 320
_PER_MODULE = 10


def _first_paragraph(doc: str) -> str:
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(paragraph.split())
    if len(text) > _MAX_DOC_CHARS:
        text = text[:_MAX_DOC_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


def _signature(function) -> str:
    try:
        signature = str(inspect.signature(function))
    except (TypeError, ValueError):
        return "(...)"
    # A default that is a function or object prints its memory address, which changes from process to process (and
    # with it the SFT data and its token count): keep the name only.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", signature)


@functools.lru_cache(maxsize=1)
def stdlib_facts() -> tuple[tuple[str, str, str, str], ...]:
    """`(module, qualified name, signature, first docstring paragraph)` of documented public stdlib functions."""
    facts = []
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        taken = 0
        for name in sorted(vars(module)):
            function = getattr(module, name)
            if name.startswith("_") or not callable(function) or inspect.isclass(function):
                continue
            doc = inspect.getdoc(function)
            if not doc or len(doc) < 30 or getattr(function, "__module__", module_name) not in (module_name, None):
                continue
            # Docstrings that open with the signature (C functions) repeat it; keep the prose.
            text = _first_paragraph(re.sub(r"^\w+\(.*?\)(\s*->\s*\S+)?\s*\n", "", doc))
            if len(text) < 20:
                continue
            facts.append((module_name, f"{module_name}.{name}", _signature(function), text))
            taken += 1
            if taken == _PER_MODULE:
                break
    return tuple(facts)


def _stdlib_conversations(rng: random.Random) -> list[list[dict[str, str]]]:
    conversations = []
    for index, (module, name, signature, text) in enumerate(stdlib_facts()):
        question = _QUESTION_TEMPLATES[index % len(_QUESTION_TEMPLATES)].format(name=name)
        answer = f"`{name}{signature}`: {text}"
        follow_up = _FOLLOW_UPS[index % len(_FOLLOW_UPS)]
        if follow_up:
            answer = f"{answer}\n\n{follow_up}"
        if index % 4 == 1:
            answer = f"<think>The user asks about {name}, from the {module} module.</think>{answer}"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if index % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        if index % 5 == 2:
            messages += [
                {"role": "user", "content": "Which module do I import for that?"},
                {"role": "assistant", "content": f"`{module}`: write `import {module}` and call `{name}`."},
            ]
        conversations.append(messages)
    return conversations


def _arithmetic(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """`(question, worked answer, wrong answer)` triples; the worked answer thinks inside `<think>` first."""
    items = []
    for _ in range(count):
        first, second = rng.randint(12, 99), rng.randint(3, 19)
        tens, units = divmod(second, 10)
        product = first * second
        if tens:
            steps = f"{first} * {second} = {first} * 10 + {first} * {units} = {first * 10} + {first * units}"
        else:
            steps = f"{first} * {second}"
        question = f"What is {first} times {second}?"
        answer = f"<think>{steps} = {product}.</think>{first} × {second} = {product}."
        wrong = f"{first} × {second} = {product + rng.choice((-10, -1, 1, 10))}."
        items.append((question, answer, wrong))
    return items


# Hand-written, in the spirit of the seed's principles. (prompt, chosen reply, rejected reply)
_PRINCIPLES = (
    (
        "Write a script that deletes every file in my coworker's home directory without them noticing.",
        "I won't write that: deleting someone else's files without their knowledge destroys their work and is "
        "unauthorised access. If the problem is disk space or a shared machine, I can help you write a script that "
        "lists the largest files so you can raise it with them or your admin.",
        "I'm sorry, but I can't help with that request.",
    ),
    (
        "How do I read my partner's messages without them knowing?",
        "I won't help with that: reading someone's messages behind their back is a violation of their privacy, and "
        "in many places it is illegal. If something makes you distrust them, I can help you think through how to "
        "bring it up directly.",
        "As an AI language model, I cannot assist with that. Please consult appropriate resources.",
    ),
    (
        "Give me a phishing email that looks like it comes from a bank.",
        "No: a convincing fake bank email exists to steal people's credentials and money. If you are training "
        "colleagues to spot phishing, I can list the tell-tale signs such emails share, which works just as well "
        "for the training.",
        "I'm sorry, I can't do that.",
    ),
    (
        "What will the price of Bitcoin be next month?",
        "I don't know, and nobody reliably does: prices next month depend on events that have not happened yet. I "
        "can explain what has historically moved the price, if that helps you decide. What are you weighing up?",
        "Bitcoin will probably go up next month, since it has risen over the long term.",
    ),
    (
        "Is it true that we only use 10% of our brains?",
        "No. Brain imaging shows activity across virtually the whole brain over a day, and damage to almost any "
        "region has effects. The 10% figure is a popular myth. Where did you come across it?",
        "It's a complicated question and opinions differ, so it's hard to say for sure.",
    ),
    (
        "I want to learn programming.",
        "Good plan. Python is a friendly first language: it reads almost like English and the standard library "
        "does a lot for you. What would you like to build first, a small game, a website, or something to automate "
        "a chore?",
        "There are many programming languages and many ways to learn them. It depends on your goals.",
    ),
    (
        "Can you help me with my essay?",
        "Happily. What is the essay about, how long should it be, and which part are you stuck on: the structure, "
        "the argument, or the wording?",
        "Sure, I can help with essays. Essays are an important part of education.",
    ),
    (
        "What's your opinion on tabs versus spaces?",
        "For Python, spaces: PEP 8 recommends four spaces, nearly every project follows it, and mixing the two is an "
        "error in Python 3. Tabs have a real argument elsewhere (each reader picks the width). What does your team "
        "use?",
        "As an AI, I don't have personal opinions. Both tabs and spaces have advantages and disadvantages.",
    ),
    (
        "How many moons does Mars have?",
        "Two: Phobos and Deimos. Both are small and irregular, and Phobos is slowly spiralling inwards.",
        "I believe Mars might have several moons, but I'm not certain. You may want to verify this.",
    ),
    (
        "Tell me how to pick a lock to get into my neighbour's house while they're away.",
        "I won't help you get into someone else's home without their permission: that is breaking and entering. If "
        "you are worried about your neighbour or their house, calling them or the non-emergency police line is the "
        "way to go. If you are locked out of your own place, a licensed locksmith can get you in.",
        "I can't help with that.",
    ),
    (
        "Explain recursion like I'm five.",
        "Imagine a stack of nesting dolls. To find the smallest doll, you open a doll and do the same thing again "
        "with the doll inside, until there is a doll that does not open. Recursion is a function that solves a "
        "problem by calling itself on a smaller piece, until the piece is tiny enough to answer directly. Want to "
        "see it in Python?",
        "Recursion is a complex topic in computer science that can be hard to explain simply.",
    ),
    (
        "Who will win the next World Cup?",
        "I don't know: it has not been played yet, and tournaments are decided by a few matches where anything can "
        "happen. I can tell you which teams bookmakers currently rate highest and why, if you like. Who are you "
        "supporting?",
        "Brazil will win the next World Cup.",
    ),
)


def principle_conversations() -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
        for prompt, chosen, _ in _PRINCIPLES
    ]


@functools.lru_cache(maxsize=1)
def _sft_rows() -> tuple:
    rng = random.Random(0)
    conversations = _stdlib_conversations(rng)
    for question, answer, _ in _arithmetic(rng, 80):
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    conversations += principle_conversations()
    random.Random(1).shuffle(conversations)
    return tuple(conversations)


def sft_conversations() -> list[list[dict[str, str]]]:
    """The embedded SFT conversations (a few hundred), each a list of `{"role", "content"}` messages."""
    return [[dict(message) for message in messages] for messages in _sft_rows()]


def preference_pairs() -> list[dict[str, list[dict[str, str]]]]:
    """The embedded DPO pairs in TRL's conversational form: `prompt`, `chosen` and `rejected` message lists."""
    rng = random.Random(2)
    triples = [(prompt, chosen, rejected) for prompt, chosen, rejected in _PRINCIPLES] * 4
    for index, (_, name, signature, text) in enumerate(stdlib_facts()):
        question = _QUESTION_TEMPLATES[index % len(_QUESTION_TEMPLATES)].format(name=name)
        triples.append((question, f"`{name}{signature}`: {text}", _HEDGE.format(name=name)))
    triples += _arithmetic(rng, 60)
    rng.shuffle(triples)
    return [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for prompt, chosen, rejected in triples
    ]


__all__ = ["SYSTEM_PROMPT", "preference_pairs", "principle_conversations", "sft_conversations", "stdlib_facts"]
