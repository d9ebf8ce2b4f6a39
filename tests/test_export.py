"""`genesis-hf export`: hf, llama and gguf exports of a tiny trained model reload with the same logits, and bad input
fails with a message that names the value and the fix."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from genesis_hf import cli, layout
from genesis_hf.model import folder as model_folder
from genesis_hf.model.card import extract_python_snippet
from genesis_hf.publish import export
from genesis_hf.testing import build_tiny_model_folder

# A subprocess that must not see genesis_hf (it is installed in this venv): block the import outright.
BLOCK_GENESIS_HF = "import sys\nsys.modules['genesis_hf'] = None\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = build_tiny_model_folder(folder)
    return folder, model, tokenizer


def _printed_diff(output: str) -> float:
    match = re.search(r"max_abs_logit_diff=(\S+)", output)
    assert match, output
    return float(match.group(1))


def _prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("In 1969, 3 astronauts flew to the Moon. def f(x): return x")["input_ids"][:40]])


def _rounded(model, dtype, keep_1d: bool = False):
    return model_folder._rounded_reference(model, "gguf" if keep_1d else "hf", dtype)


@torch.no_grad()
def _max_diff(model_a, model_b, ids) -> float:
    return (model_a(ids).logits.float() - model_b(ids).logits.float()).abs().max().item()


def test_hf_export_shards_reloads_without_genesis_hf_and_card_snippet_runs(tiny, tmp_path, capsys):
    folder, model, tokenizer = tiny
    out = tmp_path / "hf"
    rc = cli.main(["export", str(folder), str(out), "--format", "hf", "--dtype", "fp32", "--max-shard-size", "40KB"])
    output = capsys.readouterr().out
    assert rc == 0, output
    assert _printed_diff(output) < 1e-5

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / shard).is_file() for shard in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_genesis.GenesisForCausalLM"
    assert (out / "modeling_genesis.py").is_file() and (out / "configuration_genesis.py").is_file()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_token_id, im_end]
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert json.loads((out / "genesis_checkpoint.json").read_text())["step"] == 4
    with Image.open(out / "loss_curve.png") as image:
        assert image.format == "PNG" and image.width > 100

    # The card's usage snippet, pointed at the folder, in a process where genesis_hf cannot be imported: it must run
    # through the copied modeling code, and the model it loads must give the source logits.
    snippet = extract_python_snippet((out / "README.md").read_text())
    snippet = re.sub(r'repo_id = ".*"', f"repo_id = {str(out)!r}", snippet)
    ids = _prompt_ids(tokenizer)
    script = (
        BLOCK_GENESIS_HF
        + snippet
        + textwrap.dedent(
            f"""
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        logits = model(torch.tensor({ids.tolist()})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
        )
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids).logits
    assert (torch.load(tmp_path / "logits.pt", weights_only=True) - expected).abs().max().item() < 1e-5
    # The snippet's own generate() call (KV cache on) prints what LlamaForCausalLM generates on the same weights.
    inputs = tokenizer("The history of science", return_tensors="pt")
    with torch.no_grad():
        peer_ids = model_folder.to_llama(model).generate(**inputs, max_new_tokens=32, do_sample=False)
    assert result.stdout.splitlines() == [tokenizer.decode(peer_ids[0], skip_special_tokens=True)]


def test_llama_export_loads_with_plain_llama(tiny, tmp_path):
    folder, model, tokenizer = tiny
    out = tmp_path / "llama"
    result = export.export_checkpoint(folder, out, export_format="llama", dtype="bf16")
    assert result.verification.max_abs_diff < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not list(out.glob("*.py"))
    llama = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _max_diff(llama, _rounded(model, torch.bfloat16), _prompt_ids(tokenizer)) < 1e-5

    snippet = extract_python_snippet((out / "README.md").read_text())
    assert "trust_remote_code" not in snippet
    namespace = {}
    exec(re.sub(r'repo_id = ".*"', f"repo_id = {str(out)!r}", snippet), namespace)
    assert isinstance(namespace["model"], LlamaForCausalLM)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gguf_export_reloads_through_transformers(tiny, tmp_path, dtype):
    from gguf import GGMLQuantizationType, GGUFReader

    folder, model, tokenizer = tiny
    out = tmp_path / f"gguf-{dtype}"
    result = export.export_checkpoint(folder, out, export_format="gguf", dtype=dtype)
    assert result.verification.max_abs_diff < 1e-5
    gguf_file = result.gguf_file
    assert gguf_file == f"genesis-{'F32' if dtype == 'fp32' else 'BF16'}.gguf"

    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32)
    reference = _rounded(model, model_folder.EXPORT_DTYPES[dtype], keep_1d=True)
    assert _max_diff(reloaded, reference, _prompt_ids(tokenizer)) < 1e-5
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file)
    for prompt in model_folder.VERIFY_PROMPTS:
        assert gguf_tokenizer(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]

    reader = GGUFReader(out / gguf_file)
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings
    expected_type = GGMLQuantizationType.F32 if dtype == "fp32" else GGMLQuantizationType.BF16
    assert tensors["blk.0.attn_q.weight"].tensor_type == expected_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    if dtype == "fp32":
        # Stored in llama.cpp's rotary layout: HF's q/k rows permuted per head.
        q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        stored = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(q_proj.shape)
        assert np.array_equal(stored, model_folder.gguf_permute(q_proj, model.config.num_attention_heads))
        assert not np.array_equal(stored, q_proj)


