"""The MQAR corpus: deterministic, well formed (disjoint key/value ranges, queries after the context,
every answer in the context), one example per training window, and labels only on the answers."""

import json

import numpy as np
import pytest

from data import DataConfig, DataError, TokenLoader
from data.manifest import load_manifest, location
from data.prepare import main as prepare_main
from data.shards import read_shard
from data.synthetic import EOS, PAD, SEP, MQARSpec, answer_targets, prepare_mqar

SPEC = MQARSpec(
    pairs=(2, 4, 6), seq_len=32, num_keys=10, num_values=8, train_examples=60, val_examples=12, shards=4
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mqar") / "c")
    prepare_mqar(path, SPEC)
    return path


def _docs(path, split):
    man = load_manifest(path)
    return [d for s in man.shards(split) for d in read_shard(location(path, s.name), s, man.dtype)]


def test_examples_are_well_formed(corpus):
    keys, values = SPEC.key_range, SPEC.value_range
    assert keys[1] == values[0] and SPEC.vocab_size == 4 + 10 + 8  # disjoint, adjacent ranges
    for split, n in (("train", 60), ("val", 12)):
        docs = _docs(corpus, split)
        assert len(docs) == n
        for i, d in enumerate(docs):
            k = SPEC.pairs[i % 3]  # the pair counts in equal shares
            assert d.size == SPEC.seq_len - 1
            ctx = d[: 2 * k]
            table = dict(zip(ctx[0::2].tolist(), ctx[1::2].tolist(), strict=True))
            assert len(table) == k and all(keys[0] <= x < keys[1] for x in table)  # distinct keys
            assert all(values[0] <= v < values[1] for v in table.values())
            assert d[2 * k] == SEP
            q = d[2 * k + 1 : 4 * k + 1]
            assert sorted(q[0::2].tolist()) == sorted(table)  # every key asked once, after the context
            assert all(table[a] == b for a, b in zip(q[0::2].tolist(), q[1::2].tolist(), strict=True))
            assert (d[4 * k + 1 :] == PAD).all()


def test_deterministic_and_seeded(corpus, tmp_path):
    again, other = str(tmp_path / "a"), str(tmp_path / "b")
    prepare_mqar(again, SPEC)
    prepare_mqar(other, MQARSpec(**{**SPEC.__dict__, "seed": 1}))
    assert load_manifest(again).to_dict() == load_manifest(corpus).to_dict()  # byte-identical shards
    assert load_manifest(other).fingerprint != load_manifest(corpus).fingerprint
    assert not np.array_equal(_docs(corpus, "train")[0], _docs(corpus, "val")[0])  # splits from own seeds


def test_loader_windows_are_examples_with_labels_on_answers(corpus):
    rule = answer_targets(load_manifest(corpus).tokenizer)
    for split in ("train", "val"):
        x, y = next(iter(TokenLoader(DataConfig(path=corpus, seq_len=32, micro_batch_size=6), split=split)))
        x, y = x.numpy(), y.numpy()
        assert (x[:, -1] == EOS).all()  # an example plus the loader's EOS is one window
        assert ((x[:, 0] >= SPEC.key_range[0]) & (x[:, 0] < SPEC.key_range[1])).all()
        k = rule.pairs(x)
        answered = y != -100
        assert (answered.sum(1) == k).all()  # one label per query, nothing else
        for row, lab, kk in zip(x, y, k, strict=True):
            table = dict(zip(row[: 2 * kk : 2].tolist(), row[1 : 2 * kk : 2].tolist(), strict=True))
            pos = np.flatnonzero(lab != -100)
            assert (pos > 2 * kk).all() and all(lab[p] == table[row[p]] for p in pos)


def test_bad_options_and_reuse(corpus, tmp_path, caplog):
    assert (
        prepare_main(["--synthetic", "mqar", "-o", str(tmp_path / "x"), "--pairs", "8", "--seq-len", "32"])
        == 2
    )
    assert "--pairs 8 needs 33 tokens" in caplog.text and "--seq-len 34" in caplog.text
    with pytest.raises(SystemExit, match="2"):  # argparse: a bad --pairs list
        prepare_main(["--synthetic", "mqar", "-o", str(tmp_path / "x"), "--pairs", "2,x"])
    prepare_mqar(corpus, SPEC)  # the same settings: kept
    with pytest.raises(DataError, match="made with other settings"):
        prepare_mqar(corpus, MQARSpec(**{**SPEC.__dict__, "num_values": 9}))
    with pytest.raises(DataError, match="made for data.seq_len=32"):
        TokenLoader(DataConfig(path=corpus, seq_len=64, micro_batch_size=2))


def test_cli_writes_the_options_into_the_manifest(tmp_path):
    out = str(tmp_path / "cli")
    args = ["--synthetic", "mqar", "-o", out, "--pairs", "1,3", "--seq-len", "16", "--keys", "5"]
    assert (
        prepare_main([*args, "--values", "3", "--examples", "9", "--val-examples", "3", "--shards", "3"]) == 0
    )
    man = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert man["tokenizer"]["pairs"] == [1, 3] and man["tokenizer"]["keys"] == [4, 9]
    assert man["tokenizer"]["values"] == [9, 12] and man["tokenizer"]["loss"] == "answers"
    assert len(man["splits"]["train"]["shards"]) == 3 and man["splits"]["val"]["documents"] == 3
