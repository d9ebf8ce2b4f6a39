"""Decoding cases shared by the in-process and the remote-code generation tests.

Imports only torch, so that a subprocess in which genesis_hf cannot be imported decodes with exactly the same prompts
and settings as the in-process peer.
"""

import torch

PAD_ID = 0
MAX_NEW_TOKENS = 12

# name -> generate() keyword arguments; sampling is seeded right before each call.
DECODING_MODES: dict[str, dict] = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "beam_search": dict(do_sample=False, num_beams=3),
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.3),
}


def batched_prompts(vocab_size: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, left-padded: (input_ids, attention_mask), each (2, 7)."""
    generator = torch.Generator().manual_seed(3)
    long_prompt = torch.randint(1, vocab_size, (7,), generator=generator)
    short_prompt = torch.randint(1, vocab_size, (4,), generator=generator)
    input_ids = torch.full((2, 7), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((2, 7), dtype=torch.long)
    input_ids[0], attention_mask[0] = long_prompt, 1
    input_ids[1, 3:], attention_mask[1, 3:] = short_prompt, 1
    return input_ids, attention_mask


def run_generate(model, mode: str, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, scores stacked as (new_tokens, batch * beams, vocab)) for one decoding mode."""
    input_ids, attention_mask = batched_prompts()
    torch.manual_seed(1234)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=PAD_ID,
            eos_token_id=None,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
            **DECODING_MODES[mode],
        )
    return output.sequences, torch.stack(output.scores)


def max_score_difference(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |difference| over the scores the reference keeps finite; inf if the finite sets differ."""
    finite = torch.isfinite(reference)
    if not torch.equal(torch.isfinite(scores), finite):
        return float("inf")
    return (scores[finite] - reference[finite]).abs().max().item()
