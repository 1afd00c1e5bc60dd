"""model.vocab_size from the corpus: padded to a multiple of 64 unless set; too small is a ConfigError."""

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.tokenizer import train_bpe
from train.build import build_model, padded_vocab_size
from train.config import ConfigError, register, to_config

CONF = str(Path(__file__).resolve().parent.parent / "conf")
register()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def test_vocab_size_comes_from_the_corpus_padded_to_64():
    assert [padded_vocab_size(n) for n in (259, 64, 4074, 65)] == [320, 64, 4096, 128]
    model_cfg, model = build_model(load(), data_vocab_size=259)
    assert model_cfg.vocab_size == 320 and model.lm_head.weight.shape[0] == 320
    model_cfg, _ = build_model(load("model.vocab_size=300"), data_vocab_size=259)  # set: kept as given
    assert model_cfg.vocab_size == 300
    with pytest.raises(
        ConfigError, match=r"model.vocab_size=256 is smaller than the 259 token ids of .*stdlib"
    ):
        build_model(load("model.vocab_size=256"), data_vocab_size=259)


def test_bpe_smaller_than_asked_warns_with_the_size_reached(caplog):
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        tok = train_bpe(["a tiny text, a tiny text"] * 5, 8192)
    assert (
        tok.vocab_size < 8192 and f"asked for 8192 tokens, the text allowed {tok.vocab_size}" in caplog.text
    )
