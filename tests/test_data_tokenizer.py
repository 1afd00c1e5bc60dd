"""Tokenizers: byte, trained BPE, and a user's tokenizer.json, with special ids recorded in the manifest."""

from __future__ import annotations

import json

import pytest
from test_data_common import WORDS, cfg, take, write_corpus

from data import TokenLoader
from data.manifest import load_manifest
from data.prepare import prepare
from data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_for_corpus, train_bpe

pytestmark = pytest.mark.timeout(60)
TEXTS = [" ".join(WORDS[i:] + WORDS[:i]) + " déjà vu 🚀" for i in range(len(WORDS))] * 3


def test_byte_tokenizer_round_trips_any_text():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3 and min(tok.bos_id, tok.eos_id, tok.pad_id) >= 256
    ids = tok.encode_batch(["héllo 🚀"])[0]
    assert ids.dtype.name == "uint16" and tok.decode(ids.tolist() + [tok.eos_id]) == "héllo 🚀"


def test_trained_bpe_round_trips_and_reloads_from_file(tmp_path):
    tok = train_bpe(iter(TEXTS), vocab_size=300)
    assert tok.vocab_size <= 300 and tok.describe()["spec"] == "bpe:300"
    ids = tok.encode_batch([TEXTS[0]])[0]
    assert len(ids) < len(TEXTS[0].encode()) and tok.decode(ids) == TEXTS[0]
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    again = load_tokenizer(str(path))
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.encode_batch([TEXTS[1]])[0].tolist() == tok.encode_batch([TEXTS[1]])[0].tolist()


def test_user_tokenizer_specials_detection(tmp_path):
    """A Llama-style file: specials named <s>/</s>, or named only in tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "[END]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = HFTokenizer.from_file(path)
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 2)  # no PAD in the file: falls back to EOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[END]"}}))
    assert HFTokenizer.from_file(path).eos_id == 3
    assert HFTokenizer.from_file(path, eos="<s>").eos_id == 1
    bare = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    (tmp_path / "bare").mkdir()
    bare.save(str(tmp_path / "bare" / "tokenizer.json"))
    with pytest.raises(ValueError, match="no EOS token"):
        HFTokenizer.from_file(tmp_path / "bare" / "tokenizer.json")


def test_prepare_with_bpe_then_with_its_file(tmp_path):
    src = write_corpus(tmp_path / "src", 30)
    out = tmp_path / "bpe"
    man = prepare(
        [str(src)],
        str(out),
        tokenizer="bpe",
        vocab_size=320,
        workers=2,
        progress=False,
        shard_size_mb=0.002,
        val_fraction=0.1,
    )
    info = man["tokenizer"]
    assert info["kind"] == "hf" and info["spec"] == "bpe:320" and (out / "tokenizer.json").is_file()
    loader = TokenLoader(cfg(str(out)))
    assert loader.vocab_size == info["vocab_size"] and loader.eos_id == info["eos_id"]
    x, _ = take(loader, 1)[0]
    assert max(max(row) for row in x) < loader.vocab_size
    text = tokenizer_for_corpus(str(out)).decode(x[0])
    assert any(w in text for w in WORDS)
    reuse = prepare(
        [str(src)],
        str(tmp_path / "file"),
        tokenizer=str(out / "tokenizer.json"),
        workers=1,
        progress=False,
        shard_size_mb=0.002,
        val_fraction=0.1,
    )
    assert reuse["tokenizer"]["sha256"] == info["sha256"]
    assert reuse["splits"]["train"]["tokens"] == man["splits"]["train"]["tokens"]
    assert load_manifest(str(tmp_path / "file")).tokenizer["eos_id"] == info["eos_id"]
