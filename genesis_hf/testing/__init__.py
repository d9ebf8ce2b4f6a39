"""Test helpers other packages' tests import too: a local Hub API server and a tiny trained model.

`HubServer` (see `hub_server`) speaks the part of the Hub API that `huggingface_hub` and `from_pretrained` use.
`build_tiny_model_folder` trains a `debug`-preset model for a few steps on the embedded corpus with a plain torch loop
and saves it with its tokenizer (ChatML tokens included): a real, if small, trained checkpoint in a few seconds.
"""

import itertools
import json
from pathlib import Path

from .hub_server import FailureRule, HubServer


def build_tiny_model_folder(
    out_dir: str | Path,
    *,
    vocab_size: int = 300,
    train_steps: int = 4,
    seed: int = 0,
    chat_tokens: bool = True,
    metrics: bool = True,
):
    """Train a tiny Genesis model and save it as a model folder; returns `(model, tokenizer)`.

    The folder holds `save_pretrained` output, the tokenizer, `trainer_state.json` (step, tokens_seen, loss) and, with
    `metrics`, a `metrics.jsonl` of the losses.

    Args:
        out_dir: the folder to write.
        vocab_size: size of the byte-level BPE tokenizer before the ChatML tokens (at least 258).
        train_steps: AdamW steps on 8 sequences of 64 tokens.
        seed: seeds the initialisation.
        chat_tokens: append the ChatML tokens (and template).
        metrics: also write `metrics.jsonl`.
    """
    import torch

    from genesis_hf import GenesisConfig, GenesisForCausalLM, corpus
    from genesis_hf.tokenizer import add_chat_tokens, train_tokenizer

    documents = list(itertools.islice(corpus.default_corpus(), 8))
    tokenizer = train_tokenizer(documents, vocab_size)
    if chat_tokens:
        add_chat_tokens(tokenizer)
    torch.manual_seed(seed)
    model = GenesisForCausalLM(GenesisConfig.from_preset("debug", vocab_size=len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tokenizer("\n".join(documents[:2]), verbose=False)["input_ids"][: 16 * 64]
    # (sequences, 64)
    batch = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)[:8]
    records = []
    for step in range(1, train_steps + 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        records.append({"step": step, "loss": loss.item(), "tokens_seen": step * batch.numel()})
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    state = {"step": train_steps, "tokens_seen": train_steps * batch.numel(), "loss": records[-1]["loss"]}
    (out_dir / "trainer_state.json").write_text(json.dumps(state))
    if metrics:
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return model, tokenizer


__all__ = ["FailureRule", "HubServer", "build_tiny_model_folder"]
