"""The playground: a Gradio app to browse a run's checkpoints and talk to them, locally or as a Hugging Face Space.

It shows the checkpoints of one training run (a local run directory) or one Hub model repo (step branches such as
`step-0000200`), their loss curve with the selected checkpoint marked, model facts, and lets you sample from a
checkpoint (streamed token by token), compare two checkpoints on the same prompt and seed, and chat with chat models
(ChatML, `<think>...</think>` folded).

```bash
genesis-hf playground --runs outputs/pretrain            # http://127.0.0.1:7860
genesis-hf playground --repo you/genesis-1b --port 7861
genesis-hf playground deploy --space you/genesis-playground --repo you/genesis-1b
```

Named API endpoints (for `gradio_client`):

- `/list_checkpoints() -> list[dict]`: `name, step, tokens_seen, loss, revision` of every checkpoint.
- `/generate(checkpoint, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> str`
- `/compare(checkpoint_a, checkpoint_b, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
  -> (str, str)`
- `/chat(checkpoint, message, system_prompt, history, max_new_tokens, temperature, top_p, top_k,
  repetition_penalty, seed) -> str` (the raw reply, `<think>...</think>` included; `history` is a list of
  `{"role", "content"}` dicts)

Safety: a request names a checkpoint, which is looked up in the listing of the configured run or repo; paths, URLs and
unknown names are refused. Prompts and outputs are bounded, errors reach the page as messages (never tracebacks), and
the Hub token is read on the server only (`HF_TOKEN` or the cached login), never sent to the page or uploaded.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genesis_hf.args import add_command
from genesis_hf.playground.api import register_api, user_errors
from genesis_hf.playground.generation import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    SamplingSettings,
    chat_display_messages,
)
from genesis_hf.playground.service import LOSS_SERIES, SELECTED_SERIES, Playground
from genesis_hf.playground.sources import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_CONCURRENCY,
    CheckpointSource,
    PlaygroundError,
    checkpoint_label,
)
from genesis_hf.publish.space import SPACE_CONFIG_FILE, deploy_space

if TYPE_CHECKING:
    # Imported where used: `genesis-hf --help` imports every subcommand's module and should not pay for Gradio.
    import gradio as gr
    import pandas as pd

# The first screen's prompt: one press of Generate shows what the newest checkpoint writes. A bare word, not "The "
# with a space: byte-level BPE puts the space in front of the next word, so a trailing space is a rare token.
DEFAULT_PROMPT = "The"

_CSS = """
#genesis-output textarea, .genesis-compare textarea { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
"""
_SAMPLING_DEFAULTS = SamplingSettings()
# The page's own handlers get no API endpoint: the named API (`register_api`) is the one clients use.
_PRIVATE = {"api_visibility": "private"}


# ---------------------------------------------------------------------------------------------------------------------
# The Gradio app


@dataclasses.dataclass(frozen=True)
class _Choices:
    """What a checkpoint picker offers: `(label, name)` of each checkpoint, oldest first."""

    options: list[tuple[str, str]]

    @classmethod
    def of(cls, playground: Playground) -> "_Choices":
        return cls(
            [(checkpoint_label(checkpoint), checkpoint.name) for checkpoint in playground.source.list_checkpoints()]
        )

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.options]

    @property
    def first(self) -> str | None:
        return self.options[0][1] if self.options else None

    @property
    def latest(self) -> str | None:
        return self.options[-1][1] if self.options else None


def _curve_frame(playground: Playground, selected: str | None) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame(playground.loss_curve(selected), columns=["step", "loss", "series"])


def _table_frame(playground: Playground) -> "pd.DataFrame":
    import pandas as pd

    rows = [[c.name, c.step, c.tokens_seen, c.loss, c.revision or ""] for c in playground.source.list_checkpoints()]
    return pd.DataFrame(rows, columns=["name", "step", "tokens seen", "loss", "revision"])


def build_app(playground: Playground, title: str = "Genesis playground") -> "gr.Blocks":
    """The Gradio app: checkpoint picker, loss curve, model facts, Generate / Compare / Chat tabs, named API endpoints.

    The queue is set up here (`default_concurrency_limit=playground.concurrency`); launch it with `launch_app`.

    Args:
        playground: the logic the page and the API call.
        title: the page title.
    """
    import gradio as gr

    model_events = {"concurrency_id": "model", "concurrency_limit": playground.concurrency, "time_limit": 600}
    choices = _Choices.of(playground)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nCheckpoints of {playground.source.description}: pick one, read its loss and facts, then "
            "generate, compare two checkpoints on the same prompt and seed, or chat."
        )
        checkpoint, refresh = _checkpoint_panel(playground, choices)
        sampling = _sampling_controls()
        with gr.Tabs():
            with gr.Tab("Generate"):
                _generate_tab(playground, checkpoint, sampling, model_events)
            with gr.Tab("Compare"):
                compare_a, compare_b = _compare_tab(playground, choices, sampling, model_events)
            with gr.Tab("Chat"):
                chat_checkpoint = _chat_tab(playground, choices, sampling, model_events)
        with gr.Accordion("All checkpoints", open=False):
            table = gr.Dataframe(_table_frame(playground), interactive=False)
        gr.Markdown(
            f"Limits: prompts up to {MAX_PROMPT_CHARS:,} characters, up to {MAX_NEW_TOKENS} new tokens; "
            f"{playground.cache.capacity} models kept loaded. API: `list_checkpoints`, `generate`, `compare`, `chat` "
            "(see *Use via API* below)."
        )
        # After a refresh, the compare tab's A falls back to the oldest checkpoint, every other picker to the newest.
        pickers = [(checkpoint, "latest"), (compare_a, "first"), (compare_b, "latest"), (chat_checkpoint, "latest")]
        _wire_refresh(playground, refresh, pickers, table)
        register_api(playground, model_events)

    demo.queue(default_concurrency_limit=playground.concurrency, max_size=64)
    return demo


def _checkpoint_panel(playground: Playground, choices: _Choices) -> tuple["gr.Dropdown", "gr.Button"]:
    """The checkpoint picker with its facts, and the loss curve with the picked checkpoint marked.

    Returns:
        The picker and the "Refresh list" button.
    """
    import gradio as gr

    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            checkpoint = gr.Dropdown(
                choices.options,
                value=choices.latest,
                label="Checkpoint",
                info="step · tokens seen · loss",
                elem_id="genesis-checkpoint",
            )
            refresh = gr.Button("Refresh list", size="sm", variant="secondary")
            facts = gr.Markdown(playground.facts_markdown(choices.latest) if choices.latest else "No checkpoints yet.")
        with gr.Column(scale=3, min_width=360):
            curve = gr.LinePlot(
                _curve_frame(playground, choices.latest),
                x="step",
                y="loss",
                color="series",
                color_map={LOSS_SERIES: "#3b82f6", SELECTED_SERIES: "#f97316"},
                # The legend would be clipped at the bottom of the plot; the label says what the colors are.
                colors_in_legend=[],
                x_title="step (optimizer steps)",
                y_title="training loss",
                label="Loss curve (orange: the selected checkpoint)",
                elem_id="genesis-loss-curve",
            )

    @user_errors
    def on_select(name: str | None):
        if not name:
            return "Pick a checkpoint.", _curve_frame(playground, None)
        return playground.facts_markdown(name), _curve_frame(playground, name)

    checkpoint.change(on_select, checkpoint, [facts, curve], **_PRIVATE)
    return checkpoint, refresh


def _sampling_controls() -> list["gr.components.Component"]:
    """The sampling settings every tab uses, in `SamplingSettings.from_request`'s order."""
    import gradio as gr

    with gr.Accordion("Sampling settings (all tabs)", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(
                1, MAX_NEW_TOKENS, value=_SAMPLING_DEFAULTS.max_new_tokens, step=1, label="max new tokens"
            )
            temperature = gr.Slider(
                0.0, 2.0, value=_SAMPLING_DEFAULTS.temperature, step=0.05, label="temperature", info="0 = greedy"
            )
            top_p = gr.Slider(0.05, 1.0, value=_SAMPLING_DEFAULTS.top_p, step=0.01, label="top-p")
        with gr.Row():
            top_k = gr.Slider(0, 200, value=_SAMPLING_DEFAULTS.top_k, step=1, label="top-k", info="0 = off")
            repetition_penalty = gr.Slider(
                1.0, 2.0, value=_SAMPLING_DEFAULTS.repetition_penalty, step=0.01, label="repetition penalty"
            )
            seed = gr.Number(_SAMPLING_DEFAULTS.seed, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
    return [max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]


def _generate_tab(playground: Playground, checkpoint: "gr.Dropdown", sampling: list, model_events: dict) -> None:
    """Prompt, Generate button, the output streamed token by token and its speed."""
    import gradio as gr

    prompt = gr.Textbox(
        DEFAULT_PROMPT,
        label="Prompt",
        lines=3,
        max_length=MAX_PROMPT_CHARS,
        placeholder="Once upon a time",
        elem_id="genesis-prompt",
    )
    generate_button = gr.Button("Generate", variant="primary", elem_id="genesis-generate")
    output = gr.Textbox(label="Output", lines=8, interactive=False, elem_id="genesis-output")
    stats = gr.Markdown(elem_id="genesis-stats")

    @user_errors
    def on_generate(name, prompt_text, *sampling_values):
        settings = SamplingSettings.from_request(*sampling_values)
        if not playground.is_loaded(name):
            yield "", f"Loading {name}..."
        stream = playground.generate_stream(name, prompt_text, settings)
        yield "", "Generating..."
        for text in stream:
            yield text, f"{stream.num_tokens} tokens..."
        if stream.stop_reason == "context":
            gr.Warning(f"Generation stopped at the model's context of {stream.context_length} tokens.")
        yield stream.text, stream.summary()

    generate_button.click(on_generate, [checkpoint, prompt, *sampling], [output, stats], **_PRIVATE, **model_events)


def _compare_tab(
    playground: Playground, choices: _Choices, sampling: list, model_events: dict
) -> tuple["gr.Dropdown", "gr.Dropdown"]:
    """Two checkpoints on the same prompt and seed, side by side; returns their pickers (A, B)."""
    import gradio as gr

    with gr.Row():
        compare_a = gr.Dropdown(choices.options, value=choices.first, label="Checkpoint A")
        compare_b = gr.Dropdown(choices.options, value=choices.latest, label="Checkpoint B")
    prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS)
    compare_button = gr.Button("Compare", variant="primary")
    with gr.Row():
        output_a = gr.Textbox(label="A", lines=8, interactive=False, elem_classes="genesis-compare")
        output_b = gr.Textbox(label="B", lines=8, interactive=False, elem_classes="genesis-compare")

    @user_errors
    def on_compare(name_a, name_b, prompt_text, *sampling_values):
        settings = SamplingSettings.from_request(*sampling_values)
        yield from playground.compare_stream(name_a, name_b, prompt_text, settings)

    compare_inputs = [compare_a, compare_b, prompt, *sampling]
    compare_button.click(on_compare, compare_inputs, [output_a, output_b], **_PRIVATE, **model_events)
    return compare_a, compare_b


def _chat_tab(playground: Playground, choices: _Choices, sampling: list, model_events: dict) -> "gr.Dropdown":
    """A conversation with a chat checkpoint, its `<think>` reasoning folded; returns the tab's checkpoint picker."""
    import gradio as gr

    chat_checkpoint = gr.Dropdown(choices.options, value=choices.latest, label="Chat checkpoint")
    system_prompt = gr.Textbox(label="System prompt (optional)", lines=1, max_length=MAX_PROMPT_CHARS)
    chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="genesis-chatbot")
    with gr.Row():
        chat_message = gr.Textbox(label="Message", scale=5, max_length=MAX_PROMPT_CHARS)
        send = gr.Button("Send", variant="primary", scale=1)
    clear = gr.Button("Clear", size="sm", variant="secondary")

    @user_errors
    def on_chat(name, message, history, system_prompt_text, *sampling_values):
        settings = SamplingSettings.from_request(*sampling_values)
        history = list(history or [])
        stream = playground.chat_stream(name, message, history, system_prompt_text, settings)
        shown = history + [{"role": "user", "content": message}]
        yield shown, ""
        for reply in stream:
            yield shown + chat_display_messages(reply), ""
        yield shown + chat_display_messages(stream.text, stream.seconds), ""

    chat_inputs = [chat_checkpoint, chat_message, chatbot, system_prompt, *sampling]
    send.click(on_chat, chat_inputs, [chatbot, chat_message], **_PRIVATE, **model_events)
    chat_message.submit(on_chat, chat_inputs, [chatbot, chat_message], **_PRIVATE, **model_events)
    clear.click(lambda: ([], ""), None, [chatbot, chat_message], **_PRIVATE)
    return chat_checkpoint


