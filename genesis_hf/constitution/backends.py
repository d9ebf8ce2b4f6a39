"""Where the text comes from: a transformers model in this process, or an OpenAI-compatible endpoint on your machine.

Both take a list of conversations (lists of `{"role", "content"}` messages) and return one reply per conversation:

- `TransformersBackend` loads any causal LM with a chat template (local folder or Hub id) and generates in batches,
  left-padded, so a batch of prompts costs about what one does on a GPU and far less than N on a CPU.
- `OpenAIBackend` posts to `<base_url>/chat/completions` (`transformers serve`, vLLM, llama.cpp's server, Ollama) from
  a thread pool, with a timeout per request and bounded retries; no key is needed for a local endpoint.
"""

import dataclasses
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from genesis_hf.tokenizer import CHATML_TEMPLATE

Conversation = list[dict[str, str]]
# Tokens that close an assistant turn in common chat templates (ChatML, Llama 3, Gemma); generation stops at any of
# them that the tokenizer knows, besides its eos.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class BackendError(RuntimeError):
    """Generation failed (model without a chat template, endpoint down or answering garbage); says what to do."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    # In-process only: the benchmark sets it to max_new_tokens so that batched and one-by-one runs make equal work.
    min_new_tokens: int = 0


class TransformersBackend:
    """A causal LM with a chat template, generating in left-padded batches in this process.

    Args:
        model: a local folder or Hub id.
        settings: sampling settings (temperature 0 is greedy).
        batch_size: conversations per `generate()` call.
        dtype: torch dtype name for the weights (`float32`, `bfloat16`, `auto`).
        device: `cpu`, `cuda`, ...; the first GPU when `None` and one is present.
        trust_remote_code: passed to `from_pretrained`.
        chat_template: `chatml` formats conversations as ChatML text for a model without a template (a pretrained
            base, as the baseline of the engagement benchmark); its markers are then plain text to that model.
            `none` accepts a model without a template for `complete()` on raw text only.
    """

    def __init__(
        self,
        model: str,
        settings: GenerationSettings,
        *,
        batch_size: int = 16,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import genesis_hf  # noqa: F401  (registers GenesisForCausalLM with the Auto classes)

        self.name = model
        self.settings = settings
        self.batch_size = batch_size
        # The tokenizer first: a model without a chat template is refused before its weights are loaded.
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackendError(
                f"could not load --model {model!r} ({first_line}); pass a local model folder or a Hub id you can "
                "download, or --base_url for a served model."
            ) from None
        if not self.tokenizer.chat_template and chat_template == "chatml":
            self.tokenizer.chat_template = CHATML_TEMPLATE
        if not self.tokenizer.chat_template and chat_template != "none":
            raise BackendError(
                f"--model {model!r} has no chat template, so its prompts cannot be formatted as a conversation; use "
                "an instruct/chat model (recipes/sft.py makes one from a Genesis base), or pass --chat_template "
                "chatml to prompt a base model in ChatML text."
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        vocab = self.tokenizer.get_vocab()
        stop_ids = {self.tokenizer.eos_token_id} | {vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab}
        self.stop_ids = sorted(token_id for token_id in stop_ids if token_id is not None)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def chat(self, conversations: list[Conversation], *, seed: int) -> list[str]:
        """One reply per conversation, generated `batch_size` at a time; `seed` seeds the sampling."""
        texts = [
            self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            for conversation in conversations
        ]
        # The chat template already holds any special tokens the model expects.
        return self.complete(texts, seed=seed, add_special_tokens=False)

    def complete(self, texts: list[str], *, seed: int = 0, add_special_tokens: bool = True) -> list[str]:
        """One continuation per raw text (no chat template: classifiers, base models), `batch_size` at a time.

        `self.ended` then holds, per reply, whether it ended with a stop token (eos or end of turn) within
        `max_new_tokens` rather than being cut off: the engagement benchmark's turn-end rate.
        """
        replies = []
        self.ended: list[bool] = []
        for start in range(0, len(texts), self.batch_size):
            replies.extend(self._generate(texts[start : start + self.batch_size], seed + start, add_special_tokens))
        return replies

    def _generate(self, texts: list[str], seed: int, add_special_tokens: bool) -> list[str]:
        import torch

        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        batch = batch.to(self.device)
        prompt_length = batch["input_ids"].shape[1]
        if self.max_positions and prompt_length + self.settings.max_new_tokens > self.max_positions:
            raise BackendError(
                f"A prompt of {prompt_length} tokens plus --max_new_tokens {self.settings.max_new_tokens} exceeds the "
                f"model's context of {self.max_positions} tokens; lower --max_new_tokens or --num_few_shot, or use a "
                "model with a longer context."
            )
        sampling = self.settings.temperature > 0
        torch.manual_seed(seed)
        with torch.no_grad():
            output = self.model.generate(
                **batch,
                max_new_tokens=self.settings.max_new_tokens,
                min_new_tokens=self.settings.min_new_tokens or None,
                do_sample=sampling,
                temperature=self.settings.temperature if sampling else None,
                top_p=self.settings.top_p if sampling else None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.stop_ids,
            )
        # (batch, new_tokens): everything after the left-padded prompt
        new_tokens = output[:, prompt_length:]
        stops = torch.tensor(self.stop_ids, device=new_tokens.device)
        self.ended.extend(torch.isin(new_tokens, stops).any(dim=1).tolist())
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint, called from a thread pool with timeouts and bounded retries.

    Args:
        base_url: the API root, e.g. `http://127.0.0.1:8000/v1`.
        model: the model name the server expects.
        settings: sampling settings.
        concurrency: requests in flight at once.
        timeout: seconds one request may take, from connecting to the last byte of the response.
        max_retries: further attempts after a failed request (connection refused, timeout, 5xx/429, not JSON).
        api_key: sent as a bearer token when set (`$OPENAI_API_KEY` when `None`; local servers need none).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        settings: GenerationSettings,
        *,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 3,
        api_key: str | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise BackendError(
                f"--base_url {base_url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1."
            )
        self.name = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.settings = settings
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def chat(self, conversations: list[Conversation], *, seed: int) -> list[str]:
        """One reply per conversation, `concurrency` requests at a time, in order."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._complete, conversations, range(seed, seed + len(conversations))))

    def _complete(self, conversation: Conversation, seed: int) -> str:
        body = {
            "model": self.name,
            "messages": conversation,
            "max_tokens": self.settings.max_new_tokens,
            "temperature": self.settings.temperature,
            "top_p": self.settings.top_p,
            "seed": seed,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                return _reply_text(_post(self.url, json.dumps(body).encode(), headers, self.timeout))
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode(errors="replace")
                last_error = f"HTTP {error.code}: {detail}"
                if error.code < 500 and error.code != 429:
                    break  # the request itself is wrong (unknown model, bad field): retrying cannot help
            except (OSError, http.client.HTTPException, ValueError) as error:
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        raise BackendError(
            f"The endpoint {self.url} failed after {attempt + 1} attempt(s) (last error: {last_error}); check that the "
            "server is running and serves --model, or raise --timeout / --max_retries for a slow one."
        )


def _post(url: str, data: bytes, headers: dict[str, str], timeout: float) -> bytes:
    """POST `data` and return the response body, all within `timeout` seconds: a deadline for the whole request, not
    per read (a server sending a byte a second would otherwise never time out). At the deadline a timer shuts the
    socket down, which ends a read waiting for bytes; the body is read in chunks that stop at the deadline.

    Raises:
        TimeoutError: no complete response by the deadline.
        urllib.error.HTTPError: an HTTP error status (with its body).
        OSError, http.client.HTTPException: the connection failed.
    """
    parts = urllib.parse.urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        connection.request("POST", parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=headers)
        response = connection.getresponse()
        chunks = []
        # Chunk by chunk, checking the clock: on Linux a shut-down socket still delivers bytes that keep arriving.
        while not expired.is_set() and (chunk := response.read1(1 << 16)):
            chunks.append(chunk)
        payload = b"".join(chunks)
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"timed out: no complete response within --timeout {timeout:g} s") from None
        raise
    finally:
        timer.cancel()
        connection.close()
    if expired.is_set():
        raise TimeoutError(f"timed out: no complete response within --timeout {timeout:g} s")
    if response.status >= 400:
        raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, io.BytesIO(payload))
    return payload


