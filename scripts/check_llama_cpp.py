"""Compare llama.cpp with transformers on the same GGUF export: tokenization, detokenization and greedy tokens.

transformers' GGUF loader (which `genesis-hf export --format gguf` verifies against) dequantizes the file and rebuilds
the tokenizer in Python, so a file that llama.cpp's own tokenizer splits differently (its pre-tokenizer regexes are
chosen by the `tokenizer.ggml.pre` name) or runs differently would pass that check. This runs llama.cpp itself,
through llama-cpp-python, on:

- `tiny-chat`: genesis-tiny with the default 1,024-token tokenizer and the four ChatML tokens (1,028 tokens);
- `vocab-49156`: a tokenizer of the 1B's size (49,152 + 4 ChatML tokens) on a debug-sized model; the embedded corpus
  reaches only ~28,000 tokens, so this one is trained on it followed by the Python source of the installed
  transformers and torch packages;
- or the model folders given with `--models` (e.g. `outputs/sft-tiny/final`).

Each model is exported with the verified GGUF export (fp32) and compared. Greedy decoding on both sides ignores end-of-sequence tokens and runs `--new_tokens`.
Prints a JSON report; exits 1 on any difference. Run it through `scripts/check-llama-cpp.sh`, which builds
llama-cpp-python into a cache folder first.
"""

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

