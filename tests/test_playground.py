"""The playground: library logic, the named API through `gradio_client` against a running app, and the page in a real
headless Chromium.

One tiny run is trained per module (a few seconds): a byte-level tokenizer with chat tokens, a 2-layer model trained
until it has memorised one ChatML conversation (with `<think>`) and one sentence, three exported checkpoints and a
`metrics.jsonl`. The app runs in this process on a free 127.0.0.1 port.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from genesis_hf import GenesisConfig, GenesisForCausalLM
from genesis_hf.playground import (
    DEFAULT_PROMPT,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    CheckpointSource,
    ModelCache,
    Playground,
    PlaygroundError,
    SamplingSettings,
    build_app,
    chat_display_messages,
    checkpoint_label,
    launch_app,
    load_space_config,
    normalize_history,
    playground_from_config,
    split_thinking,
)
from genesis_hf.publish.space import SPACE_TEMPLATE_DIR, SpaceError, deploy_space, stage_space
from genesis_hf.tokenizer import add_chat_tokens, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
# The browser test writes its screenshot into its own temporary folder; the README's picture is refreshed on purpose
# with GENESIS_HF_SCREENSHOT=docs/playground.png (a test never rewrites a tracked file of the checkout by itself).
SCREENSHOT_TO = os.environ.get("GENESIS_HF_SCREENSHOT")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SENTENCE = "The quick brown fox jumps over the lazy dog."
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>a greeting</think>Hello there!"},
]
CHECKPOINT_STEPS = (20, 40, 60)
# Training goes on after the last checkpoint, as in a live run: the loss curve is longer than the checkpoint list.
TRAIN_STEPS = 80
CHECKPOINT_NAMES = [f"step-{step:07d}" for step in CHECKPOINT_STEPS] + ["final"]
TOKENS_PER_STEP = 128
FAKE_TOKEN = "hf_playgroundTestTokenThatMustNeverLeak"


def _training_text() -> list[str]:
    # A few KB: this module's own docstring-free code would do, but a fixed text keeps the vocabulary stable.
    prose = (SENTENCE + " ") * 20
    code = "def add(first, second):\n    return first + second\n\n" * 20
    return [prose, code, json.dumps(CONVERSATION) * 10]


def make_tiny_run(run_dir: Path) -> Path:
    """Train a tiny chat-capable model and save a run the way the trainer does: DCP training checkpoints at
    `CHECKPOINT_STEPS` (through `CheckpointManager`), `metrics.jsonl`, and the last step exported to `final/`."""
    from genesis_hf.pretrain.checkpoint import CheckpointManager
    from genesis_hf.publish.export import export_checkpoint

    tokenizer = train_tokenizer(_training_text(), 300)
    add_chat_tokens(tokenizer)
    torch.manual_seed(0)
    config = GenesisConfig.from_preset(
        "debug", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, max_position_embeddings=128
    )
    model = GenesisForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    chat_ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    sentence_ids = tokenizer(SENTENCE + " " + SENTENCE, add_special_tokens=False)["input_ids"]
    # (2, longest): the conversation and the sentence, padded with -100 (ignored by the loss).
    labels = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(chat_ids), torch.tensor(sentence_ids)], batch_first=True, padding_value=-100
    )
    input_ids = labels.masked_fill(labels == -100, tokenizer.eos_token_id)
    manager = CheckpointManager(
        run_dir,
        save_total_limit=None,
        milestone_steps=None,
        async_save=False,
        run_config={"model": "debug"},
        model_config=config,
        tokenizer=tokenizer,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        for step in range(1, TRAIN_STEPS + 1):
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics.write(json.dumps({"step": step, "loss": loss.item(), "lr": 1e-2}) + "\n")
            if step in CHECKPOINT_STEPS:
                state = {"step": step, "tokens_seen": step * TOKENS_PER_STEP, "loss": loss.item()}
                manager.save(step, model, optimizer, state, {"data_loader": {}, "rng": {}})
        metrics.write(json.dumps({"step": TRAIN_STEPS, "eval_loss": 1.0}) + "\n")
    manager.close()
    export_checkpoint(run_dir / "checkpoints" / f"step-{CHECKPOINT_STEPS[-1]:07d}", run_dir / "final", dtype="fp32")
    return run_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("playground") / "run")


@pytest.fixture(scope="module")
def playground(tiny_run) -> Playground:
    return Playground(CheckpointSource(runs=tiny_run), cache_size=2, concurrency=2)


@pytest.fixture(scope="module")
def app_url(playground):
    # The token must stay on the server: set one and check below that no response carries it.
    previous_token = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    demo = build_app(playground)
    port = free_port()
    launch_app(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    if previous_token is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = previous_token


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def greedy_reference(run_dir: Path, name: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` on the checkpoint: what the playground's decode loop must reproduce."""
    from transformers import AutoModelForCausalLM

    from genesis_hf.pretrain.checkpoint import load_model_from_checkpoint

    if name == "final":
        model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    else:
        model, _, _ = load_model_from_checkpoint(run_dir / "checkpoints" / name)
    output = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[0], pad_token_id=0
    )
    return output[0, len(prompt_ids) :].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Library


