"""Stock Hugging Face tools on the folders the recipes write, as a user without genesis_hf runs them.

Each stock use runs in a subprocess where `import genesis_hf` fails (a `sitecustomize.py` on its PYTHONPATH blocks the
package, which the venv otherwise finds through its editable install): only the files in the folder, transformers,
PEFT and TRL are there. The folders come from `recipes/sft.py` run once per module on a tiny base, full fine-tuning
(`outputs/sft-tiny`, the folder the README serves) and LoRA (`outputs/sft-lora`, with its `adapter/`).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IM_END, EOS_TOKEN = "<|im_end|>", "<|endoftext|>"
HI = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
# Importing genesis_hf fails in the stock processes; anything else imports as usual.
BLOCKER = """import sys


class BlockGenesis:
    def find_spec(self, name, path=None, target=None):
        if name == "genesis_hf" or name.startswith("genesis_hf."):
            raise ImportError(f"{name} is blocked: this process may use stock tools only")
        return None


sys.meta_path.insert(0, BlockGenesis())
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`<root>/outputs/sft-tiny` (full SFT) and `<root>/outputs/sft-lora` (LoRA) trained from a tiny base without
    chat tokens on one conversation ("Say hi." -> "hi"), so the chat setup adds the ChatML tokens (300-303)."""
    from accelerate.state import AcceleratorState

    from genesis_hf.testing import build_tiny_model_folder

    root = tmp_path_factory.mktemp("stock")
    base = root / "outputs" / "genesis-tiny" / "final"
    build_tiny_model_folder(base, chat_tokens=False, metrics=False)
    data = root / "hi.jsonl"
    data.write_text("".join(json.dumps({"messages": HI}) + "\n" for _ in range(16)))
    recipe = load_recipe("sft")
    for name, extra in (("sft-tiny", []), ("sft-lora", ["--use_peft", "true", "--lora_r", "4"])):
        argv = ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir",
                str(root / "outputs" / name), "--max_steps", "30", "--learning_rate", "1e-2", "--lr_scheduler_type",
                "constant", "--warmup_steps", "0", "--max_length", "64", "--save_strategy", "no",
                "--disable_tqdm", "true", *extra]  # fmt: skip
        try:
            assert recipe.main(argv) == 0
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return root / "outputs"


@pytest.fixture(scope="module")
def stock_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the stock processes: genesis_hf blocked, private HF home (remote code cache), offline, CPU."""
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(blocker),
        HF_HOME=str(tmp_path_factory.mktemp("stock-hf-home")),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


def run_stock(code: str, env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Python `code` in a stock process (stdin closed: a prompt could not be answered)."""
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_genesis_hf_cannot_be_imported_in_the_stock_processes(stock_env, tmp_path):
    result = run_stock("import genesis_hf", stock_env, tmp_path, timeout=60)
    assert result.returncode != 0 and "genesis_hf is blocked" in result.stderr


# What a user of the stock libraries runs on the folders. Each check records its result or its error (its last line),
# so that one failing use does not hide the others; the report is one JSON line.
STOCK_CHECKS = r"""
import json, sys, traceback
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

final, lora_final, adapter = sys.argv[1:4]
report = {}

def check(name):
    def record(function):
        try:
            report[name] = function()
        except Exception:
            report[name] = {"error": traceback.format_exc().strip().splitlines()[-1]}
    return record

def lora_targets(model):
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    return sorted(name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer))

# PEFT's default targets: the Genesis folder through its remote code, and the same folder loaded as a Llama.
@check("peft_defaults")
def _():
    genesis = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True, dtype=torch.float32)
    llama = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32)
    return {"model_type": genesis.config.model_type, "genesis": lora_targets(genesis), "llama": lora_targets(llama)}

# The LoRA run's adapter folder alone, against the merged final/ of the same run.
@check("adapter")
def _():
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    adapted = AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_final, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
        with adapted.disable_adapter():
            without = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    return {"vs_merged": difference, "base_vs_merged": without,
            "tokenizer": [len(tokenizer), tokenizer.eos_token, bool(tokenizer.chat_template)]}

# Stop tokens as stock generate() reads them.
@check("stop")
def _():
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)
    return {"eos_token_id": GenerationConfig.from_pretrained(final).eos_token_id,
            "ids": tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}