def _reply_text(payload: bytes) -> str:
    """The assistant text of a chat completion; `ValueError` (retried) when the body is not one."""
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion: {payload[:120]!r}") from None
    if not isinstance(content, str):
        raise ValueError(f"message content is {type(content).__name__}, not a string")
    return content.strip()


@dataclasses.dataclass
class BackendArguments:
    """Which model generates, and how (shared by `constitution generate` and `engagement`)."""

    model: str | None = dataclasses.field(
        default=None, metadata={"help": "Local folder or Hub id; with --base_url, the name the endpoint serves."}
    )
    base_url: str | None = dataclasses.field(
        default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (no key needed)."}
    )
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "Tokens per reply at most."})
    temperature: float = dataclasses.field(default=0.7, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = dataclasses.field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "Conversations per generate() call / batch."})
    concurrency: int = dataclasses.field(default=8, metadata={"help": "Requests in flight (--base_url only)."})
    timeout: float = dataclasses.field(
        default=120.0, metadata={"help": "Deadline in seconds for each whole request (--base_url only)."}
    )
    max_retries: int = dataclasses.field(default=3, metadata={"help": "Retries of a failed request (--base_url)."})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16."})
    device: str | None = dataclasses.field(default=None, metadata={"help": "cpu, cuda, ...; the GPU if present."})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": "Allow the model's own code."})
    chat_template: str | None = dataclasses.field(
        default=None, metadata={"help": "chatml: ChatML text for a model without a chat template (a base model)."}
    )