def test_local_listing_reads_steps_tokens_and_loss(tiny_run):
    source = CheckpointSource(runs=tiny_run)
    checkpoints = source.list_checkpoints()
    assert [c.name for c in checkpoints] == CHECKPOINT_NAMES
    assert [c.kind for c in checkpoints] == ["training", "training", "training", "hf"]
    assert [c.step for c in checkpoints] == [*CHECKPOINT_STEPS, CHECKPOINT_STEPS[-1]]
    assert [c.tokens_seen for c in checkpoints][:3] == [step * TOKENS_PER_STEP for step in CHECKPOINT_STEPS]
    assert all(isinstance(c.loss, float) for c in checkpoints)
    assert checkpoints[-1].loss < checkpoints[0].loss
    assert (
        checkpoint_label(checkpoints[2]) == f"step-0000060 · step 60 · 7.68K tokens · loss {checkpoints[2].loss:.3f}"
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("../../etc", "Refused checkpoint '../../etc'"),
        ("/tmp/x", "Refused checkpoint '/tmp/x'"),
        ("https://evil.example/model", "Refused checkpoint 'https://evil.example/model'"),
        ("checkpoints/step-0000040", "Refused checkpoint"),
        ("~root", "Refused checkpoint"),
        ("step-9999999", "Unknown checkpoint 'step-9999999'"),
        ("", "No checkpoint selected"),
        (None, "No checkpoint selected"),
    ],
)
def test_resolve_accepts_only_listed_names(tiny_run, name, message):
    source = CheckpointSource(runs=tiny_run)
    assert source.resolve("step-0000040").step == 40
    with pytest.raises(PlaygroundError, match=re.escape(message)) as error:
        source.resolve(name)
    if name:
        assert "step-0000040" in str(error.value), "the refusal lists valid names"


def test_resolve_sees_checkpoints_added_while_running(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    source = CheckpointSource(runs=run)
    assert len(source.list_checkpoints()) == 4
    shutil.copytree(run / "checkpoints" / "step-0000060", run / "checkpoints" / "step-0000160")
    assert source.resolve("step-0000160").path == run / "checkpoints" / "step-0000160"


def test_source_needs_exactly_one_existing_location(tmp_path):
    with pytest.raises(PlaygroundError, match="exactly one"):
        CheckpointSource()
    with pytest.raises(PlaygroundError, match="exactly one"):
        CheckpointSource(runs=tmp_path, repo="a/b")
    with pytest.raises(PlaygroundError, match="no such directory"):
        CheckpointSource(runs=tmp_path / "missing")


def test_sampling_settings_are_bounded():
    settings = SamplingSettings.from_request(64.0, 0, 1, 0, 1, 7)
    assert settings == SamplingSettings(64, 0.0, 1.0, 0, 1.0, 7) and settings.greedy
    for arguments, field in [
        ((MAX_NEW_TOKENS + 1, 1, 1, 0, 1, 0), "max_new_tokens"),
        ((0, 1, 1, 0, 1, 0), "max_new_tokens"),
        ((8, -1, 1, 0, 1, 0), "temperature"),
        ((8, 1, 0, 0, 1, 0), "top_p"),
        ((8, 1, 1, 2.5, 1, 0), "top_k"),
        ((8, 1, 1, 0, 1, -3), "seed"),
        ((8, float("nan"), 1, 0, 1, 0), "temperature"),
        ((8, "hot", 1, 0, 1, 0), "temperature"),
    ]:
        with pytest.raises(PlaygroundError, match=f"^{field}="):
            SamplingSettings.from_request(*arguments)


def test_split_thinking_and_display_messages():
    assert split_thinking("<think>plan</think>Hi") == ("plan", "Hi", True)
    assert split_thinking("<think>pla") == ("pla", "", False)
    assert split_thinking("no reasoning") == (None, "no reasoning", True)
    messages = chat_display_messages("<think>plan</think>Hi", seconds=0.5)
    assert messages == [
        {"role": "assistant", "content": "plan", "metadata": {"title": "Thinking", "status": "done", "duration": 0.5}},
        {"role": "assistant", "content": "Hi"},
    ]
    assert chat_display_messages("<think>pla")[0]["metadata"]["status"] == "pending"


def test_history_drops_thinking_and_merges_split_replies():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "plan", "metadata": {"title": "Thinking"}},
        {"role": "assistant", "content": "Hello"},
        {"role": "assistant", "content": " again"},
    ]
    assert normalize_history(history) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello again"},
    ]
    with pytest.raises(PlaygroundError, match="history must be a list"):
        normalize_history("hi")


