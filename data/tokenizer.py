"""Tokenizers: a file-free byte tokenizer and Hugging Face `tokenizers` (trained BPE or any tokenizer.json).

Both expose the same small surface (encode_batch, decode, special ids, describe) so `prepare`
and users never branch on the kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger("data.prepare")
# Names under which common tokenizer files (Llama, Jamba, GPT-2, BERT-likes) keep their specials.
BOS_NAMES = ("<|startoftext|>", "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
# Specials added when we train a BPE ourselves.
BPE_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|pad|>")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def describe(self) -> dict: ...


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every id, so shards stay compact."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD: needs no file and can never fail on text."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "spec": "byte",
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` with its BOS/EOS/PAD ids resolved once."""

    def __init__(
        self,
        tok,
        spec: str,
        bos: str | None = None,
        eos: str | None = None,
        pad: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.tok = tok
        self.kind = "hf"
        self.spec = spec
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        config = config or {}
        self.eos_id = self._find("eos", eos or _config_token(config, "eos_token"), EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {spec}: no EOS token found among {EOS_NAMES}; pass --eos-token NAME")
        bos_id = self._find("bos", bos or _config_token(config, "bos_token"), BOS_NAMES)
        pad_id = self._find("pad", pad or _config_token(config, "pad_token"), PAD_NAMES)
        # Packing needs only EOS; a missing BOS/PAD falls back to EOS (as GPT-2 does) and is recorded.
        self.bos_id = self.eos_id if bos_id is None else bos_id
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def _find(self, what: str, explicit: str | None, names: Sequence[str]) -> int | None:
        if explicit is not None:
            tid = self.tok.token_to_id(explicit)
            if tid is None:
                raise ValueError(f"tokenizer {self.spec}: {what} token {explicit!r} is not in the vocabulary")
            return tid
        for name in names:
            tid = self.tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **specials: str | None) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        cfg_path = path.with_name("tokenizer_config.json")
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(_Tok.from_file(str(path)), spec=str(path), config=config, **specials)

    @classmethod
    def from_str(cls, data: str, spec: str, **specials: str | None) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        return cls(_Tok.from_str(data), spec=spec, **specials)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return encode_ids(self.tok, texts, token_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tok.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "file": "tokenizer.json",
            "sha256": self.sha256(),
        }


def encode_ids(tok, texts: Sequence[str], dtype: str) -> list[np.ndarray]:
    """Ids of raw text: no BOS/EOS added here, the loader puts the EOS separators in."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets: ~25% quicker
    return [np.asarray(e.ids, dtype=dtype) for e in encode(list(texts), add_special_tokens=False)]


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style) so that any text round-trips without unknown tokens."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(BPE_SPECIALS):
        raise ValueError(f"--vocab-size must be at least {256 + len(BPE_SPECIALS)} for byte-level BPE")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if (reached := tok.get_vocab_size(with_added_tokens=True)) < vocab_size:
        log.warning(
            "BPE: asked for %d tokens, the text allowed %d (no pair left to merge); the corpus and the "
            "model use %d (more or more varied text reaches more)",
            vocab_size,
            reached,
            reached,
        )
    return HFTokenizer(
        tok, spec=f"bpe:{vocab_size}", bos=BPE_SPECIALS[0], eos=BPE_SPECIALS[1], pad=BPE_SPECIALS[2]
    )


def load_tokenizer(spec: str, **specials: str | None) -> Tokenizer:
    """`byte`, or a path to a tokenizer.json (the Jamba or Llama file, or one `prepare` trained)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec, **specials)


def tokenizer_for_corpus(path: str) -> Tokenizer:
    """The tokenizer a prepared local corpus was made with (to decode samples, or to encode prompts)."""
    from .manifest import load_manifest

    info = load_manifest(path).tokenizer
    if info["kind"] == "byte":
        return ByteTokenizer()
    tok = HFTokenizer.from_file(Path(path) / info["file"])
    tok.bos_id, tok.eos_id, tok.pad_id = info["bos_id"], info["eos_id"], info["pad_id"]
    return tok