def check_backend_arguments(args: BackendArguments) -> None:
    """Cheap checks before any model is loaded; `BackendError` names the flag and the fix."""
    if not args.model:
        raise BackendError("--model is required: a local model folder or Hub id (with --base_url, the served name).")
    problems = [
        (args.max_new_tokens < 1, f"--max_new_tokens {args.max_new_tokens} must be at least 1, e.g. 256"),
        (args.temperature < 0, f"--temperature {args.temperature} must be >= 0 (0 is greedy)"),
        (not 0 < args.top_p <= 1, f"--top_p {args.top_p} must be in (0, 1]"),
        (args.batch_size < 1, f"--batch_size {args.batch_size} must be at least 1, e.g. 16"),
        (args.concurrency < 1, f"--concurrency {args.concurrency} must be at least 1, e.g. 8"),
        (args.timeout <= 0, f"--timeout {args.timeout} must be positive, e.g. 120"),
        (args.max_retries < 0, f"--max_retries {args.max_retries} must be >= 0, e.g. 3"),
    ]
    for failed, message in problems:
        if failed:
            raise BackendError(message + ".")
    if args.chat_template not in (None, "chatml"):
        raise BackendError(f"--chat_template {args.chat_template!r} is not supported; use chatml or leave it unset.")
    if args.base_url is not None and not args.base_url.startswith(("http://", "https://")):
        raise BackendError(
            f"--base_url {args.base_url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1."
        )


def build_backend(args: BackendArguments):
    """The endpoint client when `--base_url` is given, else the model loaded in this process."""
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    if args.base_url:
        return OpenAIBackend(
            args.base_url,
            args.model,
            settings,
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
        )
    return TransformersBackend(
        args.model,
        settings,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        chat_template=args.chat_template,
    )