def test_model_cache_is_a_bounded_lru():
    cache = ModelCache(capacity=2)
    for key in ("a", "b", "a", "c"):
        cache.get(key, lambda key=key: (key, key))
    assert cache.keys() == ["a", "c"] and cache.loads == 3


def test_loss_curve_marks_the_selected_checkpoint(playground):
    points = playground.loss_curve("step-0000040")
    curve = [p for p in points if p["series"] == "training loss"]
    marker = [p for p in points if p["series"] == "selected checkpoint"]
    assert [p["step"] for p in curve] == list(range(1, TRAIN_STEPS + 1))
    assert [p["step"] for p in marker] == [40, 40]
    assert marker[0]["loss"] == min(p["loss"] for p in curve) and marker[1]["loss"] == max(p["loss"] for p in curve)


def test_facts_come_from_the_config(playground):
    model = GenesisForCausalLM.from_pretrained(playground.source.resolve("final").path)
    for name, revision in [("step-0000040", "checkpoints/step-0000040"), ("final", "final")]:
        facts = playground.facts(name)
        assert facts["parameters"] == sum(p.numel() for p in model.parameters())
        assert facts["context_length"] == 128 and facts["revision"] == revision


def test_generation_stops_at_the_context(playground):
    stream = playground.generate_stream("step-0000040", "fox " * 40, SamplingSettings(MAX_NEW_TOKENS, 1.0, 1.0, 0))
    list(stream)
    assert stream.stop_reason in ("context", "stop")
    assert len(stream.input_ids) + stream.num_tokens <= 128
    with pytest.raises(PlaygroundError, match="context is 128 tokens"):
        playground.generate_stream("step-0000040", "fox " * 200, SamplingSettings())


# ---------------------------------------------------------------------------------------------------------------------
# The named API, through gradio_client against the running app


def test_api_lists_checkpoints(client):
    checkpoints = client.predict(api_name="/list_checkpoints")
    assert [(c["name"], c["step"], c["tokens_seen"]) for c in checkpoints] == [
        (f"step-{step:07d}", step, step * TOKENS_PER_STEP) for step in CHECKPOINT_STEPS
    ] + [("final", 60, 60 * TOKENS_PER_STEP)]
    assert all(isinstance(c["loss"], float) for c in checkpoints)
    assert not any("path" in c for c in checkpoints), "server paths stay on the server"


def test_api_generate_is_seeded_and_greedy_matches_transformers(client, tiny_run):
    sampled = [
        client.predict("step-0000060", "The quick", 24, 1.0, 0.95, 0, 1.0, seed, api_name="/generate")
        for seed in (3, 3)
    ]
    assert sampled[0] == sampled[1] and sampled[0]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    prompt_ids = tokenizer("The quick", add_special_tokens=False)["input_ids"]
    for name in ("step-0000040", "final"):
        greedy = [
            client.predict(name, "The quick", 20, 0.0, 0.9, 40, 1.0, seed, api_name="/generate") for seed in (0, 1)
        ]
        assert greedy[0] == greedy[1], "temperature 0 is greedy: the seed does not matter"
        expected = tokenizer.decode(greedy_reference(tiny_run, name, prompt_ids, 20), skip_special_tokens=True)
        assert greedy[0] == expected
    assert client.predict("step-0000060", "The quick", 12, 0.0, 1.0, 0, 1.0, 0, api_name="/generate").startswith(
        " brown fox jumps"
    )


