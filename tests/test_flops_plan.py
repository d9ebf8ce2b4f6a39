"""FLOPs per token, MFU and the `genesis-hf plan` memory estimate, checked against the seed project's numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.args import ConfigError
from genesis_hf.cli import main as cli_main
from genesis_hf.model.sizes import parameter_counts
from genesis_hf.pretrain.flops import (
    PEAK_FLOPS,
    PEAK_FLOPS_ENV,
    detect_peak_flops,
    flops_per_token,
    mfu,
    peak_flops_for_name,
)
from genesis_hf.pretrain.plan import GPU_MEMORY_BYTES, activation_bytes_per_token_per_layer, estimate_memory

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
GIB = 1024**3
SEED_SETTING = dict(gpus=2, micro_batch=4, seq_len=2048, activation_checkpointing=True, gpu="RTX 4090")


@pytest.fixture(scope="module")
def genesis_1b() -> GenesisConfig:
    return GenesisConfig.from_preset("genesis-1b")


# FLOPs and MFU


@pytest.mark.parametrize(
    "overrides",
    [
        {"preset": "genesis-1b"},
        {"preset": "debug"},
        {"preset": "debug", "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
    ],
)
def test_parameter_counts_match_the_model(overrides):
    preset = overrides.pop("preset")
    config = GenesisConfig.from_preset(preset, **overrides)
    with torch.device("meta"):
        model = GenesisForCausalLM(config)
    assert parameter_counts(config).total == sum(parameter.numel() for parameter in model.parameters())


def test_genesis_1b_flops_per_token(genesis_1b):
    counts = parameter_counts(genesis_1b)
    assert counts.total == pytest.approx(1.0e9, rel=0.01)
    # Matmul weights: 32 layers of projections plus the (tied) 49152 x 1536 output projection.
    assert counts.matmul == 32 * counts.per_layer_matmul + 49_152 * 1536
    attention = 12 * 32 * 1536 * 2048
    assert flops_per_token(genesis_1b, 2048) == 6 * counts.matmul + attention
    assert flops_per_token(genesis_1b, 2048, include_attention=False) == pytest.approx(6.0e9, rel=0.01)
    assert 7.1e9 < flops_per_token(genesis_1b, 2048) < 7.3e9
    assert flops_per_token(genesis_1b, 4096) - flops_per_token(genesis_1b, 2048) == attention


def test_seed_mfu(genesis_1b):
    # 19,000 tok/s on 2x RTX 4090 (165.2 TFLOPS dense bf16 each). The seed's ~35% is the 6N convention:
    # 19,000 * 6.00e9 / 330.4e12 = 34.5%. The attention term (+1.21e9 FLOPs/token at 2048) lifts it to 41.5%.
    peak = PEAK_FLOPS["RTX 4090"]
    six_n = mfu(19_000, flops_per_token(genesis_1b, 2048, include_attention=False), peak, world_size=2)
    assert 0.33 <= six_n <= 0.37
    full = mfu(19_000, flops_per_token(genesis_1b, 2048), peak, world_size=2)
    assert 0.39 <= full <= 0.44
    assert mfu(19_000, 7e9, None, world_size=2) is None
    with pytest.raises(ValueError, match="world_size"):
        mfu(19_000, 7e9, peak, world_size=0)


def test_peak_flops_table_and_device_names():
    assert PEAK_FLOPS["RTX 4090"] == 165.2e12
    assert PEAK_FLOPS["A100"] == 312e12 and PEAK_FLOPS["H100 SXM"] == 989e12 and PEAK_FLOPS["H100 PCIe"] == 756e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") == 165.2e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA GeForce GTX 1080") is None


def test_detect_peak_flops_on_cpu_and_env_override(monkeypatch):
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    assert detect_peak_flops("cpu") is None
    assert detect_peak_flops(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert detect_peak_flops() is None
    monkeypatch.setenv(PEAK_FLOPS_ENV, "123.5e12")
    assert detect_peak_flops("cpu") == 123.5e12
    assert detect_peak_flops() == 123.5e12
    for bad in ("fast", "-1", "0"):
        monkeypatch.setenv(PEAK_FLOPS_ENV, bad)
        with pytest.raises(ConfigError, match=PEAK_FLOPS_ENV):
            detect_peak_flops("cpu")


# Memory plan


def test_seed_setting_estimate(genesis_1b):
    # The seed measured ~20 GB per RTX 4090 for this setting.
    plan = estimate_memory(genesis_1b, **SEED_SETTING)
    assert 14 * GB <= plan.total_bytes <= 24 * GB
    assert plan.fits is True and plan.gpu_memory_bytes == 24 * GIB
    # The logits buffer is 4 micro-batches x 2048 tokens x 49152 vocab x (bf16 + 2 fp32) bytes.
    assert plan.logits_bytes == 4 * 2048 * 49_152 * 10
    without = estimate_memory(genesis_1b, **{**SEED_SETTING, "activation_checkpointing": False})
    assert without.fits is False and without.total_bytes > 24 * GIB
    assert without.verdict("RTX 4090") == "does not fit"


def test_checkpointing_reduces_activations(genesis_1b):
    plan = estimate_memory(genesis_1b, **SEED_SETTING)
    without = estimate_memory(genesis_1b, **{**SEED_SETTING, "activation_checkpointing": False})
    assert plan.activations_bytes == plan.activations_with_checkpointing_bytes
    assert without.activations_bytes == plan.activations_without_checkpointing_bytes
    assert plan.activations_bytes * 5 < without.activations_bytes
    assert plan.total_bytes < without.total_bytes


def test_more_gpus_reduce_sharded_states(genesis_1b):
    plans = [estimate_memory(genesis_1b, **{**SEED_SETTING, "gpus": gpus}) for gpus in (2, 4, 8)]
    for fewer, more in zip(plans, plans[1:]):
        assert more.parameters_bytes < fewer.parameters_bytes
        assert more.optimizer_bytes < fewer.optimizer_bytes
        assert more.total_bytes < fewer.total_bytes
    synced = [
        estimate_memory(genesis_1b, **{**SEED_SETTING, "gpus": gpus}, gradient_sync_every_micro_batch=True)
        for gpus in (2, 4, 8)
    ]
    assert synced[0].gradients_bytes > synced[1].gradients_bytes > synced[2].gradients_bytes
    assert synced[0].total_bytes < plans[0].total_bytes  # no unsharded gradient accumulation
    assert plans[0].optimizer_bytes == pytest.approx(8 * parameter_counts(genesis_1b).total / 2, abs=8)


def test_activation_formula_matches_autograd_saved_tensors():
    # A small bf16 model on CPU: count the bytes autograd saves for one decoder layer (excluding weights) and
    # compare with the formula the plan uses.
    config = GenesisConfig.from_preset(
        "debug", hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2
    )
    config._attn_implementation = "sdpa"
    model = GenesisForCausalLM(config).to(torch.bfloat16)
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    batch, seq_len = 2, 32
    hidden = torch.randn(batch, seq_len, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    position_ids = torch.arange(seq_len)[None]
    position_embeddings = model.model.rotary_emb(hidden, position_ids)

    def saved_bytes(num_layers: int) -> int:
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        ):
            states = hidden
            for layer in model.model.layers[:num_layers]:
                states = layer(states, position_embeddings=position_embeddings, position_ids=position_ids)
        return sum(storages.values())

    per_layer = saved_bytes(2) - saved_bytes(1)
    assert per_layer == activation_bytes_per_token_per_layer(config) * batch * seq_len


def test_estimate_errors(genesis_1b):
    with pytest.raises(ConfigError, match="Valid GPUs are: .*'RTX 4090'"):
        estimate_memory(genesis_1b, **{**SEED_SETTING, "gpu": "TPU v5"})
    with pytest.raises(ConfigError, match="gpus must be a positive integer"):
        estimate_memory(genesis_1b, **{**SEED_SETTING, "gpus": 0})
    assert estimate_memory(genesis_1b, **{**SEED_SETTING, "gpu": None}).fits is None
    assert estimate_memory(genesis_1b, **{**SEED_SETTING, "gpu": "rtx4090"}).gpu == "RTX 4090"


# CLI


def test_cli_json_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "genesis_hf.cli", "plan", "--preset", "genesis-1b", "--gpus", "2"]
        + ["--gpu", "RTX 4090", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["preset"] == "genesis-1b" and report["gpu"] == "RTX 4090" and report["fits"] is True
    assert 14 * GB <= report["total_bytes"] <= 24 * GB
    assert set(report["gpu_table"]) == set(GPU_MEMORY_BYTES)
    assert report["gpu_table"]["H200"]["verdict"] == "fits"
    assert report["flops_per_token"] == pytest.approx(7.21e9, rel=0.01)


def test_cli_human_table(capsys):
    assert cli_main(["plan", "--preset", "genesis-1b", "--gpu", "RTX 4090", "--no-activation-checkpointing"]) == 0
    output = capsys.readouterr().out
    assert "activation checkpointing off" in output
    assert "RTX 4090" in output and "does not fit" in output and "<- --gpu" in output


def test_cli_reads_pretrain_yaml_and_flags_win(tmp_path, capsys):
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "model_preset": "genesis-tiny",
                "per_device_train_batch_size": 2,
                "seq_len": 128,
                "gradient_checkpointing": False,
                "model_overrides": {"vocab_size": 4100},
                "learning_rate": 3e-3,  # keys the plan does not need are ignored
                "mixture": "default",
            }
        )
    )
    assert cli_main(["plan", "--config", str(config_file), "--gpus", "1", "--micro-batch", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"] == "genesis-tiny" and report["micro_batch"] == 3 and report["seq_len"] == 128
    assert report["activation_checkpointing"] is False and report["gpus"] == 1
    assert report["logits_bytes"] == 3 * 128 * 4100 * 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "genesis-7b"], "Valid presets are: debug, genesis-1b, genesis-tiny"),
        (["--gpu", "A100"], "Valid GPUs are: 'RTX 3090', 'RTX 4090'"),
        (["--gpus", "0"], "gpus must be a positive integer"),
        (["--config", "no/such/file.yaml"], "does not exist"),
    ],
)
def test_cli_errors_exit_2_without_traceback(argv, message, capsys):
    assert cli_main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_rejects_non_boolean_checkpointing_in_yaml(tmp_path, capsys):
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text("gradient_checkpointing: sometimes\n")
    assert cli_main(["plan", "--config", str(config_file)]) == 2
    assert "gradient_checkpointing" in capsys.readouterr().err
