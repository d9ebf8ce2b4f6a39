"""Model cards follow the Hub's conventions for each kind of folder the recipes write, read back with
`huggingface_hub.ModelCard.load`: a pretraining `final/` (from scratch), an SFT and a DPO `final/` (`base_model` with
`base_model_relation: finetune`), a LoRA `adapter/` (`adapter`, `library_name: peft`) and a GGUF export
(`quantized`, how to run it with llama.cpp and Ollama). `base_model` holds only Hub repo ids; a base that lives only
on disk is named in the text.

One tiny pipeline for the module: `recipes/pretrain.py` in a subprocess (debug preset), then SFT with LoRA and DPO
in this process for two steps each, then a GGUF export of the SFT model.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = {
    "model_preset": "debug",
    "model_overrides": {"vocab_size": 512},
    "seq_len": 32,
    "per_device_train_batch_size": 2,
    "tokens_per_step": 128,
    "max_steps": 2,
    "warmup_steps": 1,
    "save_steps": 2,
    "eval_steps": 2,
    "eval_batches": 1,
    "per_device_eval_batch_size": 2,
    "logging_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
}
POSTTRAIN_FLAGS = ["--max_steps", "2", "--max_length", "64", "--per_device_train_batch_size", "2",
                   "--logging_steps", "1", "--disable_tqdm", "true"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_recipe_in_process(name: str, argv: list[str]) -> int:
    import importlib.util

    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def publish_journal(run_dir: Path, repo_id: str) -> None:
    """What the Hub pusher leaves in a run it published: its journal naming the repo."""
    from genesis_hf.publish.push import UploadJournal

    journal = UploadJournal(run_dir / "hub_uploads.json")
    journal.data["repo_id"] = repo_id
    journal.save()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_env, test_mixture) -> dict[str, Path]:
    import subprocess

    root = tmp_path_factory.mktemp("cards")
    config = root / "pretrain.yaml"
    config.write_text(yaml.safe_dump({**PRETRAIN_CONFIG, "mixture": test_mixture, "output_dir": str(root / "tiny")}))
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--config", str(config), "--seed", "3"],
        env=run_env, cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    publish_journal(root / "tiny", "alice/genesis-tiny")  # the pretraining run was pushed; SFT starts from its final/

    sft_argv = ["--model_name_or_path", str(root / "tiny" / "final"), "--output_dir", str(root / "sft"),
                "--use_peft", "true", "--lora_r", "4", *POSTTRAIN_FLAGS]  # fmt: skip
    assert run_recipe_in_process("sft", sft_argv) == 0
    # DPO from the SFT model, which lives only on disk: no base_model in the metadata.
    dpo_argv = [
        "--model_name_or_path",
        str(root / "sft" / "final"),
        "--output_dir",
        str(root / "dpo"),
        *POSTTRAIN_FLAGS,
    ]
    assert run_recipe_in_process("dpo", dpo_argv) == 0

    from genesis_hf.publish.export import export_checkpoint

    publish_journal(root / "sft", "alice/genesis-tiny-chat")  # then the SFT run is published, and converted
    export_checkpoint(root / "sft" / "final", root / "gguf", export_format="gguf", dtype="fp32")
    return {"root": root, "pretrain": root / "tiny", "sft": root / "sft", "dpo": root / "dpo", "gguf": root / "gguf"}


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_pretraining_final_card_is_trained_from_scratch_with_its_command_and_numbers(runs):
    card = card_of(runs["pretrain"] / "final")
    data = card.data
    assert data.base_model is None and data.get("base_model_relation") is None
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "pretraining" in data.tags and "sft" not in data.tags
    assert card.text.startswith("\n# tiny\n") and "trained from scratch" in card.text
    assert "Recipe: `accelerate launch recipes/pretrain.py --config" in card.text and "--seed 3" in card.text
    metadata = json.loads((runs["pretrain"] / "final" / "genesis_checkpoint.json").read_text())
    assert metadata["lineage"]["stage"] == "pretraining" and metadata["step"] == 2
    assert (
        f"| step | {metadata['step']} |" in card.text and f"| tokens seen | {metadata['tokens_seen']} |" in card.text
    )
    assert "| training loss |" in card.text and "lineage" not in card.text.split("### Training configuration")[1]


def test_sft_final_card_names_its_hub_base_and_stage(runs):
    card = card_of(runs["sft"] / "final")
    data = card.data
    assert data.base_model == "alice/genesis-tiny" and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"sft", "trl"} <= set(data.tags) and "pretraining" not in data.tags
    assert card.text.startswith("\n# tiny-sft\n") and "trained from scratch" not in card.text
    assert "SFTTrainer" in card.text and "Stage: SFT" in card.text and "Data: `default`" in card.text
    assert f"Started from: `{runs['pretrain'] / 'final'}`, published as [alice/genesis-tiny]" in card.text
    assert "Recipe: `accelerate launch recipes/sft.py --model_name_or_path" in card.text
    assert "DPOConfig(..., trust_remote_code=True)" in card.text
    assert "| step | 2 |" in card.text


def test_lora_adapter_card_is_a_peft_adapter_of_the_hub_base(runs):
    card = card_of(runs["sft"] / "adapter")
    data = card.data
    assert data.base_model == "alice/genesis-tiny" and data.base_model_relation == "adapter"
    assert data.library_name == "peft" and "lora" in data.tags and "pretraining" not in data.tags
    assert "AutoPeftModelForCausalLM" in card.text and "# tiny-sft (LoRA adapter)" in card.text


def test_dpo_final_card_keeps_a_local_base_in_the_text_only(runs):
    card = card_of(runs["dpo"] / "final")
    data = card.data
    assert data.base_model is None and data.get("base_model_relation") is None
    assert {"dpo", "trl"} <= set(data.tags) and "pretraining" not in data.tags
    assert card.text.startswith("\n# tiny-sft-dpo\n") and "DPOTrainer" in card.text
    assert f"Started from: `{runs['sft'] / 'final'}`\n" in card.text and "Data: `embedded:dpo`" in card.text
    assert "DPOConfig(..., trust_remote_code=True)" in card.text


def test_gguf_card_is_a_quantization_of_the_published_model_with_llama_cpp_and_ollama(runs):
    card = card_of(runs["gguf"])
    data = card.data
    (gguf_file,) = [path.name for path in runs["gguf"].glob("*.gguf")]
    assert data.base_model == "alice/genesis-tiny-chat" and data.base_model_relation == "quantized"
    assert data.library_name == "gguf" and "gguf" in data.tags and "sft" in data.tags
    assert card.text.startswith("\n# tiny-sft-GGUF\n")
    assert f"llama-cli -m {gguf_file}" in card.text and f"FROM ./{gguf_file}" in card.text
    # The lineage travels with the export: the GGUF file still knows its SFT recipe and its base.
    assert "Recipe: `accelerate launch recipes/sft.py" in card.text
    lineage = json.loads((runs["gguf"] / "genesis_checkpoint.json").read_text())["lineage"]
    assert lineage["stage"] == "sft" and lineage["base_model_hub_id"] == "alice/genesis-tiny"