def test_api_compare_runs_two_checkpoints_on_the_same_prompt_and_seed(client):
    text_a, text_b = client.predict(
        "step-0000040", "step-0000060", "The quick", 16, 0.7, 0.9, 20, 1.1, 5, api_name="/compare"
    )
    assert text_a == client.predict("step-0000040", "The quick", 16, 0.7, 0.9, 20, 1.1, 5, api_name="/generate")
    assert text_b == client.predict("step-0000060", "The quick", 16, 0.7, 0.9, 20, 1.1, 5, api_name="/generate")


def test_api_chat_uses_the_chatml_template(client):
    reply = client.predict("step-0000060", "Hi", "", [], 24, 0.0, 1.0, 0, 1.0, 0, api_name="/chat")
    assert reply == "<think>a greeting</think>Hello there!"
    assert split_thinking(reply) == ("a greeting", "Hello there!", True)
    follow_up = client.predict(
        "step-0000060",
        "Hi",
        "You are terse.",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}],
        8,
        0.0,
        1.0,
        0,
        1.0,
        0,
        api_name="/chat",
    )
    assert isinstance(follow_up, str)


@pytest.mark.parametrize(
    "checkpoint, message",
    [
        ("../../etc", "Refused checkpoint '../../etc'"),
        ("/tmp/x", "Refused checkpoint '/tmp/x'"),
        ("https://huggingface.co/gpt2", "Refused checkpoint 'https://huggingface.co/gpt2'"),
        ("step-0000999", "Unknown checkpoint 'step-0000999'"),
    ],
)
def test_api_refuses_checkpoints_outside_the_run(client, checkpoint, message):
    from gradio_client.exceptions import AppError

    for api_name, arguments in [
        ("/generate", (checkpoint, "Hi", 8, 0.0, 1.0, 0, 1.0, 0)),
        ("/compare", ("step-0000040", checkpoint, "Hi", 8, 0.0, 1.0, 0, 1.0, 0)),
        ("/chat", (checkpoint, "Hi", "", [], 8, 0.0, 1.0, 0, 1.0, 0)),
    ]:
        with pytest.raises(AppError, match=re.escape(message)) as error:
            client.predict(*arguments, api_name=api_name)
        assert "Traceback" not in str(error.value) and 'File "' not in str(error.value)


def test_api_bounds_inputs(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=f"at most {MAX_PROMPT_CHARS:,}"):
        client.predict("step-0000040", "x" * (MAX_PROMPT_CHARS + 1), 8, 0.0, 1.0, 0, 1.0, 0, api_name="/generate")
    with pytest.raises(AppError, match="max_new_tokens=100000 is out of range"):
        client.predict("step-0000040", "Hi", 100000, 0.0, 1.0, 0, 1.0, 0, api_name="/generate")


def test_no_token_reaches_the_browser(app_url, client):
    for path in ("", "config", "gradio_api/info"):
        with urllib.request.urlopen(app_url + path, timeout=30) as response:
            body = response.read().decode("utf-8", errors="replace")
        assert FAKE_TOKEN not in body
        assert "/tmp/" not in body or path == "", f"/{path} shows a server path"


# ---------------------------------------------------------------------------------------------------------------------
# The page in a real browser


