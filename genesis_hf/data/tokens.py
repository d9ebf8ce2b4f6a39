"""Document encoding shared by streaming mode and `data prepare`, so both produce the same tokens.

Each document is encoded on its own, without special tokens (no bos, no post-processor), and followed by one eos:
`doc_0 <eos> doc_1 <eos> ...`. Encoding goes straight to the Rust `tokenizers.Tokenizer` (`encode_batch_fast`, which
skips character offsets), several times faster than calling the `transformers` wrapper.

Long documents are encoded in pieces when that provably gives the same ids (see `splits_losslessly`): the Rust encoder
spreads a batch over the cores one document per task, so a single long file (a 200k-character module, a book)
otherwise keeps one core busy while the others wait. Pieces also bound the memory: the encoder keeps per-byte
alignment data for the text it is given, so a 50 MB document without a newline encoded whole took ~10 GB. A piece
ends at a newline cut, else at a space cut (`_pieces`), within `MAX_PIECE_CHARACTERS`; text is handed to the encoder
`ENCODE_BATCH_CHARACTERS` at a time, and every document, whatever its length, goes through pieces of bounded size.
"""

import hashlib
import json
import re

import numpy as np
from tokenizers import Tokenizer

from genesis_hf.args import ConfigError


def token_dtype(vocab_size: int) -> np.dtype:
    """`uint16` when every id fits in 16 bits (vocab <= 65536), else `uint32`: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# Documents longer than this are cut into pieces of about this size before encoding (when the tokenizer allows it).
SPLIT_CHARACTERS = 8192
# No piece is longer: a stretch this long without a cut point (no natural text has one) is cut anyway, where the ids
# may then differ from a whole encoding; that is the price of memory that does not grow with the document.
MAX_PIECE_CHARACTERS = 8 * SPLIT_CHARACTERS
# Text handed to the Rust encoder per call: its alignment data (tens of bytes per byte) stays in the tens of MB.
ENCODE_BATCH_CHARACTERS = 1 << 20
# A cut point: right after a newline that sits between two printable ASCII characters that are not spaces, e.g. the
# "\n" in "x = 1\ny = 2". Such a newline is always a pre-token of its own under the byte-level regex (see below).
_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")
# The fallback for text without newlines: right before a single space between two word characters or printable ASCII
# characters, e.g. "the| cat". The regex's ` ?\p{L}+`, ` ?\p{N}+` and ` ?[^\s\p{L}\p{N}]+` take a space only in front
# of what follows it and no pre-token ends with one, so "the" + " cat" yields the pre-tokens of "the cat".
_SPACE_CUT = re.compile(r"(?<=[\w!-~])(?= [\w!-~])")


def splits_losslessly(spec: dict) -> bool:
    """Whether encoding a text cut at `_CUT` points, piece by piece, gives exactly the ids of encoding it whole.

    True for the byte-level BPE this project trains (and GPT-2-style tokenizers): with no normaliser and the byte-level
    pre-tokenizer's regex (`'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`), a non-space
    character's pre-token never extends over a following newline, and a newline followed by a non-space character
    is matched by the last alternative alone; so "...x\\n" + "y..." yields the same pre-tokens as "...x\\ny...", and
    BPE never merges across pre-tokens. `Digits` only splits further around digits. Anything else (a normaliser, a
    prefix space, Metaspace/SentencePiece pre-tokenization, added tokens that strip whitespace or contain a newline,
    BPE dropout) returns False and documents are encoded whole.
    """
    if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
        return False
    if spec["model"].get("dropout"):
        return False
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not steps or steps[-1].get("type") != "ByteLevel":
        return False
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space") or not byte_level.get("use_regex", True):
        return False
    if any(step.get("type") != "Digits" for step in steps[:-1]):
        return False
    return not any(
        "\n" in token["content"] or " " in token["content"] or token.get("lstrip") or token.get("rstrip")
        for token in spec.get("added_tokens", [])
    )


def _pieces(text: str) -> list[str]:
    """`text` cut at `_CUT` points (else `_SPACE_CUT` points) into pieces of `SPLIT_CHARACTERS` to
    `MAX_PIECE_CHARACTERS` (except the last); `[text]` when it is at most twice `SPLIT_CHARACTERS` long."""
    pieces, start = [], 0
    while len(text) - start > 2 * SPLIT_CHARACTERS:
        window = (start + SPLIT_CHARACTERS, min(len(text), start + MAX_PIECE_CHARACTERS))
        cut = _CUT.search(text, *window) or _SPACE_CUT.search(text, *window)
        end = cut.start() if cut is not None else window[1]
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _bounded_pieces(text: str) -> list[str]:
    """For tokenizers that do not split losslessly: whole up to `MAX_PIECE_CHARACTERS` * 16, else cut as `_pieces`
    does (memory first: such a document would otherwise take gigabytes to encode)."""
    return [text] if len(text) <= 16 * MAX_PIECE_CHARACTERS else _pieces(text)


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
        self.split_long_documents = splits_losslessly(json.loads(backend_json))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode `texts` and return `(tokens, lengths)`.

        Returns:
            tokens: (sum(lengths),) int32, every document's ids followed by the eos.
            lengths: (len(texts),) int64, each document's token count, eos included.
        """
        pieces = self.split(texts)
        ids, piece_lengths = self.encode_pieces([piece for document in pieces for piece in document])
        return self.join(ids, piece_lengths, [len(document) for document in pieces])

    def split(self, texts: list[str]) -> list[list[str]]:
        """The pieces each document is encoded in (one piece for a document of up to 2 * `SPLIT_CHARACTERS`)."""
        return [_pieces(text) if self.split_long_documents else _bounded_pieces(text) for text in texts]

    def encode_pieces(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `pieces`, without eos: `(ids, lengths)`, (sum(lengths),) int32 and (len(pieces),) int64.

        Text goes to the encoder `ENCODE_BATCH_CHARACTERS` at a time, so its per-byte data of one batch is freed before
        the next. A piece's ids never depend on the other pieces, so any split of a piece list encodes to the same ids.
        """
        # int32 arrays, not lists: a list holds 8-byte pointers to int objects, ~10x the memory of the ids.
        arrays: list[np.ndarray] = []
        batch: list[str] = []
        size = 0
        for index, piece in enumerate(pieces):
            batch.append(piece)
            size += len(piece)
            if size >= ENCODE_BATCH_CHARACTERS or index == len(pieces) - 1:
                encodings = self.backend.encode_batch_fast(batch, add_special_tokens=False)
                arrays.extend(np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings)
                batch, size = [], 0
        lengths = np.fromiter((len(array) for array in arrays), dtype=np.int64, count=len(arrays))
        ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return ids, lengths

    def join(
        self, ids: np.ndarray, piece_lengths: np.ndarray, pieces_per_document: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Documents from their pieces' ids (as `encode_pieces` returns them): an eos after each document.

        Args:
            ids: (sum(piece_lengths),) the ids of all pieces, in order.
            piece_lengths: (pieces,) each piece's id count.
            pieces_per_document: how many consecutive pieces make each document (at least one).

        Returns:
            `(tokens, lengths)` as `encode` returns them.
        """
        if not pieces_per_document:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        first_pieces = np.cumsum([0, *pieces_per_document[:-1]])
        # (documents,) id count of each document without its eos.
        document_lengths = np.add.reduceat(piece_lengths, first_pieces)
        tokens = np.insert(ids.astype(np.int32, copy=False), np.cumsum(document_lengths), self.eos_token_id)
        return tokens, document_lengths.astype(np.int64) + 1


def tokenizer_fingerprint(backend_json: str, eos_token_id: int) -> str:
    """A hash of what decides the ids (model, pre-tokenizer, normaliser, added tokens, eos), ignoring runtime settings
    such as truncation and padding that `transformers` toggles on the backend."""
    spec = json.loads(backend_json)
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["eos_token_id"] = eos_token_id
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:32]}"


__all__ = ["TokenEncoder", "splits_losslessly", "token_dtype", "tokenizer_fingerprint"]
