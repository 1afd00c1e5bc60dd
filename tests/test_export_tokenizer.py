"""The export carries the corpus's tokenizer: AutoTokenizer loads it, config.json has the corpus's specials,
and our eval loss equals transformers' loss on the text tokenized by the exported tokenizer."""

import json

import pytest
import torch
import transformers  # a test extra: imported, not skipped (a broken install fails)
from safetensors.torch import save_file
from test_data_common import cfg, make_prepared, write_corpus
from tiny import tiny_config

from data import TokenLoader
from data.prepare import prepare
from data.tokenizer import tokenizer_for_corpus, train_bpe
from data.tokenizer_export import write_tokenizer
from jamba import JambaForCausalLM
from jamba.hf_compat import to_hf_state_dict
from train.checkpoint_layout import LATEST, MODEL_CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, tag_for
from train.eval import evaluate
from train.export import export

pytestmark = pytest.mark.timeout(120)


def trainer_checkpoint(root, corpus: str) -> JambaForCausalLM:
    """A checkpoint folder as the trainer writes it (latest, <tag>/model_state + model_config + trainer_state)."""
    config = tiny_config(
        vocab_size=320,  # the byte corpus's 259 ids, padded to a multiple of 64
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    model = JambaForCausalLM(config, seed=0).eval()
    tag = root / tag_for(1)
    tag.mkdir(parents=True)
    (root / LATEST).write_text(tag.name)
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(model).items()}, str(tag / WEIGHTS_FILE))
    (tag / MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (tag / STATE_FILE).write_text(
        json.dumps({"version": 1, "step": 1, "config": {"data": {"path": corpus, "mixture": []}}})
    )
    return model


def test_exported_tokenizer_and_loss_match_transformers(tmp_path):
    corpus = make_prepared(tmp_path, n_docs=60, val_fraction=0.25)
    model = trainer_checkpoint(tmp_path / "ckpt", corpus)
    out = tmp_path / "hf"
    written = export(tmp_path / "ckpt", out)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(written)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (256, 257, 258)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    hf = transformers.JambaForCausalLM.from_pretrained(out).eval()

    val = TokenLoader(cfg(corpus, seq_len=48, micro_batch_size=3), split="val")
    ours = evaluate(model, val, max_batches=2, device=torch.device("cpu"))
    losses = []
    for x, y in list(val)[:2]:
        for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
            window = xi + yi[-1:]
            text = "".join(
                tok.eos_token if t == 257 else chr(t)
                for t in window  # ASCII corpus: byte == char
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == window  # the exported tokenizer gives the corpus's ids
            ids = torch.tensor([ids])
            with torch.no_grad():
                losses.append(float(hf(input_ids=ids, labels=ids).loss))
    assert ours["batches"] == 2 and sum(losses) / len(losses) == pytest.approx(ours["loss"], rel=1e-4)


def test_bpe_corpus_tokenizer_is_written_with_its_specials(tmp_path):
    tok_file = tmp_path / "tokenizer.json"
    tok_file.write_text(train_bpe(["alpha beta gamma delta " * 40], 300).to_str())
    src = write_corpus(tmp_path / "src", 12)
    prepare([str(src)], str(tmp_path / "bpe"), tokenizer=str(tok_file), progress=False, workers=1)
    ids = write_tokenizer(tmp_path / "bpe", tmp_path)
    assert ids == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = tokenizer_for_corpus(str(tmp_path / "bpe"))
    text = "<7> beta gamma alpha"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode_batch([text])[0].tolist()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|pad|>")
