"""A prepared corpus's tokenizer as transformers files, so an exported model folder carries it.

`write_tokenizer(corpus, out_dir)` writes `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`: `AutoTokenizer.from_pretrained(out_dir)` then gives the ids the corpus was made
with. An HF corpus ships its own tokenizer.json; the byte tokenizer is written as a byte-level BPE without
merges (byte b -> id b, specials at 256-258), which encodes any text to exactly `ByteTokenizer`'s ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from .manifest import load_manifest
from .tokenizer import BPE_SPECIALS, ByteTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def byte_level_chars() -> list[str]:
    """The printable character byte-level BPE uses for each byte (the table tokenizers' ByteLevel applies):
    printable Latin-1 bytes stand for themselves, the other bytes for 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """ByteTokenizer as a tokenizers.Tokenizer: ids 0-255 the bytes, then BOS, EOS, PAD as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in enumerate(byte_level_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BPE_SPECIALS])
    b = ByteTokenizer
    got = [tok.token_to_id(s) for s in BPE_SPECIALS]
    assert got == [b.bos_id, b.eos_id, b.pad_id], got  # the ids the corpus was written with
    return tok.to_str()


def tokenizer_files(corpus: str | Path) -> tuple[dict[str, str], dict[str, int]]:
    """The corpus's tokenizer files (name -> text, nothing written) and its bos/eos/pad token ids."""
    info = load_manifest(str(corpus)).tokenizer
    if info["kind"] == "byte":
        text = byte_tokenizer_json()
    else:
        text = (Path(corpus) / info["file"]).read_text()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(text)
    ids = {f"{k}_token_id": int(info[f"{k}_id"]) for k in ("bos", "eos", "pad")}
    names = {f"{k}_token": tok.id_to_token(ids[f"{k}_token_id"]) for k in ("bos", "eos", "pad")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    files = {
        "tokenizer.json": text,
        "tokenizer_config.json": json.dumps(config, indent=1) + "\n",
        "special_tokens_map.json": json.dumps(names, indent=1) + "\n",
    }
    assert tuple(files) == TOKENIZER_FILES
    return files, ids


def write_tokenizer(corpus: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write the corpus's tokenizer files into out_dir; returns its bos/eos/pad token ids."""
    files, ids = tokenizer_files(corpus)
    for name, text in files.items():
        (Path(out_dir) / name).write_text(text)
    return ids
