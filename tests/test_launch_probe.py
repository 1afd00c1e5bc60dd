"""The associative-recall probe: prompts are well formed and seeded, and the score separates a model that
looks values up from one that cannot."""

import torch
from tiny import tiny_config

from data.tokenizer import ByteTokenizer
from jamba import JambaForCausalLM
from launch.probe import KEYS, VALUES, ProbeConfig, chance, make_prompts, score


def test_prompts_are_seeded_and_answerable():
    prompts, answers = make_prompts(8, 50, seed=3)
    assert (prompts, answers) == make_prompts(8, 50, seed=3)
    assert prompts != make_prompts(8, 50, seed=4)[0]
    for p, a in zip(prompts, answers, strict=True):
        *pairs, query = p.split(";")
        table = dict(kv.split("=") for kv in pairs)
        assert len(table) == 8 and all(k in KEYS and v in VALUES for k, v in table.items())  # distinct keys
        assert query.endswith("=") and table[query[:-1]] == a
        assert len(p) == 4 * 8 + 2  # one byte per key, value and separator


class Oracle(torch.nn.Module):
    """Answers by finding the queried key earlier in the context: a perfect in-context lookup."""

    def __init__(self, vocab: int = 259) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids, return_logits=True):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for b, row in enumerate(ids.tolist()):
            key = row[-2]
            pos = next(i for i in range(len(row) - 3, -1, -1) if row[i] == key and row[i + 1] == ord("="))
            logits[b, -1, row[pos + 2]] = 1.0
        return type("Out", (), {"logits": logits})()


class Constant(torch.nn.Module):
    """Always says '7': right exactly when the answer is 7."""

    def forward(self, ids, return_logits=True):
        logits = torch.zeros(ids.shape[0], ids.shape[1], 259)
        logits[..., ord("7")] = 1.0
        return type("Out", (), {"logits": logits})()


def test_score_separates_lookup_from_guessing():
    cfg = ProbeConfig(num_pairs=(4, 16), num_prompts=300)
    perfect = score(Oracle(), ByteTokenizer(), cfg)
    assert perfect["K=4"]["acc"] == perfect["K=16"]["acc"] == 1.0 and perfect["K=16"]["acc_free"] == 1.0
    guess = score(Constant(), ByteTokenizer(), cfg)
    assert perfect["chance"] == chance() == 0.1
    for k in ("K=4", "K=16"):
        assert 0.05 < guess[k]["acc"] < 0.16  # the share of 7s among uniform random answers


def test_score_runs_on_a_real_model():
    out = score(
        JambaForCausalLM(tiny_config(vocab_size=259), seed=0),
        ByteTokenizer(),
        ProbeConfig(num_pairs=(4,), num_prompts=20),
    )
    assert 0.0 <= out["K=4"]["acc"] <= 1.0 and out["K=4"]["n"] == 20 and out["K=4"]["logp"] < 0
