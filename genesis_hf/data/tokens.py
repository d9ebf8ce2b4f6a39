"""Document encoding shared by streaming mode and `data prepare`, so both produce the same tokens.

Each document is encoded on its own, without special tokens (no bos, no post-processor), and followed by one eos:
`doc_0 <eos> doc_1 <eos> ...`. Encoding goes straight to the Rust `tokenizers.Tokenizer` (`encode_batch_fast`, which
skips character offsets), several times faster than calling the `transformers` wrapper.
"""

import hashlib
import json

import numpy as np
from tokenizers import Tokenizer

from genesis_hf.args import ConfigError


def token_dtype(vocab_size: int) -> np.dtype:
    """`uint16` when every id fits in 16 bits (vocab <= 65536), else `uint32`: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenEncoder:
    """Encodes documents to one flat token array with an eos after each document.

    Args:
        tokenizer: a `PreTrainedTokenizerFast` (its Rust backend is copied; truncation and padding are switched off),
            or the JSON string of a `tokenizers.Tokenizer` (how worker processes receive it).
        eos_token_id: the separator id; defaults to `tokenizer.eos_token_id`.
    """

    def __init__(self, tokenizer, eos_token_id: int | None = None) -> None:
        if isinstance(tokenizer, str):
            backend_json = tokenizer
        else:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ConfigError(
                    f"The data pipeline needs a fast tokenizer (PreTrainedTokenizerFast), got {type(tokenizer).__name__}."
                    " Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
                )
            backend_json = backend.to_str()
            if eos_token_id is None:
                eos_token_id = tokenizer.eos_token_id
        if eos_token_id is None:
            raise ConfigError(
                "The tokenizer has no eos token, and packing puts one after every document. Set "
                "tokenizer.eos_token (genesis tokenizers use '<|endoftext|>', id 0)."
            )
        self.backend_json = backend_json
        self.backend = Tokenizer.from_str(backend_json)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.eos_token_id = int(eos_token_id)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.fingerprint = tokenizer_fingerprint(backend_json, self.eos_token_id)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode `texts` and return `(tokens, lengths)`.

        Returns:
            tokens: (sum(lengths),) int32, every document's ids followed by the eos.
            lengths: (len(texts),) int64, each document's token count, eos included.
        """
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        lengths = np.fromiter((len(item) + 1 for item in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=np.int32)
        start = 0
        for item in ids:
            end = start + len(item)
            tokens[start:end] = item
            tokens[end] = self.eos_token_id
            start = end + 1
        return tokens, lengths


def tokenizer_fingerprint(backend_json: str, eos_token_id: int) -> str:
    """A hash of what decides the ids (model, pre-tokenizer, normaliser, added tokens, eos), ignoring runtime settings
    such as truncation and padding that `transformers` toggles on the backend."""
    spec = json.loads(backend_json)
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["eos_token_id"] = eos_token_id
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:32]}"


__all__ = ["TokenEncoder", "token_dtype", "tokenizer_fingerprint"]