def test_gguf_without_the_qk_permutation_is_caught(tiny, tmp_path):
    folder, model, tokenizer = tiny
    # Sharpen attention so that the rotary layout visibly matters (a briefly trained model attends almost uniformly).
    sharp = model_folder.LoadedCheckpoint(
        model=_rounded(model, torch.float32), tokenizer=tokenizer, path=folder, kind="hf"
    )
    with torch.no_grad():
        for layer in sharp.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    gguf_file = model_folder._write_gguf(sharp.model, tokenizer, wrong, "fp32", permute=False)
    with pytest.raises(model_folder.ExportMismatchError, match="does not reproduce the source model"):
        model_folder.verify_export(
            sharp.model, tokenizer, wrong, export_format="gguf", dtype="fp32", gguf_file=gguf_file
        )
    result = export.export_checkpoint(sharp, tmp_path / "right", export_format="gguf", dtype="fp32")
    assert result.verification.max_abs_diff < 1e-5


def test_hf_verification_loads_the_folder_as_the_class_serving_engines_name(tiny, tmp_path):
    """`transformers serve` and vLLM load the class `architectures` names, not auto_map's: a folder that names
    `GenesisForCausalLM` there (what save_pretrained writes) is refused; an export names `LlamaForCausalLM`, and both
    loads give the source logits."""
    folder, model, tokenizer = tiny
    with pytest.raises(model_folder.ExportMismatchError, match="GenesisForCausalLM.*transformers serve"):
        model_folder.verify_export(model, tokenizer, folder, export_format="hf", dtype="fp32")
    out = tmp_path / "hf"
    result = export.export_checkpoint(folder, out, export_format="hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "genesis"
    assert result.verification.max_abs_diff < 1e-5


def test_card_has_architecture_training_config_evals_and_no_secrets(tiny, tmp_path):
    folder, _, _ = tiny
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(folder, checkpoint)
    secret = "hf_abcdefghijklmnopqrstuvwxyz012345"
    (checkpoint / "run_config.yaml").write_text(
        f"learning_rate: 0.001\nhub_token: {secret}\nmixture: {{fineweb-edu: 0.7, starcoder: 0.3}}\n"
    )
    evals = {
        "results": {"hellaswag": {"acc_norm,none": 0.31, "acc_norm_stderr,none": 0.01}, "piqa": {"acc,none": 0.6}}
    }
    (checkpoint / "eval_results.json").write_text(json.dumps(evals))
    out = tmp_path / "out"
    export.export_checkpoint(
        checkpoint, out, export_format="hf", dtype="bf16", repo_id="alice/genesis-tiny", redact=[secret]
    )
    text = (out / "README.md").read_text()
    assert secret not in text and "hub_token" not in text
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    results = {(result.dataset_type, result.metric_type): result.metric_value for result in card.data.eval_results}
    assert results == {("hellaswag", "acc_norm"): 0.31, ("piqa", "acc"): 0.6}
    for expected in (
        "| hidden size | 32 |",
        "| layers | 2 |",
        "learning_rate: 0.001",
        "| fineweb-edu | 0.7 |",
        "![Training loss](loss_curve.png)",
        'repo_id = "alice/genesis-tiny"',
        "| tokens seen | 2,048 |",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("biases", [False, True])
def test_card_parameter_count_is_the_models(biases):
    from genesis_hf import GenesisConfig, GenesisForCausalLM
    from genesis_hf.model.card import architecture_rows

    config = GenesisConfig.from_preset("debug", attention_bias=biases, mlp_bias=biases, tie_word_embeddings=not biases)
    rows = dict(architecture_rows(config))
    assert rows["parameters"] == f"{sum(parameter.numel() for parameter in GenesisForCausalLM(config).parameters()):,}"


def test_export_from_a_training_checkpoint(tiny, tmp_path, capsys):
    from genesis_hf.pretrain import checkpoint as ckpt

    _, model, tokenizer = tiny
    model = _rounded(model, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters())
    manager = ckpt.CheckpointManager(
        tmp_path / "run",
        save_total_limit=None,
        milestone_steps=None,
        async_save=False,
        run_config={"learning_rate": 0.001},
        model_config=model.config,
        tokenizer=tokenizer,
    )
    state = {"step": 7, "tokens_seen": 3584, "loss": 5.1}
    manager.save(7, model, optimizer, state, {"data_loader": {}, "rng": ckpt.capture_rng_state()})
    manager.close()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000007"
    assert layout.is_pretraining_checkpoint(checkpoint)
    rc = cli.main(["export", str(checkpoint), str(tmp_path / "out"), "--dtype", "fp32"])
    output = capsys.readouterr().out
    assert rc == 0 and _printed_diff(output) < 1e-5
    metadata = json.loads((tmp_path / "out" / "genesis_checkpoint.json").read_text())
    assert (metadata["step"], metadata["tokens_seen"]) == (7, 3584)

    # The same checkpoint with its model shards' metadata gone (a partial copy) is refused with the reason.
    partial = tmp_path / "partial" / "step-0000007"
    shutil.copytree(checkpoint, partial)
    (partial / "model" / ".metadata").unlink()
    assert cli.main(["export", str(partial), str(tmp_path / "out-partial")]) == 2
    error = capsys.readouterr().err
    assert str(partial) in error and "pick another step or copy the checkpoint again" in error, error


def _partial_no_weights(folder, tmp_path):
    target = tmp_path / "no-weights"
    target.mkdir()
    shutil.copy(folder / "config.json", target)
    return target, "no weights"


def _partial_no_config(folder, tmp_path):
    target = tmp_path / "no-config"
    shutil.copytree(folder, target)
    (target / "config.json").unlink()
    return target, "config.json is missing"


def _missing_shard(folder, tmp_path):
    target = tmp_path / "sharded"
    model = export._load_model_folder(folder)
    model.save_pretrained(target, max_shard_size="40KB")
    shutil.copy(folder / "tokenizer.json", target)
    shutil.copy(folder / "tokenizer_config.json", target)
    next(target.glob("model-00002-of-*.safetensors")).unlink()
    return target, "missing: model-00002-of-"


def _other_config(folder, tmp_path):
    target = tmp_path / "other-config"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (target / "config.json").write_text(json.dumps(config))
    return target, "do not"


def _missing_checkpoint(folder, tmp_path):
    return tmp_path / "does-not-exist", "does not exist"


@pytest.mark.parametrize(
    "make_input", [_missing_checkpoint, _partial_no_weights, _partial_no_config, _missing_shard, _other_config]
)
def test_bad_checkpoints_fail_with_a_clear_message(tiny, tmp_path, capsys, make_input):
    folder, _, _ = tiny
    checkpoint, expected = make_input(folder, tmp_path)
    out = tmp_path / "out"
    assert cli.main(["export", str(checkpoint), str(out)]) == 2
    error = capsys.readouterr().err
    assert expected in error and str(checkpoint) in error, error
    assert not out.exists()


def test_a_tokenizer_that_does_not_fit_is_refused(tiny, tmp_path, capsys):
    from genesis_hf.tokenizer import train_tokenizer

    folder, _, _ = tiny
    big = train_tokenizer([(folder / "modeling_genesis.py").read_text()] * 3, 400)
    big.save_pretrained(tmp_path / "big-tokenizer")
    rc = cli.main(["export", str(folder), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "big-tokenizer")])
    error = capsys.readouterr().err
    assert rc == 2
    assert "400 tokens" in error and "vocab_size=304" in error and "--tokenizer" in error


def test_existing_output_needs_overwrite_and_only_an_earlier_export_is_replaced(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["export", str(folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite does not make a folder of the user's into an export: keep.txt survives.
    assert cli.main(["export", str(folder), str(out), "--overwrite"]) == 2
    assert "keep.txt" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    assert cli.main(["export", str(folder), str(out)]) == 0  # empty: written
    assert cli.main(["export", str(folder), str(out), "--overwrite", "--dtype", "fp32"]) == 0  # an export: replaced
    assert (out / "model.safetensors").is_file() and (out / layout.EXPORT_MARKER_FILE).is_file()