def test_page_in_headless_chromium_generates_and_saves_screenshot(app_url, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: the browser test drives Debian's chromium (no browser "
            "download). Install it with `bash scripts/setup.sh` (as root) or `apt-get install chromium`."
        )
    from playwright.sync_api import expect, sync_playwright

    screenshot = tmp_path / "playground.png"
    with tempfile.TemporaryDirectory(prefix="genesis-chromium-") as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 1100},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            expect(page.get_by_text("Genesis playground").first).to_be_visible(timeout=60_000)

            # Pick a checkpoint other than the preselected (newest) one; the facts table follows the selection.
            page.locator("#genesis-checkpoint input").click()
            page.get_by_role("option", name=re.compile(r"^step-0000060 · step 60 · 7.68K tokens · loss")).click()
            expect(page.locator("body")).to_contain_text("checkpoints/step-0000060", timeout=30_000)

            # 40 new tokens: the prompt plus the output stay inside the tiny model's 128-token context.
            page.get_by_text("Sampling settings").click()
            max_new_tokens = page.get_by_label("number input for max new tokens")
            max_new_tokens.fill("40")
            max_new_tokens.press("Tab")

            page.locator("#genesis-prompt textarea").fill("The quick")
            page.locator("#genesis-generate").click()
            output = page.locator("#genesis-output textarea")
            expect(output).not_to_have_value("", timeout=60_000)
            expect(page.locator("#genesis-stats")).to_contain_text("tokens/s", timeout=60_000)
            assert re.match(r"\d+ tokens in", page.locator("#genesis-stats").inner_text())
            assert len(output.input_value()) > 0
            page.screenshot(path=str(screenshot), full_page=True)

            # Chat, greedy: the memorised reply, its <think> part folded under "Thinking".
            temperature = page.get_by_label("number input for temperature")
            temperature.fill("0")
            temperature.press("Tab")
            page.get_by_role("tab", name="Chat").click()
            page.get_by_label("Message").fill("Hi")
            page.get_by_role("button", name="Send").click()
            chatbot = page.locator("#genesis-chatbot")
            expect(chatbot).to_contain_text("Hello there!", timeout=60_000)
            expect(chatbot).to_contain_text("Thinking")
            expect(chatbot.get_by_text("a greeting")).to_be_hidden()

            # A fresh first screen: the newest checkpoint and a prompt are preset, so one click shows text.
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            expect(page.locator("#genesis-prompt textarea")).to_have_value(DEFAULT_PROMPT, timeout=60_000)
            page.locator("#genesis-generate").click()
            expect(page.locator("#genesis-output textarea")).not_to_have_value("", timeout=60_000)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    if SCREENSHOT_TO:
        shutil.copyfile(screenshot, SCREENSHOT_TO)


# ---------------------------------------------------------------------------------------------------------------------
# Command line and Space files


def test_cli_serves_a_run_on_localhost(tiny_run):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "-m", "genesis_hf.cli", "playground", "--runs", str(tiny_run), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5) as response:
                    info = json.loads(response.read())
                break
            except OSError:
                assert process.poll() is None, process.communicate()[0]
                time.sleep(0.5)
        else:
            pytest.fail("genesis-hf playground did not start within 90 s")
        assert {"/list_checkpoints", "/generate", "/compare", "/chat"} <= set(info["named_endpoints"])
        other_address = non_loopback_address()
        if other_address is not None:
            # Bound to 127.0.0.1 only: the machine's other addresses do not answer.
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://{other_address}:{port}/", timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def non_loopback_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or `None` without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def test_cli_refuses_a_missing_run(tmp_path):
    from genesis_hf import cli

    assert cli.main(["playground", "--runs", str(tmp_path / "missing")]) == 2
    assert cli.main(["playground"]) == 2


def test_space_files():
    import gradio

    space = SPACE_TEMPLATE_DIR
    front_matter = (space / "README.md").read_text(encoding="utf-8").split("---")[1]
    assert re.search(r"^sdk: gradio$", front_matter, re.MULTILINE)
    assert re.search(r"^app_file: app\.py$", front_matter, re.MULTILINE)
    assert re.search(r"^title: .+$", front_matter, re.MULTILINE)
    assert f"sdk_version: {gradio.__version__}\n" in front_matter, (
        f"{space / 'README.md'} should pin the tested Gradio, sdk_version: {gradio.__version__}"
    )
    app_source = (space / "app.py").read_text(encoding="utf-8")
    assert "genesis_hf.playground" in app_source and len(app_source.splitlines()) < 40, "app.py stays thin"


