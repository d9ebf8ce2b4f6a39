"""GenesisForCausalLM: Llama parity, Auto-class round trips, cache, attention kernels, checkpointing, config errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from genesis_hf import GENESIS_PRESETS, GenesisConfig, GenesisForCausalLM
from genesis_hf.model.convert import from_llama, to_llama

PARITY_TOLERANCE = 1e-5


def tiny_model(seed: int = 0, **overrides) -> GenesisForCausalLM:
    torch.manual_seed(seed)
    return GenesisForCausalLM(GenesisConfig.from_preset("debug", **overrides)).eval()


def random_ids(batch: int = 2, seq: int = 16, vocab: int = 99, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_llama_parity_both_ways(tie_word_embeddings):
    genesis = tiny_model(tie_word_embeddings=tie_word_embeddings)
    llama = to_llama(genesis)
    assert type(llama) is LlamaForCausalLM
    ids = random_ids()
    with torch.no_grad():
        genesis_logits = genesis(ids).logits
        llama_logits = llama(ids).logits
        difference = (genesis_logits - llama_logits).abs().max().item()
        print(f"genesis -> llama max abs logit difference: {difference:.3e}")
        assert difference < PARITY_TOLERANCE

        back = from_llama(llama)
        assert type(back) is GenesisForCausalLM
        back_difference = (back(ids).logits - llama_logits).abs().max().item()
        print(f"llama -> genesis max abs logit difference: {back_difference:.3e}")
        assert back_difference < PARITY_TOLERANCE
    # The copies are independent: changing one does not change the other.
    with torch.no_grad():
        llama.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(llama.model.embed_tokens.weight, genesis.model.embed_tokens.weight)


def test_parity_catches_a_wrong_rope_convention():
    """The parity check is sharp enough to see the kind of export bug that sank the seed's evals."""
    genesis = tiny_model()
    llama = to_llama(genesis)
    head_dim = genesis.config.head_dim
    # Interleaved-pair layout instead of half-split: permute q_proj rows within each head.
    permutation = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
    with torch.no_grad():
        weight = llama.model.layers[0].self_attn.q_proj.weight
        heads = weight.view(-1, head_dim, weight.shape[-1])
        weight.copy_(heads[:, permutation, :].reshape_as(weight))
        difference = (genesis(random_ids()).logits - llama(random_ids()).logits).abs().max().item()
    assert difference > 1e-3


def test_save_pretrained_loads_with_remote_code_without_genesis_hf(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_genesis.py", "configuration_genesis.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_genesis.GenesisForCausalLM"

    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["genesis_hf"] = None  # make the package unimportable: only the remote code may be used
        try:
            import genesis_hf  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("genesis_hf should not be importable here")
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)["ids"]
        with torch.no_grad():
            torch.save({{"logits": model(ids).logits}}, {str(tmp_path / "outputs.pt")!r})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(tmp_path / "outputs.pt", weights_only=True)["logits"]
    assert torch.equal(logits, expected)


def test_auto_classes_in_process(tmp_path):
    config = AutoConfig.for_model("genesis", **GENESIS_PRESETS["debug"])
    assert isinstance(config, GenesisConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, GenesisForCausalLM)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, GenesisForCausalLM)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_greedy_generation_same_with_and_without_cache():
    model = tiny_model()
    prompt = random_ids(batch=1, seq=5)
    with_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 25)
    assert torch.equal(with_cache, without_cache)


def test_eager_and_sdpa_attention_agree():
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    ids = random_ids()
    with torch.no_grad():
        difference = (eager(ids).logits - sdpa(ids).logits).abs().max().item()
    print(f"eager vs sdpa max abs logit difference: {difference:.3e}")
    assert difference < PARITY_TOLERANCE


def test_padded_batch_matches_unpadded_rows():
    model = tiny_model()
    ids = random_ids(batch=2, seq=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
    assert (padded[1, 4:] - alone[0]).abs().max().item() < PARITY_TOLERANCE


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids()
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # the name before transformers 5.17
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_loss_matches_manual_shifted_cross_entropy():
    model = tiny_model()
    ids = random_ids()
    output = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(output.logits[:, :-1].reshape(-1, 99), ids[:, 1:].reshape(-1))
    assert torch.allclose(output.loss, expected, atol=1e-6)


def test_genesis_1b_preset_is_the_seed_model():
    config = GenesisConfig.from_preset("genesis-1b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1536, 32, 12)
    assert (config.num_key_value_heads, config.intermediate_size) == (6, 4736)
    assert (config.max_position_embeddings, config.vocab_size) == (2048, 49_152)
    assert config.rope_parameters["rope_theta"] == 500_000.0
    assert config.tie_word_embeddings and config.dtype == torch.bfloat16
    with torch.device("meta"):
        model = GenesisForCausalLM(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"genesis-1b parameters: {parameters:,}")
    assert abs(parameters - 1.0e9) / 1.0e9 < 0.005


def test_module_names_are_llamas():
    names = set(tiny_model().state_dict())
    for expected in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    ):
        assert expected in names
    assert GenesisForCausalLM._no_split_modules == ["LlamaDecoderLayer"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"hidden_size": 100, "num_attention_heads": 12},
            "hidden_size=100 is not divisible by num_attention_heads=12",
        ),
        ({"num_attention_heads": 12, "num_key_value_heads": 5}, "num_key_value_heads=5"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"vocab_size": -3}, "vocab_size must be a positive integer, got -3"),
    ],
)
def test_bad_configs_name_the_value_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        GenesisConfig(**overrides)
    assert "for example" in str(error.value) or "positive integer" in str(error.value)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown Genesis preset 'genesis-7b'") as error:
        GenesisConfig.from_preset("genesis-7b")
    for name in GENESIS_PRESETS:
        assert name in str(error.value)


def test_weight_init_is_normal_with_configured_std():
    model = GenesisForCausalLM(GenesisConfig.from_preset("debug", hidden_size=256, intermediate_size=512))
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
