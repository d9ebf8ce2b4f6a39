"""Every command the README shows is run by a test, so the README cannot drift from the code.

The cheap ones run here, as written or shortened; the long ones are run by the test named in `COVERED_ELSEWHERE`.
A README command that matches neither fails `test_every_readme_command_is_exercised`.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# README command (its leading words) -> the test that runs it.
COVERED_ELSEWHERE = {
    "bash scripts/setup.sh && .venv/bin/accelerate launch recipes/pretrain.py": "test_pretrain.py (README run)",
    "bash scripts/setup.sh && .venv/bin/python -m pytest": ".ci/run runs exactly this",
    ".venv/bin/accelerate launch --config_file accelerate_configs/fsdp2-2x4090-pcie.yaml recipes/pretrain.py": (
        "test_pretrain_distributed.py (the same config on two gloo processes)"
    ),
    ".venv/bin/genesis-hf export": "test_export.py (cli export of a training checkpoint)",
    ".venv/bin/python benchmarks/first_run.py": (
        "test_pretrain.py::test_first_run_benchmark_reports_the_margin_and_plots_it (on a finished run; the README run "
        "itself is test_pretrain_distributed.py's)"
    ),
    ".venv/bin/genesis-hf checkpoints": "test_hub_push.py (cli checkpoints)",
    ".venv/bin/genesis-hf eval outputs/": "test_evaluate.py (a training checkpoint, a run folder, exports, GGUF)",
    ".venv/bin/genesis-hf eval you/": "test_evaluate.py::test_a_hub_repo_at_a_revision (the local Hub server)",
    ".venv/bin/genesis-hf eval_tasks": "test_evaluate.py (the local benchmarks of every test there)",
    ".venv/bin/genesis-hf report": "test_evaluate.py::test_report_table_and_chart",
    "lm_eval --model hf": "test_evaluate.py::test_the_seeds_lm_eval_command_gives_the_same_numbers (fp32 on CPU)",
    ".venv/bin/accelerate launch recipes/sft.py": "test_posttrain.py (README SFT then DPO)",
    ".venv/bin/accelerate launch recipes/dpo.py": "test_posttrain.py (README SFT then DPO)",
    ".venv/bin/python benchmarks/sft.py": "test_posttrain.py (test_readme_sft_benchmark_shortened)",
    ".venv/bin/accelerate launch --config_file accelerate_configs/fsdp2-2x4090-pcie.yaml recipes/sft.py": (
        "test_posttrain.py (the seed's SFT config: every key valid, the seed's values)"
    ),
    ".venv/bin/genesis-hf constitution generate": "test_constitution.py::test_readme_constitution_commands",
    ".venv/bin/transformers serve outputs/sft-tiny/final": (
        "test_stock_tools.py::test_transformers_serve_answers_a_chat_completion_in_the_models_template"
    ),
    ".venv/bin/transformers serve": "test_constitution.py (served_model: this command on a local model folder)",
    ".venv/bin/genesis-hf engagement": "test_constitution.py::test_readme_constitution_commands",
    ".venv/bin/python benchmarks/constitution.py": "test_constitution.py::test_readme_constitution_benchmark_shortened",
}
RUN_HERE = (
    ".venv/bin/genesis-hf tokenizer train",
    ".venv/bin/genesis-hf data prepare",
    ".venv/bin/genesis-hf plan",
    ".venv/bin/python benchmarks/generation.py",
    ".venv/bin/python benchmarks/pretrain.py",
    ".venv/bin/python benchmarks/data.py",
)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def run(command: list[str], tmp_path: Path, timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 8
    for command in commands:
        assert command.startswith(tuple(COVERED_ELSEWHERE) + RUN_HERE), f"README command not exercised: {command}"


def readme_command(prefix: str) -> list[str]:
    (command,) = [command for command in readme_commands() if command.startswith(prefix)]
    words = shlex.split(command)
    words[0] = str(VENV_BIN / Path(words[0]).name) if words[0].startswith(".venv/bin/") else words[0]
    return [str(ROOT / word) if word.startswith(("benchmarks/", "recipes/")) else word for word in words]


def test_readme_tokenizer_command(tmp_path):
    output = run(readme_command(".venv/bin/genesis-hf tokenizer train"), tmp_path)
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["len_tokenizer"] == 4100 and sorted(summary["chat_token_ids"].values()) == [4096, 4097, 4098, 4099]
    assert (tmp_path / "outputs" / "tokenizer" / "tokenizer.json").is_file()


def test_readme_data_prepare_command(tmp_path):
    run(readme_command(".venv/bin/genesis-hf data prepare") + ["--max-tokens", "20000"], tmp_path)
    index = json.loads((tmp_path / "outputs" / "tokens" / "index.json").read_text())
    assert set(index["tokens_per_source"]) == {"stdlib-docs", "stdlib-code"}


def test_readme_plan_command(tmp_path):
    output = run(readme_command(".venv/bin/genesis-hf plan"), tmp_path)
    assert "fits" in output and "RTX 4090" in output


def test_readme_generation_benchmark(tmp_path):
    command = readme_command(".venv/bin/python benchmarks/generation.py")
    report = json.loads(run(command + ["--rounds", "1", "--new-tokens", "4", "--sizes", "tiny"], tmp_path))
    for mode in ("greedy", "sampled"):
        assert report["sizes"]["tiny"][mode]["ratio_playground_loop_over_generate"] > 0


def test_readme_pretrain_benchmark(tmp_path):
    """Shortened: one round of each kind at a few steps; the speed section prints every kind and ratio, and the
    checkpoint section its stalls."""
    command = readme_command(".venv/bin/python benchmarks/pretrain.py")
    report = json.loads(run(command + ["--sizes", "tiny", "--rounds", "1", "--steps", "5", "--skip", "1"], tmp_path))
    tiny = report["sizes"]["tiny"]
    assert {"recipe", "recipe_cores_less_one", "trainer", "torch_loop"} <= set(tiny)
    assert tiny["ratio_recipe_over_trainer"] > 0 and tiny["recipe"]["steps_timed"] == 3
    overrides = '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}'
    report = json.loads(run(command + ["--only", "checkpoint", "--checkpoint-overrides", overrides], tmp_path))
    assert report["checkpoint"]["sync"]["checkpoint_bytes"] > 0


@pytest.mark.slow
def test_readme_data_benchmark(tmp_path):
    command = readme_command(".venv/bin/python benchmarks/data.py")
    flags = ["--repeats", "1", "--vocab-size", "512", "--seq-len", "64", "--long-document-mb", "4"]
    report = json.loads(run(command + flags, tmp_path, timeout=600))
    long_document = report["long_one_line_document"]
    # A one-line document goes through pieces: same tokens as one whole encoding, for a fraction of its memory.
    assert long_document["pieces_2mb"]["tokens"] == long_document["whole_2mb"]["tokens"]
    assert long_document["pieces_4mb"]["tokens"] > long_document["pieces_2mb"]["tokens"]


def readme_text() -> str:
    return " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())


def test_readme_sft_and_dpo_default_numbers_are_what_the_recipes_count(tmp_path):
    """The README's "SFT: N steps over T tokens, S% trainable; DPO: N steps over P pairs" are what the bare
    `accelerate launch recipes/sft.py` and `recipes/dpo.py` count before they train: the recipes' own argument
    parsing, data, chat setup of the main job's tokenizer (genesis-tiny's 1,024-token default tokenizer), statistics
    and TRL trainers (their dataloaders give the steps), without the minutes of training."""
    import copy
    import math

    from trl import DPOConfig, DPOTrainer, ModelConfig, SFTConfig, SFTTrainer

    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.posttrain.chat import prepare_chat_model
    from genesis_hf.posttrain.config import (
        DPODataArguments,
        SFTDataArguments,
        TrainingEvalArguments,
        parse_recipe_args,
    )
    from genesis_hf.posttrain.data import (
        apply_length_policy,
        build_preference_dataset,
        build_sft_dataset,
        load_sft_mixture,
        mixture_statistics,
    )
    from genesis_hf.tokenizer import default_tokenizer

    match = re.search(
        r"SFT: (\d+) steps over (?:about )?([\d,]+) tokens, ([\d.]+)% trainable; DPO: (\d+) steps over (\d+) pairs",
        readme_text(),
    )
    assert match, "the README's post-training section no longer states the default runs' numbers"
    sft_steps, sft_tokens, sft_share, dpo_steps, dpo_pairs = match.groups()

    config = GenesisConfig.from_preset("genesis-tiny")
    tokenizer = copy.deepcopy(default_tokenizer(config.vocab_size))
    model = GenesisForCausalLM(GenesisConfig.from_preset("debug", vocab_size=config.vocab_size))
    prepare_chat_model(model, tokenizer)
    out = ["--output_dir", str(tmp_path / "run"), "--report_to", "none"]

    data_args, _, sft_args, _ = parse_recipe_args(
        (SFTDataArguments, TrainingEvalArguments, SFTConfig, ModelConfig),
        out,
        ROOT / "recipes/configs/sft/genesis-tiny.yaml",
    )
    dataset, _ = build_sft_dataset(load_sft_mixture(data_args.mixture), on_bad_example=data_args.on_bad_example)
    stats = mixture_statistics(dataset, tokenizer, max_length=sft_args.max_length)
    dataset, _ = apply_length_policy(dataset, stats["lengths"], sft_args.max_length, data_args.overlong)
    trainer = SFTTrainer(
        model=model, args=sft_args, train_dataset=dataset.remove_columns("source"), processing_class=tokenizer
    )
    steps = math.ceil(len(trainer.get_train_dataloader()) / sft_args.gradient_accumulation_steps)
    sft_measured = (steps * sft_args.num_train_epochs, stats["total"]["tokens"], stats["total"]["trainable_share"])

    data_args, _, dpo_args, _ = parse_recipe_args(
        (DPODataArguments, TrainingEvalArguments, DPOConfig, ModelConfig),
        out,
        ROOT / "recipes/configs/dpo/genesis-tiny.yaml",
    )
    pairs, _ = build_preference_dataset(data_args.dataset_name, on_bad_example=data_args.on_bad_example)
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=dpo_args, train_dataset=pairs, processing_class=tokenizer
    )
    steps = math.ceil(len(trainer.get_train_dataloader()) / dpo_args.gradient_accumulation_steps)
    measured = (*sft_measured[:2], round(100 * sft_measured[2], 1), steps * dpo_args.num_train_epochs, len(pairs))
    readme = (int(sft_steps), int(sft_tokens.replace(",", "")), float(sft_share), int(dpo_steps), int(dpo_pairs))
    # The SFT token count still moves by a few tokens between processes (some stdlib text the embedded data quotes
    # differs per process; open, see the session note): the README says "about", the test allows 0.05%.
    assert readme[1] == pytest.approx(measured[1], rel=5e-4), f"README says {readme[1]} SFT tokens, counted {measured}"
    assert readme[:1] + readme[2:] == measured[:1] + measured[2:], (
        f"README says (SFT steps, tokens, % trainable, DPO steps, pairs) = {readme}"
    )


def test_readme_sft_and_dpo_memory_plans_are_what_plan_prints(capsys):
    from genesis_hf.cli import main as cli_main

    match = re.search(r"([\d.]+) GiB per RTX 4090 for the seed's SFT, ([\d.]+) GiB for DPO", readme_text())
    assert match, "the README's post-training section no longer states the seed's SFT and DPO memory plans"
    printed = []
    for stage in ("sft", "dpo"):
        argv = ["plan", "--stage", stage, "--config", str(ROOT / f"recipes/configs/{stage}/genesis-1b.yaml")]
        assert cli_main([*argv, "--gpu", "RTX 4090"]) == 0
        (total,) = re.findall(r"^  total +([\d.]+)$", capsys.readouterr().out, flags=re.M)
        printed.append(f"{float(total):.1f}")
    assert list(match.groups()) == printed


def test_readme_preset_table_parameter_counts_are_the_models():
    from genesis_hf import GenesisConfig
    from genesis_hf.model.sizes import parameter_counts

    rows = re.findall(
        r"^\| `([\w-]+)` \|.*\| ([\d,]+)(?: \(tied\))? \|$", (ROOT / "README.md").read_text(), flags=re.M
    )
    assert {name for name, _ in rows} == {"genesis-1b", "genesis-tiny", "debug"}
    for name, count in rows:
        assert int(count.replace(",", "")) == parameter_counts(GenesisConfig.from_preset(name)).total, name