def _wire_refresh(
    playground: Playground, refresh: "gr.Button", pickers: list[tuple["gr.Dropdown", str]], table: "gr.Dataframe"
) -> None:
    """`refresh` lists the checkpoints again: each picker keeps its pick while it is listed, else moves to its
    fallback (`"first"` or `"latest"`), and the table of all checkpoints is redrawn."""
    import gradio as gr

    fallbacks = [fallback for _, fallback in pickers]

    @user_errors
    def on_refresh(*selected: str | None):
        playground.source.list_checkpoints(refresh=True)
        choices = _Choices.of(playground)
        updates = [
            gr.update(choices=choices.options, value=value if value in choices.names else getattr(choices, fallback))
            for value, fallback in zip(selected, fallbacks)
        ]
        return (*updates, _table_frame(playground))

    components = [picker for picker, _ in pickers]
    refresh.click(on_refresh, components, [*components, table], **_PRIVATE)


def launch_app(demo: "gr.Blocks", host: str | None = "127.0.0.1", port: int | None = None, **launch_kwargs: Any):
    """Launch `demo` with the playground's theme (system fonts: nothing fetched from font CDNs) on `host:port`.

    Args:
        demo: from `build_app`.
        host: interface to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 shares it on the network.
        port: the port; `None` lets Gradio pick (7860 or the next free one).
        launch_kwargs: more `Blocks.launch` arguments (`prevent_thread_lock=True` to return at once).
    """
    import gradio as gr

    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "SFMono-Regular", "monospace"]
    )
    # show_error: gr.Error messages reach the page (handlers raise nothing else); ssr_mode off: no Node server.
    options = {"show_error": True, "ssr_mode": False, "theme": theme, "css": _CSS, "footer_links": ["api"]}
    return demo.launch(server_name=host, server_port=port, **{**options, **launch_kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Running in a Space


def load_space_config(config_path: str | Path | None = None) -> dict:
    """What a Space (or the Space template's app.py run locally) browses: `{"runs": ...}` or `{"repo": ...}`.

    `GENESIS_PLAYGROUND_RUNS` / `GENESIS_PLAYGROUND_REPO` win over `config_path` (the `playground.json` that
    `deploy` writes next to app.py); a relative `runs` is relative to that file.

    Raises:
        PlaygroundError: neither the environment nor the file says what to browse.
    """
    if os.environ.get("GENESIS_PLAYGROUND_RUNS"):
        return {"runs": os.environ["GENESIS_PLAYGROUND_RUNS"]}
    if os.environ.get("GENESIS_PLAYGROUND_REPO"):
        return {"repo": os.environ["GENESIS_PLAYGROUND_REPO"]}
    if config_path is not None and Path(config_path).is_file():
        try:
            config = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except ValueError as error:
            raise PlaygroundError(f"{config_path} is not valid JSON ({error}); `deploy` writes it again.") from None
        if config.get("runs"):
            return {**config, "runs": str((Path(config_path).parent / config["runs"]).resolve())}
        if config.get("repo"):
            return config
    raise PlaygroundError(
        f"Nothing to browse: set GENESIS_PLAYGROUND_REPO (a Hub model repo id) or GENESIS_PLAYGROUND_RUNS (a run "
        f"directory), or write {SPACE_CONFIG_FILE} next to app.py (`genesis-hf playground deploy` does)."
    )


def playground_from_config(config: dict) -> Playground:
    """A `Playground` from `load_space_config()`'s dict (`cache_size`, `concurrency` optional)."""
    source = CheckpointSource(runs=config.get("runs"), repo=config.get("repo"))
    return Playground(
        source,
        cache_size=int(config.get("cache_size", DEFAULT_CACHE_SIZE)),
        concurrency=int(config.get("concurrency", DEFAULT_CONCURRENCY)),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def port_problem(host: str | None, port: int | None) -> str | None:
    """Why the app could not listen on `host:port` (a busy port), or `None`; checked before anything is loaded."""
    import socket

    if port is None:
        return None
    with socket.socket(socket.AF_INET6 if host and ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does: TIME_WAIT is no conflict
        try:
            sock.bind((host or "127.0.0.1", port))
        except OSError as error:
            return (
                f"cannot listen on {host}:{port} ({error.strerror or error}): another program (another playground?) "
                f"uses that port. Pass a free one with --port (e.g. --port {port + 1}), or stop that program."
            )
    return None


def _run_playground(args: argparse.Namespace) -> int:
    problem = port_problem(args.host, args.port)
    if problem is not None:
        print(f"genesis-hf playground: error: {problem}", file=sys.stderr)
        return 2
    try:
        playground = Playground(
            CheckpointSource(runs=args.runs, repo=args.repo), cache_size=args.cache_size, concurrency=args.concurrency
        )
        demo = build_app(playground)
    except ValueError as error:  # PlaygroundError included: a bad source or setting, said in one line
        print(f"genesis-hf playground: error: {error}", file=sys.stderr)
        return 2
    launch_app(demo, host=args.host, port=args.port)
    return 0


def _run_deploy(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = deploy_space(args.space, repo=args.repo, runs=args.runs, private=args.private)
    except (ValueError, HfHubHTTPError) as error:
        # The Hub's answer (401: no or bad token, 403: no write access to the namespace, ...) names the fix.
        print(f"genesis-hf playground deploy: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # connection refused, DNS, TLS: the network, not the request
        print(
            f"genesis-hf playground deploy: error: could not reach the Hub at {constants.ENDPOINT} "
            f"({type(error).__name__}: {error}). Check the network (or HF_ENDPOINT) and deploy again.",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"space": args.space, "url": url, "browses": args.repo or "shipped run"}))
    return 0


def _add_source_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--runs", metavar="DIR", help="A local training run directory to browse.")
    group.add_argument(
        "--repo", metavar="ID", help="A Hub model repo whose step-XXXXXXX branches are the checkpoints."
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `genesis-hf playground` (serve locally) and `genesis-hf playground deploy` (publish as a Space)."""
    help = "Browse a run's checkpoints and talk to them in a Gradio app (or deploy it as a Space)."
    parser = add_command(subparsers, "playground", help=help, description=__doc__.split("\n\n")[0])
    _add_source_arguments(parser, required=False)
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 shares it).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: 7860 or the next free one).")
    parser.add_argument("--cache_size", type=int, default=DEFAULT_CACHE_SIZE, help="Models kept loaded.")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="Generations at once.")
    parser.set_defaults(func=_run_playground_or_usage, playground_parser=parser)
    commands = parser.add_subparsers(dest="playground_command", metavar="SUBCOMMAND")
    description = "Create or update a Gradio Space running the playground on a Hub model repo (or a shipped run)."
    help = "Create or update a Hugging Face Space running the playground."
    deploy = add_command(commands, "deploy", help=help, description=description, func=_run_deploy)
    deploy.add_argument("--space", required=True, metavar="ID", help="The Space, e.g. you/genesis-playground.")
    _add_source_arguments(deploy, required=True)
    deploy.add_argument("--private", action="store_true", help="Create the Space private.")


def _run_playground_or_usage(args: argparse.Namespace) -> int:
    if args.runs is None and args.repo is None:
        args.playground_parser.print_usage(sys.stderr)
        print(
            "genesis-hf playground: error: pass --runs DIR or --repo ID (or the deploy subcommand).", file=sys.stderr
        )
        return 2
    return _run_playground(args)


__all__ = [
    "DEFAULT_PROMPT",
    "build_app",
    "launch_app",
    "load_space_config",
    "playground_from_config",
    "register_cli",
]
