"""Chat setup in one place: what a pretrained Genesis base needs before SFT or DPO can train it as a chat model.

`prepare_chat_model(model, tokenizer)`:

- appends `<|im_start|> <|im_end|> <think> </think>` as the next four ids when the tokenizer lacks them (49152..49155
  for the 1B) and installs the ChatML template whose assistant turns sit in `{% generation %}` markers;
- grows the embeddings with every new row set to the exact mean of the old rows (`resize_embeddings_mean`, not
  transformers' sampled `mean_resizing`);
- makes `<|im_end|>` the EOS: `tokenizer.eos_token`, `config.eos_token_id` and `generation_config.eos_token_id` (with
  `<|endoftext|>` kept as a second stop id), while the pad stays `<|endoftext|>`, distinct from the EOS that ends turns;
- reports what it changed, so the recipe can say it.

`check_generation_markers(template)` turns the silent failure of assistant-only loss (a template without markers gives
an all-zero mask) into an error that says what to do.
"""

import dataclasses

from genesis_hf.layout import eos_token_ids
from genesis_hf.tokenizer import CHATML_TEMPLATE, CHATML_TOKENS, EOS_TOKEN, add_chat_tokens, resize_embeddings_mean

IM_START, IM_END, THINK_START, THINK_END = CHATML_TOKENS


class ChatSetupError(ValueError):
    """The tokenizer or template cannot train a chat model; the message names the value and the fix."""


@dataclasses.dataclass
class ChatSetup:
    """What `prepare_chat_model` found and changed."""

    added_tokens: dict[str, int]
    old_vocab_size: int
    new_vocab_size: int
    eos_token_id: int
    pad_token_id: int
    template_installed: bool

    def describe(self) -> str:
        if self.added_tokens:
            tokens = ", ".join(f"{token} = {token_id}" for token, token_id in self.added_tokens.items())
            head = (
                f"Chat setup: added {tokens}; embeddings {self.old_vocab_size} -> {self.new_vocab_size} rows, the new "
                "ones set to the mean of the old rows"
            )
        else:
            head = f"Chat setup: the tokenizer already has the ChatML tokens ({self.new_vocab_size} rows)"
        template = "; installed the ChatML chat template" if self.template_installed else ""
        return (
            f"{head}{template}; generation stops at {IM_END} (id {self.eos_token_id}), padding uses "
            f"{EOS_TOKEN} (id {self.pad_token_id})."
        )


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def check_generation_markers(template: str | None, assistant_only_loss: bool = True) -> None:
    """Raise `ChatSetupError` when `assistant_only_loss` is asked for but the template cannot mark assistant tokens.

    Args:
        template: the tokenizer's chat template.
        assistant_only_loss: whether the loss is restricted to assistant tokens.
    """
    if not assistant_only_loss:
        return
    if not template:
        raise ChatSetupError(
            "assistant_only_loss=true needs a chat template, and the tokenizer has none. Start from a Genesis model "
            "(the recipe installs the ChatML template) or set a template with {% generation %} markers."
        )
    if not has_generation_markers(template):
        raise ChatSetupError(
            "assistant_only_loss=true, but the tokenizer's chat template has no {% generation %} ... "
            "{% endgeneration %} markers, so no token would be marked as the assistant's (an all-zero loss mask). "
            "Wrap each assistant reply and its end-of-turn token in the markers (genesis_hf.tokenizer.CHATML_TEMPLATE "
            "does), or pass --assistant_only_loss false."
        )


def prepare_chat_model(model, tokenizer, *, chat_template: str | None = None) -> ChatSetup:
    """Give `tokenizer` the ChatML tokens and template and `model` the matching embeddings and stop token, in place.

    Idempotent: a model and tokenizer that are already set up are left as they are (only the EOS/pad settings are
    re-asserted).

    Args:
        model: a transformers causal LM (a Genesis model, or any with `resize_token_embeddings`).
        tokenizer: its fast tokenizer.
        chat_template: a template to install instead of `CHATML_TEMPLATE` (must keep the generation markers to train
            with assistant-only loss).
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in CHATML_TOKENS if token not in vocab]
    old_vocab_size = model.get_input_embeddings().weight.shape[0]
    previous_template = getattr(tokenizer, "chat_template", None)
    ids = add_chat_tokens(tokenizer)
    # add_chat_tokens installs CHATML_TEMPLATE; a template the tokenizer already had is kept, a caller's wins.
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif previous_template and not missing:
        tokenizer.chat_template = previous_template
    if len(tokenizer) > old_vocab_size:
        resize_embeddings_mean(model, len(tokenizer))
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = vocab.get(EOS_TOKEN)
    if pad_id is None:
        raise ChatSetupError(
            f"The tokenizer has no {EOS_TOKEN} token to pad with; Genesis tokenizers have it as id 0. Pass the "
            "tokenizer the base model was pretrained with."
        )
    # The turn ends with <|im_end|>: TRL appends the eos to plain-text rows and generation stops on it. Padding keeps
    # <|endoftext|>, so a padded position is never mistaken for the end of a turn.
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = EOS_TOKEN
    model.config.eos_token_id = im_end_id
    model.config.pad_token_id = pad_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = eos_token_ids(tokenizer)  # [<|im_end|>, <|endoftext|>]
        generation_config.pad_token_id = pad_id
    return ChatSetup(
        added_tokens={token: token_id for token, token_id in zip(CHATML_TOKENS, ids) if token in missing},
        old_vocab_size=old_vocab_size,
        new_vocab_size=model.get_input_embeddings().weight.shape[0],
        eos_token_id=im_end_id,
        pad_token_id=pad_id,
        template_installed=tokenizer.chat_template == CHATML_TEMPLATE and previous_template != CHATML_TEMPLATE,
    )


__all__ = [
    "IM_END",
    "IM_START",
    "THINK_END",
    "THINK_START",
    "ChatSetup",
    "ChatSetupError",
    "check_generation_markers",
    "has_generation_markers",
    "prepare_chat_model",
]
