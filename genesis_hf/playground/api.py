"""The playground's named API endpoints (for `gradio_client`), and the error handling every handler shares: a refused
request reaches the caller as its message, an unexpected failure as one line (the traceback stays in the server log).
"""

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable

from genesis_hf.playground.generation import SamplingSettings
from genesis_hf.playground.service import Playground
from genesis_hf.playground.sources import PlaygroundError

logger = logging.getLogger(__name__)

# The sampling values every generating endpoint ends with: SamplingSettings' fields, in order, with its defaults.
_SAMPLING_PARAMETERS = tuple(
    inspect.Parameter(
        field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=field.default, annotation=field.type
    )
    for field in dataclasses.fields(SamplingSettings)
)


def as_gradio_error(error: Exception) -> Exception:
    """`error` as the `gr.Error` the page or the client shows: a `PlaygroundError`'s message, else one line."""
    import gradio as gr

    if isinstance(error, gr.Error):
        return error
    if isinstance(error, PlaygroundError):
        return gr.Error(str(error), print_exception=False)
    # Unexpected: the traceback goes to the server log, the page gets one line.
    logger.error("Playground request failed", exc_info=error)
    return gr.Error(
        f"The request failed unexpectedly ({type(error).__name__}); the server log has the details.",
        print_exception=False,
    )


def user_errors(function: Callable) -> Callable:
    """Turn any exception of a handler (plain or generator) into a `gr.Error` with a message and no traceback."""
    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except Exception as error:
                raise as_gradio_error(error) from None

        return generator_wrapper

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise as_gradio_error(error) from None

    return wrapper


def takes_sampling(function: Callable) -> Callable:
    """`function(..., *, settings)` as an endpoint `(..., max_new_tokens, temperature, top_p, top_k,
    repetition_penalty, seed)`: gradio derives the API schema from the signature, so each sampling value is a typed
    parameter with `SamplingSettings`' default, checked by `SamplingSettings.from_request` before `function` runs.
    """
    own = [parameter for name, parameter in inspect.signature(function).parameters.items() if name != "settings"]
    signature = inspect.signature(function).replace(parameters=[*own, *_SAMPLING_PARAMETERS])

    @functools.wraps(function)
    def endpoint(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        values = arguments.arguments
        settings = SamplingSettings.from_request(*(values[parameter.name] for parameter in _SAMPLING_PARAMETERS))
        return function(**{parameter.name: values[parameter.name] for parameter in own}, settings=settings)

    endpoint.__signature__ = signature
    endpoint.__annotations__ = {
        **{parameter.name: parameter.annotation for parameter in signature.parameters.values()},
        "return": signature.return_annotation,
    }
    return endpoint


def register_api(playground: Playground, model_events: dict) -> None:
    """Add the named endpoints `list_checkpoints`, `generate`, `compare` and `chat` to the Blocks being built.

    Args:
        playground: the logic the endpoints call.
        model_events: event options of the requests that run a model (their shared concurrency limit).
    """
    import gradio as gr

    @user_errors
    def list_checkpoints() -> list[dict]:
        """Every checkpoint of the browsed run or repo: name, step, tokens_seen, loss, revision (oldest first)."""
        return playground.list_checkpoints()

    @user_errors
    @takes_sampling
    def generate(checkpoint: str, prompt: str, *, settings: SamplingSettings) -> str:
        """Continue `prompt` with `checkpoint` (a name from list_checkpoints); temperature 0 is greedy."""
        stream = playground.generate_stream(checkpoint, prompt, settings)
        for _ in stream:
            pass
        return stream.text

    @user_errors
    @takes_sampling
    def compare(checkpoint_a: str, checkpoint_b: str, prompt: str, *, settings: SamplingSettings) -> tuple[str, str]:
        """The same prompt, settings and seed through two checkpoints: `(text_a, text_b)`."""
        texts = ("", "")
        for update in playground.compare_stream(checkpoint_a, checkpoint_b, prompt, settings):
            texts = update
        return texts

    @user_errors
    @takes_sampling
    def chat(
        checkpoint: str,
        message: str,
        system_prompt: str = "",
        history: list[dict] | None = None,
        *,
        settings: SamplingSettings,
    ) -> str:
        """The assistant's reply to `message` after `history` (`[{"role", "content"}]`), `<think>...</think>`
        included."""
        stream = playground.chat_stream(checkpoint, message, history, system_prompt, settings)
        for _ in stream:
            pass
        return stream.text

    gr.api(list_checkpoints, api_name="list_checkpoints", concurrency_limit=None)
    gr.api(generate, api_name="generate", **model_events)
    gr.api(compare, api_name="compare", **model_events)
    gr.api(chat, api_name="chat", **model_events)