def test_space_config_comes_from_the_environment_or_playground_json(tmp_path, monkeypatch):
    monkeypatch.delenv("GENESIS_PLAYGROUND_RUNS", raising=False)
    monkeypatch.delenv("GENESIS_PLAYGROUND_REPO", raising=False)
    config_path = tmp_path / "playground.json"
    with pytest.raises(PlaygroundError, match="Nothing to browse"):
        load_space_config(config_path)
    config_path.write_text(json.dumps({"runs": "run", "cache_size": 1}))
    assert load_space_config(config_path) == {"runs": str(tmp_path / "run"), "cache_size": 1}
    config_path.write_text(json.dumps({"repo": "alice/genesis-tiny"}))
    assert load_space_config(config_path) == {"repo": "alice/genesis-tiny"}
    monkeypatch.setenv("GENESIS_PLAYGROUND_RUNS", "/data/run")
    assert load_space_config(config_path) == {"runs": "/data/run"}


def test_space_requirements_cover_what_the_playground_imports():
    """Every third-party package imported by the genesis_hf modules the playground uses is in the Space's
    requirements.txt (or comes with the Gradio SDK, or is ZeroGPU's optional `spaces`)."""
    import ast
    import importlib.metadata

    requirements = {
        re.split(r"[<>=!~\[ ;]", line.strip())[0].lower().replace("_", "-")
        for line in (SPACE_TEMPLATE_DIR / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    # peft: the model module registers Genesis in PEFT's tables only where PEFT is installed (checked below).
    provided = {"gradio", "gradio-client", "spaces", "peft"}
    distributions = importlib.metadata.packages_distributions()
    package_root = REPO_ROOT / "genesis_hf"
    seen, queue, third_party = set(), ["genesis_hf.playground", "genesis_hf"], set()
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.add(module)
        relative = Path(*module.split("."))
        path = REPO_ROOT / relative.with_suffix(".py")
        if not path.is_file():
            path = REPO_ROOT / relative / "__init__.py"
        if not path.is_file():
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    names = [f"{base}.{node.module}" if node.module else base]
                    names += [f"{names[0]}.{alias.name}" for alias in node.names]
                else:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "genesis_hf":
                    queue.append(name)
                elif top not in sys.stdlib_module_names:
                    third_party.add(top)
    assert package_root.is_dir() and "genesis_hf.publish.listing" in seen
    missing = {
        top: distributions.get(top, [top])
        for top in third_party
        if not {name.lower().replace("_", "-") for name in distributions.get(top, [top])} & (requirements | provided)
    }
    assert not missing, f"add these to {SPACE_TEMPLATE_DIR / 'requirements.txt'}: {missing}"
    # The optional one really is optional: the playground and the model import where PEFT is not installed.
    blocked = "import sys; sys.modules['peft'] = None; import genesis_hf.playground, genesis_hf.model.modeling_genesis"
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_stage_space_ships_a_runs_exported_folders(tiny_run, tmp_path, monkeypatch):
    """`deploy --runs RUN`: the Space gets the run's exported folders (not its training checkpoints) and its metrics
    under `run/`, and the Space's playground browses that copy."""
    monkeypatch.delenv("GENESIS_PLAYGROUND_RUNS", raising=False)
    monkeypatch.delenv("GENESIS_PLAYGROUND_REPO", raising=False)
    folder = stage_space(tmp_path, runs=tiny_run)
    assert json.loads((folder / "playground.json").read_text()) == {"runs": "run"}
    assert (folder / "run" / "metrics.jsonl").read_bytes() == (tiny_run / "metrics.jsonl").read_bytes()
    assert (folder / "run" / "final" / "config.json").is_file() and not (folder / "run" / "checkpoints").exists()
    assert (folder / "README.md").read_bytes() == (SPACE_TEMPLATE_DIR / "README.md").read_bytes()
    config = load_space_config(folder / "playground.json")
    assert config == {"runs": str((folder / "run").resolve())}
    assert playground_from_config(config).list_checkpoints()[-1]["name"] == "final"
    with pytest.raises(SpaceError, match="exactly one of --runs DIR"):
        stage_space(tmp_path / "other", runs=tiny_run, repo=HUB_REPO)


def test_space_is_staged_from_an_installed_wheel(tmp_path):
    """Deploying needs no source checkout: from a wheel installed with pip (the repo not on the path), the Space
    folder gets the template files (package data) and a copy of the installed genesis_hf."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy2(REPO_ROOT / "pyproject.toml", source / "pyproject.toml")
    shutil.copy2(REPO_ROOT / "README.md", source / "README.md")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "genesis_hf", source / "genesis_hf", ignore=ignore)
    # Built from a copy: a build in the checkout would leave build/ and an egg-info next to the sources.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("genesis_hf-*.whl")
    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)

    # `python -S`: the venv's .pth files (the editable install's path to this checkout) are not read; its
    # site-packages stays on PYTHONPATH for torch and transformers, after the wheel's install.
    dependencies = [path for path in sys.path if path.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *dependencies]), "OMP_NUM_THREADS": "1"}
    stage = (
        "import sys; from pathlib import Path; import genesis_hf; "
        "from genesis_hf.publish.space import stage_space; "
        "assert not any(Path(p or '.').resolve() == Path(sys.argv[2]) for p in sys.path), sys.path; "
        "print(genesis_hf.__file__); stage_space(Path(sys.argv[1]), repo='alice/genesis-tiny')"
    )
    space = tmp_path / "space"
    space.mkdir()
    result = subprocess.run(
        [sys.executable, "-S", "-c", stage, str(space), str(REPO_ROOT)],
        cwd=space,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]) == site / "genesis_hf" / "__init__.py"

    for name in ("app.py", "requirements.txt"):
        assert (space / name).read_bytes() == (SPACE_TEMPLATE_DIR / name).read_bytes()
    assert "models:\n  - alice/genesis-tiny" in (space / "README.md").read_text(encoding="utf-8")
    assert json.loads((space / "playground.json").read_text()) == {"repo": "alice/genesis-tiny"}
    installed = {path.relative_to(site / "genesis_hf") for path in (site / "genesis_hf").rglob("*.py")}
    copied = {path.relative_to(space / "genesis_hf") for path in (space / "genesis_hf").rglob("*.py")}
    assert copied == {path for path in installed if path.parts[0] != "testing"}
    assert {Path("playground/app.py"), Path("publish/space.py"), Path("publish/space_template/app.py")} <= copied
    assert (space / "genesis_hf" / "publish" / "space_template" / "README.md").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# A Hub repo (the local Hub API server): browse step branches, deploy the Space, run the Space from what was uploaded

HUB_REPO = "alice/genesis-tiny"
SPACE_REPO = "alice/genesis-playground"


@pytest.fixture(scope="module")
def hub(tiny_run, tmp_path_factory):
    """A local Hub holding `HUB_REPO`: branches `step-0000020` and `step-0000060`, and `main` with `metrics.jsonl`."""
    from huggingface_hub import HfApi

    from genesis_hf.publish.export import export_checkpoint
    from genesis_hf.testing import HubServer

    exports = tmp_path_factory.mktemp("exports")
    export_checkpoint(tiny_run / "checkpoints" / "step-0000020", exports / "step-0000020", dtype="fp32")
    server = HubServer().start()
    api = HfApi(endpoint=server.endpoint, token=server.write_token)
    api.create_repo(HUB_REPO)
    for branch, folder in [("step-0000020", exports / "step-0000020"), ("step-0000060", tiny_run / "final")]:
        api.create_branch(HUB_REPO, branch=branch)
        api.upload_folder(repo_id=HUB_REPO, folder_path=folder, revision=branch)
    api.upload_file(repo_id=HUB_REPO, path_or_fileobj=tiny_run / "metrics.jsonl", path_in_repo="metrics.jsonl")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deployed_space(hub, tmp_path_factory) -> dict:
    """`genesis-hf playground deploy --space SPACE_REPO --repo HUB_REPO`, run once: its result and the Space's files."""
    home = tmp_path_factory.mktemp("deploy_home")
    env = {**os.environ, **hub.client_env(HF_TOKEN=hub.write_token, HF_HOME=str(home))}
    command = [
        sys.executable,
        "-m",
        "genesis_hf.cli",
        "playground",
        "deploy",
        "--space",
        SPACE_REPO,
        "--repo",
        HUB_REPO,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    return {"result": result, "files": hub.branch_files(SPACE_REPO, repo_type="space")}


def test_deploy_creates_the_space_without_the_token(hub, deployed_space):
    result, files = deployed_space["result"], deployed_space["files"]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["url"].endswith(f"spaces/{SPACE_REPO}")
    assert hub.write_token not in result.stdout + result.stderr

    assert hub.get_repo(SPACE_REPO, repo_type="space") is not None
    assert {"app.py", "requirements.txt", "README.md", "playground.json", "genesis_hf/playground/app.py"} <= set(files)
    assert files["app.py"] == (SPACE_TEMPLATE_DIR / "app.py").read_bytes()
    assert json.loads(files["playground.json"]) == {"repo": HUB_REPO}
    front_matter = files["README.md"].decode().split("---")[1]
    for line in ("sdk: gradio", "app_file: app.py", f"models:\n  - {HUB_REPO}"):
        assert line in front_matter
    assert not any(path.endswith((".pyc", ".env")) or "__pycache__" in path for path in files)
    for path, content in files.items():
        for token in (hub.write_token, hub.read_token):
            assert token.encode() not in content, f"{path} holds a Hub token"

    # Deploying again reuses the Space (create_repo with exist_ok); unchanged files make no new commit.
    commits = len(hub.get_repo(SPACE_REPO, repo_type="space").commits)
    url = deploy_space(SPACE_REPO, repo=HUB_REPO, token=hub.write_token, endpoint=hub.endpoint)
    assert url.endswith(f"spaces/{SPACE_REPO}")
    assert len(hub.get_repo(SPACE_REPO, repo_type="space").commits) == commits
    assert hub.branch_files(SPACE_REPO, repo_type="space") == files


def test_deploy_refuses_a_run_without_exports_and_a_token_in_the_files(hub, tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")
    with pytest.raises(SpaceError, match="no exported model folder"):
        deploy_space(SPACE_REPO, runs=run, token=hub.write_token, endpoint=hub.endpoint)
    shutil.copytree(tiny_run / "final", run / "final")
    (run / "final" / "notes.txt").write_text(f"token: {hub.write_token}")
    with pytest.raises(SpaceError, match="contains your Hub token"):
        deploy_space(SPACE_REPO, runs=run, token=hub.write_token, endpoint=hub.endpoint)


def test_deployed_space_browses_the_repo_by_revision(hub, deployed_space, tmp_path):
    """The Space's files as uploaded (the vendored genesis_hf included) serve the repo's step branches."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    space_dir = tmp_path / "space"
    for path, content in deployed_space["files"].items():
        (space_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (space_dir / path).write_bytes(content)

    port = free_port()
    # What the Space runtime has: HF_TOKEN as a secret (read-only here), its own cache, GRADIO_SERVER_PORT.
    space_env = {
        **os.environ,
        **hub.client_env(HF_TOKEN=hub.read_token, HF_HOME=str(tmp_path / "space_home")),
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    space_env.pop("GENESIS_PLAYGROUND_RUNS", None)
    space_env.pop("GENESIS_PLAYGROUND_REPO", None)
    check_vendored = (
        "import genesis_hf, os, runpy; "
        "assert genesis_hf.__file__.startswith(os.getcwd()), genesis_hf.__file__; "
        "runpy.run_path('app.py', run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", check_vendored],
        cwd=space_dir,
        env=space_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_app(process, port)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        checkpoints = client.predict(api_name="/list_checkpoints")
        # `main` holds only metrics.jsonl here, so it is not a checkpoint.
        assert [(c["name"], c["step"], c["tokens_seen"], c["revision"]) for c in checkpoints] == [
            ("step-0000020", 20, 20 * TOKENS_PER_STEP, "step-0000020"),
            ("step-0000060", 60, 60 * TOKENS_PER_STEP, "step-0000060"),
        ]
        greedy = client.predict("step-0000060", "The quick", 12, 0.0, 1.0, 0, 1.0, 0, api_name="/generate")
        assert greedy.startswith(" brown fox jumps")
        early = client.predict("step-0000020", "The quick", 12, 0.0, 1.0, 0, 1.0, 0, api_name="/generate")
        assert early != greedy, "each revision is its own checkpoint"
        with pytest.raises(AppError, match="Refused checkpoint 'alice/other-model'"):
            client.predict("alice/other-model", "Hi", 8, 0.0, 1.0, 0, 1.0, 0, api_name="/generate")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            assert hub.read_token not in response.read().decode()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert hub.read_token not in output and hub.write_token not in output


def wait_for_app(process: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{process.communicate()[0]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    process.terminate()
    pytest.fail(f"the app did not answer on port {port} within {timeout:.0f} s:\n{process.communicate()[0]}")