# The tokenizer with the flag the README gives (config.json's model_type is genesis): no prompt, the chat template.
@check("tokenizer")
def _():
    import builtins
    prompts = []
    builtins.input = lambda prompt="": prompts.append(prompt) or "n"
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)
    return {"prompts": prompts, "class": type(tokenizer).__name__, "chat_template": bool(tokenizer.chat_template)}

print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def stock_report(runs, stock_env, tmp_path_factory) -> dict:
    folders = [runs / "sft-tiny" / "final", runs / "sft-lora" / "final", runs / "sft-lora" / "adapter"]
    code = STOCK_CHECKS.replace("sys.argv[1:4]", repr([str(folder) for folder in folders]))
    result = run_stock(code, stock_env, tmp_path_factory.mktemp("stock-cwd"))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peft_default_targets_are_llamas(stock_report):
    """`LoraConfig(task_type="CAUSAL_LM")` without target_modules: PEFT looks its defaults up by model_type, and the
    remote code gives `genesis` Llama's entry."""
    report = stock_report["peft_defaults"]
    assert "error" not in report, report["error"]
    assert report["model_type"] == "genesis" and report["genesis"] == report["llama"]
    assert {name.rsplit(".", 1)[-1] for name in report["genesis"]} == {"q_proj", "v_proj"}


def test_adapter_folder_loads_with_stock_peft_and_gives_the_merged_logits(stock_report):
    report = stock_report["adapter"]
    assert "error" not in report, report["error"]
    assert report["tokenizer"] == [304, IM_END, True]
    assert report["vs_merged"] < 1e-5
    assert report["base_vs_merged"] > 1e-3  # the adapter is what makes them equal


def test_chat_model_stops_on_im_end_then_endoftext(stock_report):
    report = stock_report["stop"]
    assert "error" not in report, report["error"]
    assert report["ids"] == [301, 0]
    assert report["eos_token_id"] == report["ids"]


def test_tokenizer_loads_without_a_prompt_as_the_readme_says(stock_report):
    """`AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` asks nothing and needs no genesis_hf (without
    the flag transformers asks about config.json's remote code first: README, Stock tools)."""
    report = stock_report["tokenizer"]
    assert "error" not in report, report["error"]
    assert report == {"prompts": [], "class": "TokenizersBackend", "chat_template": True}


def test_final_config_names_llamas_architecture_and_genesis_remote_code(runs):
    config = json.loads((runs / "sft-tiny" / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "genesis"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_genesis.GenesisForCausalLM"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_transformers_serve_answers_a_chat_completion_in_the_models_template(runs, stock_env, tmp_path):
    """The README's `transformers serve outputs/sft-tiny/final --trust-remote-code`, over HTTP; the oracle is the same
    folder's greedy reply in this process, from its chat template and generation config."""
    from test_readme import readme_command
    from transformers import AutoModelForCausalLM, AutoTokenizer

    command = readme_command(".venv/bin/transformers serve outputs/sft-tiny/final")
    assert "--trust-remote-code" in command
    port = free_port()
    command[command.index("8000")] = str(port)
    command += ["--host", "127.0.0.1", "--device", "cpu"]
    server = subprocess.Popen(
        command, cwd=runs.parent, env=stock_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-4000:]
                assert time.monotonic() < deadline, "transformers serve did not come up in three minutes"
                time.sleep(0.25)
        request = {"model": "outputs/sft-tiny/final", "messages": HI[:1], "max_tokens": 8, "temperature": 0.0}
        http_request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(http_request, timeout=120) as response:
            reply = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    served = reply["choices"][0]["message"]["content"]

    final = runs / "sft-tiny" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer.apply_chat_template(HI[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert tokenizer.decode(prompt["input_ids"][0]).endswith(
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    # A reply the run learned (not an empty or runaway one), ended by <|im_end|>, the same over HTTP.
    assert output[0, -1].item() == tokenizer.convert_tokens_to_ids(IM_END) and expected.strip()
    assert served == expected


def test_trl_sft_use_peft_without_target_modules(runs, stock_env, tmp_path):
    """`trl sft --use_peft` on a chat folder with PEFT's default targets, as on a Llama folder."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"messages": HI}) + "\n" for _ in range(4)))
    command = [str(VENV_BIN / "trl"), "sft", "--model_name_or_path", str(runs / "sft-tiny" / "final"),
               "--dataset_name", str(data), "--use_peft", "--trust_remote_code", "--max_steps", "2",
               "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_length", "64",
               "--per_device_train_batch_size", "2", "--bf16", "false", "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=stock_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