# What llama.cpp's pre-tokenizer and BPE must split exactly as the `tokenizers` pipeline does: prose, code, digit
# runs, whitespace runs (leading, trailing, tabs, blank lines), contractions, non-ASCII, and ChatML with its special
# tokens.
TEXTS = (
    "The history of science is the study of how people came to understand the natural world.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon. Pi is 3.14159265358979.",
    "I'm sure they'll say it's what we'd've done, don't you think? YOU'RE RIGHT.",
    "  two leading spaces, three trailing   ",
    "tabs\tand\t\tmore tabs\n\n\nthree newlines\r\nand a carriage return",
    "naïve café, Zürich, 東京, Москва, émoji 🙂👍🏽 and ½ ≠ ∞",
    "x=[1,2,3];y={'a':(4+5)*6}//7 # comment <tag attr=\"v\"/> &amp; $HOME ~/path\\file",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n"
    "<|im_start|>assistant\n<think>6 * 7 = 42.</think>It is 42.<|im_end|>\n",
    "text before<|endoftext|>text after",
    "",
    " ",
    "\n",
)
PROMPTS = (
    "The history of science",
    "def main():\n    ",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama_cpp_path", required=True, help="Folder llama_cpp was installed into (--target).")
    parser.add_argument("--models", nargs="*", default=None, help="Model folders to check instead of the two built.")
    parser.add_argument("--work_dir", default=None, help="Where the models and exports go (default: a temp folder).")
    parser.add_argument("--new_tokens", type=int, default=24, help="Greedy tokens to compare per prompt.")
    return parser.parse_args(argv)


def build_model(out_dir: Path, *, preset: str, vocab_size: int, seed: int = 0) -> Path:
    """A Genesis model on the default tokenizer of `vocab_size` plus the ChatML tokens, saved as a model folder.

    Its weights are random with a large initializer range (0.3): greedy tokens then change with the context at every
    step and the top two logits are far apart, so a kernel or layout difference shows up as other tokens, where a
    model with the usual 0.02 repeats one token whatever it is fed.
    """
    import itertools

    import torch
    from transformers import AutoTokenizer

    from genesis_hf import GenesisConfig, GenesisForCausalLM, corpus
    from genesis_hf.tokenizer import add_chat_tokens, default_tokenizer, train_tokenizer

    trained = out_dir.parent / f"tokenizer-{vocab_size}"  # kept in the work folder: a rerun skips ~2 minutes
    if vocab_size <= 16384:
        tokenizer = copy.deepcopy(default_tokenizer(vocab_size))
    elif (trained / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(trained)
    else:
        tokenizer = train_tokenizer(itertools.chain(corpus.default_corpus(), _package_sources()), vocab_size)
        tokenizer.save_pretrained(trained)
    add_chat_tokens(tokenizer)
    torch.manual_seed(seed)
    config = GenesisConfig.from_preset(preset, vocab_size=len(tokenizer), initializer_range=0.3)
    GenesisForCausalLM(config).eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _package_sources():
    """The Python files of the installed transformers and torch, in a fixed order: text every machine here has."""
    import torch
    import transformers

    for package in (transformers, torch):
        for path in sorted(Path(package.__file__).parent.rglob("*.py")):
            yield path.read_text(encoding="utf-8", errors="replace")


def compare(gguf_path: Path, hf_folder: Path, new_tokens: int) -> dict:
    """llama.cpp against transformers (its GGUF loader, and the tokenizer the model was trained with)."""
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The model's own context (n_ctx=0) and an fp32 KV cache (llama.cpp's default is f16), as transformers computes.
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(
        str(gguf_path), n_ctx=0, logits_all=True, verbose=False, n_threads=1, seed=0, type_k=f32, type_v=f32
    )
    trained_tokenizer = AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=True)  # no prompt on stdin
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    report = {"gguf": str(gguf_path), "n_vocab": llm.n_vocab(), "tokenization": [], "greedy": []}
    for text in TEXTS:
        llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        trained_ids = trained_tokenizer(text, add_special_tokens=False)["input_ids"]
        gguf_ids = gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = llm.detokenize(trained_ids, special=True).decode("utf-8", errors="replace")
        entry = {"text": text, "tokens": len(trained_ids), "llama_cpp_equal": llama_ids == trained_ids}
        entry.update(transformers_gguf_equal=gguf_ids == trained_ids, llama_cpp_detokenizes=decoded == text)
        if not (entry["llama_cpp_equal"] and entry["transformers_gguf_equal"]):
            entry.update(llama_cpp_ids=llama_ids, transformers_gguf_ids=gguf_ids, trained_ids=trained_ids)
        report["tokenization"].append(entry)

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    for prompt in PROMPTS:
        prompt_ids = trained_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        transformers_tokens = output.sequences[0, len(prompt_ids) :].tolist()
        transformers_logits = torch.cat(output.logits).float().numpy()  # (new_tokens, vocab)
        llm.reset()
        llm.eval(prompt_ids)
        llama_tokens, llama_logits = [], []
        for _ in range(new_tokens):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            llama_logits.append(logits)
            llama_tokens.append(int(logits.argmax()))
            llm.eval([llama_tokens[-1]])
        # Logits compared along llama.cpp's own path; on the steps where both took the same tokens they must agree.
        same = next((i for i, (a, b) in enumerate(zip(llama_tokens, transformers_tokens)) if a != b), new_tokens)
        width = transformers_logits.shape[1]
        difference = float(np.abs(np.stack(llama_logits)[: same + 1, :width] - transformers_logits[: same + 1]).max())
        report["greedy"].append(
            {
                "prompt": prompt,
                "equal": llama_tokens == transformers_tokens,
                "llama_cpp": llama_tokens,
                "transformers": transformers_tokens,
                "max_abs_logit_diff": difference,
            }
        )
    report["ok"] = all(e["llama_cpp_equal"] and e["llama_cpp_detokenizes"] for e in report["tokenization"]) and all(
        entry["equal"] for entry in report["greedy"]
    )
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.append(str(Path(args.llama_cpp_path).resolve()))  # after the venv: its numpy, jinja2 stay first
    import llama_cpp
    import torch

    from genesis_hf.publish.export import export_checkpoint

    torch.set_num_threads(1)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="check-llama-cpp-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.models:
        models = {Path(path).resolve().parent.name + "-" + Path(path).name: Path(path) for path in args.models}
    else:
        models = {
            "tiny-chat": build_model(work_dir / "tiny-chat", preset="genesis-tiny", vocab_size=1024),
            "vocab-49156": build_model(work_dir / "vocab-49156", preset="debug", vocab_size=49152),
        }
    reports = {"llama_cpp_python": llama_cpp.__version__, "models": {}}
    for name, folder in models.items():
        # overwrite: only an earlier export of this script in the same work folder is ever replaced (its marker)
        out = work_dir / f"{name}-gguf"
        export = export_checkpoint(folder, out, export_format="gguf", dtype="fp32", overwrite=True)
        reports["models"][name] = compare(export.out_dir / export.gguf_file, folder, args.new_tokens)
    reports["ok"] = all(report["ok"] for report in reports["models"].values())
    print(json.dumps(reports, indent=1, ensure_ascii=False))
    summary = {
        name: {
            "n_vocab": report["n_vocab"],
            "texts_tokenized_equal": f"{sum(e['llama_cpp_equal'] for e in report['tokenization'])}/{len(TEXTS)}",
            "texts_transformers_gguf_equal": (
                f"{sum(e['transformers_gguf_equal'] for e in report['tokenization'])}/{len(TEXTS)}"
            ),
            "greedy_equal": f"{sum(e['equal'] for e in report['greedy'])}/{len(PROMPTS)}",
            "max_abs_logit_diff": max(e["max_abs_logit_diff"] for e in report["greedy"]),
        }
        for name, report in reports["models"].items()
    }
    print(json.dumps({"ok": reports["ok"], "summary": summary}), file=sys.stderr)
    return 0 if reports["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
