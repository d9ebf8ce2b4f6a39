"""Generation against the peer: `GenesisForCausalLM.generate()` equals `LlamaForCausalLM.generate()` on the same weights.

The model under test is a debug-size Genesis with a large initializer range, so that its next token depends on the
whole prefix (an untrained model at the default 0.02 repeats one token whatever the context, which hides cache bugs:
the test that passed while transformers 5.24's `cache=` argument was silently ignored was of that kind). Scores are
compared, not only tokens. Each decoding mode runs with the KV cache, in process and through `trust_remote_code` in a
process where genesis_hf cannot be imported.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from generation_cases import DECODING_MODES, MAX_NEW_TOKENS, PAD_ID, max_score_difference, run_generate

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.model.convert import to_llama

SCORE_TOLERANCE = 1e-4


def context_sensitive_model(seed: int = 0) -> GenesisForCausalLM:
    """A debug Genesis whose next-token distribution depends on more than the last token."""
    torch.manual_seed(seed)
    config = GenesisConfig.from_preset("debug", initializer_range=0.5, pad_token_id=PAD_ID)
    return GenesisForCausalLM(config).eval()


def test_the_test_model_depends_on_context():
    """Guard against a test model that would hide cache bugs: changing an early token changes the last logits."""
    model = context_sensitive_model()
    ids = torch.tensor([[5, 17, 42, 8, 23, 61]])
    changed = ids.clone()
    changed[0, 0] = 77
    with torch.no_grad():
        difference = (model(ids).logits[0, -1] - model(changed).logits[0, -1]).abs().max().item()
    assert difference > 0.1
    sequences, _ = run_generate(model, "greedy")
    assert len(set(sequences[0, -MAX_NEW_TOKENS:].tolist())) > 2, (
        "greedy output is one repeated token: the model is too flat"
    )


@pytest.mark.parametrize("mode", list(DECODING_MODES))
def test_generate_matches_llama_with_cache(mode):
    model = context_sensitive_model()
    llama = to_llama(model).eval()
    sequences, scores = run_generate(model, mode)
    llama_sequences, llama_scores = run_generate(llama, mode)
    assert torch.equal(sequences, llama_sequences)
    assert max_score_difference(scores, llama_scores) < SCORE_TOLERANCE


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_cached_and_uncached_scores_agree(mode):
    model = context_sensitive_model()
    cached_sequences, cached_scores = run_generate(model, mode, use_cache=True)
    uncached_sequences, uncached_scores = run_generate(model, mode, use_cache=False)
    assert torch.equal(cached_sequences, uncached_sequences)
    assert max_score_difference(cached_scores, uncached_scores) < SCORE_TOLERANCE


def test_remote_code_generation_matches_llama_without_genesis_hf(tmp_path):
    """A saved folder, loaded with trust_remote_code where genesis_hf cannot be imported, generates like Llama."""
    model = context_sensitive_model()
    model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["genesis_hf"] = None  # only the remote code next to the weights may be used
        import torch
        from transformers import AutoModelForCausalLM
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from generation_cases import DECODING_MODES, run_generate
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        results = {{mode: run_generate(model, mode) for mode in DECODING_MODES}}
        torch.save(results, {str(tmp_path / "results.pt")!r})
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
    remote = torch.load(tmp_path / "results.pt", weights_only=True)
    llama = to_llama(model).eval()
    for mode in DECODING_MODES:
        llama_sequences, llama_scores = run_generate(llama, mode)
        sequences, scores = remote[mode]
        assert torch.equal(sequences, llama_sequences), mode
        assert max_score_difference(scores, llama_scores) < SCORE_TOLERANCE, mode
    saved_config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved_config["model_type"] == "genesis"


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_playground_decoding_matches_llama_greedy(repetition_penalty):
    """The playground's own token loop (KV cache, transformers' logits processors) decodes like Llama's generate()."""
    from genesis_hf.playground import SamplingSettings, decode_tokens

    model = context_sensitive_model()
    llama = to_llama(model).eval()
    prompt = [5, 17, 42, 8, 23, 61]
    settings = SamplingSettings(temperature=0.0, repetition_penalty=repetition_penalty, top_k=0, top_p=1.0, seed=0)
    tokens = list(decode_tokens(model, prompt, settings, max_new_tokens=16, stop_ids=frozenset()))
    with torch.no_grad():
        expected = llama.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            eos_token_id=None,
            pad_token_id=PAD_ID,
        )
    assert tokens == expected[0, len(prompt) :].tolist()


def _forget_the_cache(model_dir: Path) -> None:
    """Make the remote code in `model_dir` ignore the cache transformers passes, as the hand-copied model did."""
    with open(model_dir / "modeling_genesis.py", "a") as handle:
        handle.write(
            textwrap.dedent(
                """

                _forward = GenesisForCausalLM.forward


                def _forgetful_forward(self, *args, **kwargs):
                    kwargs.pop("cache", None)
                    kwargs.pop("past_key_values", None)
                    return _forward(self, *args, **kwargs)


                GenesisForCausalLM.forward = _forgetful_forward
                """
            )
        )


def test_export_verification_catches_remote_code_that_ignores_the_cache_and_reexport_refreshes_it(tmp_path):
    from genesis_hf.model import folder as model_folder
    from genesis_hf.publish import export
    from genesis_hf.testing import build_tiny_model_folder

    folder = tmp_path / "published"
    model, tokenizer = build_tiny_model_folder(folder, metrics=False)
    _forget_the_cache(folder)
    # One forward pass cannot tell (what the old verification compared); the cached generation can.
    with pytest.raises(model_folder.ExportMismatchError, match="KV cache"):
        model_folder.verify_export(model, tokenizer, folder, export_format="hf", dtype="fp32")

    # Re-exporting a folder published with old remote code writes the current code next to the same weights.
    out = tmp_path / "reexported"
    result = export.export_checkpoint(folder, out, export_format="hf", dtype="fp32")
    package_dir = Path(model_folder.__file__).parent
    for name in ("modeling_genesis.py", "configuration_genesis.py"):
        assert (out / name).read_text() == (package_dir / name).read_text()
    assert result.verification.max_abs_diff_cached < SCORE_TOLERANCE
