"""Post-training stage: turn a pretrained Genesis base into a chat model with TRL's SFT and DPO trainers.

- `chat`: the chat setup in one place (ChatML tokens, mean-initialised rows, template with generation markers,
  `<|im_end|>` as the stop token, pad distinct from it).
- `conversations`: schema detection and conversion to `messages`, with the checks that make a conversation trainable.
- `data`: SFT mixtures (YAML) with per-source token statistics, and DPO preference pairs.
- `embedded`: the default conversations and preference pairs, written for this project and present on every machine.
- `model`: starting points (pretraining output, checkpoint, model folder, Hub repo) and the LoRA defaults.
- `callbacks`: `metrics.jsonl` and checkpoint events as transformers `TrainerCallback`s.
- `outputs`: `final/` (through the verified exporter) and the LoRA adapter.
- `config`: the recipes' data arguments and their config parsing.
- `resume`: relaunching a run: its output folder checked, the newest complete `checkpoint-N` resumed (its pickles
  checked first), `metrics.jsonl` continued; other settings over a run are refused.

The recipes `recipes/sft.py` and `recipes/dpo.py` call these.
"""
