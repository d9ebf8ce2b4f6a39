"""The evaluate stage: lm-evaluation-harness on any Genesis model, a sanity gate before it, reports after it.

- `genesis-hf eval MODEL` (`cli`): resolve MODEL (`harness`), gate it (`sanity`), run the suite, save JSON.
- `genesis-hf eval_tasks` (`tasks`): lm-eval task YAMLs over local copies of the benchmarks, for offline use.
- `genesis-hf report` (`report`): markdown table and bar chart over several results files.
- `during_training`: `--eval_tasks` during pretraining and SFT, as a checkpoint callback and a `TrainerCallback`.

Submodules are imported on use, so `import genesis_hf.evaluate` does not import lm-eval.
"""
