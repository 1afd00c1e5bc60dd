"""The MQAR recall eval: it scores the answer positions only, per number of pairs; a perfect lookup scores
1.0, a model that cannot see the context scores chance."""

import numpy as np
import pytest
import torch
from tiny import tiny_config

from data.synthetic import MQARSpec, prepare_mqar
from jamba import JambaForCausalLM
from launch.recall import score, val_examples

SPEC = MQARSpec(
    pairs=(2, 5), seq_len=24, num_keys=12, num_values=10, train_examples=8, val_examples=400, shards=2
)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class Oracle(torch.nn.Module):
    """Predicts, after each token, the token that followed its last earlier occurrence: a perfect lookup
    at the queries, arbitrary (and never scored) anywhere else."""

    def forward(self, ids, return_logits=True):
        logits = torch.zeros(*ids.shape, 64)
        for b, row in enumerate(ids.tolist()):
            for t, tok in enumerate(row):
                prev = [i for i in range(t) if row[i] == tok]
                logits[b, t, row[prev[-1] + 1] if prev else 0] = 1.0
        return _Out(logits)


class Blind(torch.nn.Module):
    """Always says the first value id: right exactly when the answer is that value."""

    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = value

    def forward(self, ids, return_logits=True):
        logits = torch.zeros(*ids.shape, 64)
        logits[..., self.value] = 1.0
        return _Out(logits)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("recall") / "c")
    prepare_mqar(path, SPEC)
    return val_examples(path)


def test_perfect_lookup_scores_one_per_k(corpus):
    examples, tok = corpus
    out = score(Oracle(), examples[:40], tok)
    assert set(out) == {"K=2", "K=5", "chance"}
    assert out["K=2"]["acc"] == out["K=5"]["acc"] == 1.0
    assert out["K=2"]["examples"] == out["K=5"]["examples"] == 20
    assert out["K=2"]["answers"] == 40 and out["K=5"]["answers"] == 100  # every key asked once
    assert out["chance"] == pytest.approx(1 / 10)


def test_a_blind_guess_scores_chance(corpus):
    examples, tok = corpus
    out = score(Blind(SPEC.value_range[0]), examples, tok, batch_size=64)
    for k in ("K=2", "K=5"):
        assert 0.05 < out[k]["acc"] < 0.16  # the share of one value among uniform answers (~1,400 answers)


def test_a_real_model_is_scored_on_answers_only(corpus):
    examples, tok = corpus
    torch.manual_seed(0)
    out = score(JambaForCausalLM(tiny_config(vocab_size=SPEC.vocab_size)), examples[:20], tok)
    assert all(0 <= out[k]["acc"] <= 1 for k in ("K=2", "K=5"))
    assert np.isclose(out["K=2"]["answers"] * 5, out["K=5"]["answers"] * 2)


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    # CheckpointError is a ValueError (train/checkpoint_layout.py): the CLI reports it instead of a traceback
    from launch.recall import main

    assert main([str(tmp_path / "nope")]) == 2
    assert "no complete checkpoint at" in capsys.readouterr().err
