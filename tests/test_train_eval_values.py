"""Values, not keys, on the paths a planted bug slipped through before (issue 25): the validation loss on
several ranks (which data, how it is reduced), the model's state after an evaluation (dropout and
activation checkpointing on), and the MoE load metrics of a known routing. The trainer's parts run on
a stand-in `self` (no DeepSpeed engine): the model or a fake with the engine's calls."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from dist_utils import run_distributed
from test_data_common import make_prepared
from tiny import tiny_config

from jamba import JambaConfig, JambaForCausalLM
from jamba.moe import SparseMoE
from parallel.apply import set_activation_checkpointing
from train.build import build_data
from train.callbacks.evaluation import evaluate
from train.callbacks.metrics import TrainMetrics
from train.config import DataConfig, FaultConfig
from train.distributed import Dist
from train.step import StepStats, forward_backward

CPU = torch.device("cpu")


def stand_in(rank: int = 0, world: int = 1, **kw) -> SimpleNamespace:
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(eval_batches=kw.pop("eval_batches", 0), grad_accum_steps=1),
        logging=SimpleNamespace(expert_load=True),
        faults=FaultConfig(),
    )
    return SimpleNamespace(cfg=cfg, dist=Dist(rank, world, rank, CPU), **kw)


# ---- the validation loss on two ranks ----------------------------------------------------------------
class MeanOfInputs(torch.nn.Module):
    """A 'model' whose loss of a batch is known: the mean of its unmasked input ids."""

    def forward(self, x, labels):
        keep = labels != -100
        return SimpleNamespace(lm_loss=x[keep].float().mean(), loss=torch.tensor(1e6))


def rank_batches(rank: int, n: int, split: str) -> list:
    g = torch.Generator().manual_seed(100 * rank + (split == "train"))
    out = []
    for i in range(n):
        x = torch.randint(0, 50, (2, 6), generator=g) + (1000 if split == "train" else 0)
        y = x.clone()
        y[:, : (i + rank) % 5] = -100  # a different count of target tokens per batch and rank
        out.append((x, y))
    return out


def _eval_two_ranks() -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    me = stand_in(rank, 2, eval_batches=3, engine=MeanOfInputs())
    me.val_data, me.train_data = rank_batches(rank, 4 + rank, "val"), rank_batches(rank, 4, "train")
    got = evaluate(me.engine, me.val_data, CPU, me.cfg.trainer.eval_batches)
    total = count = 0.0
    for r in (0, 1):  # by hand: every target token of both ranks' first 3 batches weighs the same
        for x, y in rank_batches(r, 4 + r, "val")[:3]:
            keep = y != -100
            total, count = total + float(x[keep].float().sum()), count + float(keep.sum())
    assert got["val/loss"] == pytest.approx(total / count, rel=1e-7)
    assert got["val/ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert me.engine.training  # left as it was found: training


@pytest.mark.timeout(60)
def test_validation_loss_over_two_ranks_weighs_every_target_token_alike():
    run_distributed(_eval_two_ranks, 2, timeout=50)


@pytest.mark.timeout(60)
def test_each_rank_validates_on_its_own_part_of_the_val_split(tmp_path):
    corpus = make_prepared(tmp_path, n_docs=64, val_fraction=0.25)
    dcfg = DataConfig(path=corpus, seq_len=16, micro_batch_size=2)
    seen, trained = [], set()
    for rank in (0, 1):
        train, val = build_data(dcfg, Dist(rank, 2, rank, CPU))
        assert val is not None
        seen.append([tuple(x.flatten().tolist()) for x, _ in val])
        it = iter(train)
        trained |= {tuple(next(it)[0].flatten().tolist()) for _ in range(3 * len(seen[-1]))}
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # disjoint parts, both non-empty
    assert not (set(seen[0]) | set(seen[1])) & trained  # the val split, not the training stream


# ---- evaluation, then training: dropout and activation checkpointing are back ----------------------
def tiny_dropout_model() -> JambaForCausalLM:
    cfg = tiny_config(vocab_size=97, attn_layer_period=2, attn_layer_offset=1, attention_dropout=0.5)
    model = JambaForCausalLM(cfg, seed=0).train()
    set_activation_checkpointing(model, "full")
    return model


def train_step(model, x) -> tuple[float, list[torch.Tensor], int]:
    """Loss, gradients and the decoder-layer forward calls (2 per layer with checkpointing) of one step."""
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in model.model.layers]
    torch.manual_seed(7)  # the same dropout masks for both models
    out = model(x[:, :-1], labels=x[:, 1:])
    out.loss.backward()
    for h in hooks:
        h.remove()
    return (
        float(out.loss.detach()),
        [p.grad.clone() for p in model.parameters() if p.grad is not None],
        len(calls),
    )


@pytest.mark.timeout(60)
def test_training_after_an_evaluation_is_the_training_of_a_model_never_evaluated():
    evaluated, fresh = tiny_dropout_model(), tiny_dropout_model()
    x = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    val = [(x[:, :-1], x[:, 1:])]
    got = evaluate(evaluated, val, CPU, 0)
    with torch.no_grad():  # by hand: the eval-mode loss (no dropout)
        fresh.eval()
        want = float(fresh(x[:, :-1], labels=x[:, 1:]).lm_loss)
        fresh.train()
    assert got["val/loss"] == pytest.approx(want, rel=1e-6)
    loss, grads, calls = train_step(evaluated, x)
    loss_ref, grads_ref, calls_ref = train_step(fresh, x)
    assert calls == calls_ref == 2 * len(evaluated.model.layers)  # every layer recomputed in backward
    assert loss == loss_ref and abs(loss - want) > 1e-4  # dropout is on again, and it matters here
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


# ---- MoE load metrics of a known routing ---------------------------------------------------------------
E, HIDDEN = 4, 4
# tokens of each micro-batch, MoE layer and rank, by the two experts each picks (first: the larger weight)
ROUTES = {
    0: [[(0, 1), (0, 2), (0, 1)], [(3, 2), (3, 2)]],  # rank 0, micro-batch 0: layer 1, layer 3
    1: [[(1, 0), (2, 0)], [(3, 1), (3, 0), (2, 3)]],  # rank 0, micro-batch 1
    2: [[(0, 3)], [(1, 2), (1, 2), (1, 3)]],  # rank 1, micro-batch 0
    3: [[(2, 1), (2, 1), (0, 1)], [(3, 2)]],  # rank 1, micro-batch 1
}


def routed_moe() -> SparseMoE:
    cfg = JambaConfig(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, num_experts=E, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
    )  # fmt: skip
    moe = SparseMoE(cfg)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E))  # expert e's logit is the token's coordinate e
    return moe


def token(first: int, second: int) -> torch.Tensor:
    t = torch.zeros(E)
    t[first], t[second] = 6.0, 3.0
    return t


class RoutedEngine:
    """Each micro-batch: two MoE layers on the tokens of ROUTES; the engine's other calls do nothing."""

    def __init__(self, rank: int) -> None:
        self.moe, self.batches = routed_moe(), iter((2 * rank, 2 * rank + 1))

    def __call__(self, x, labels):
        stats = []
        for routes in ROUTES[next(self.batches)]:
            _, s = self.moe(torch.stack([token(*r) for r in routes]))
            stats.append(s)
        z = torch.zeros(())
        return SimpleNamespace(loss=z, lm_loss=z, aux_loss=z, z_loss=z, router_stats=stats)

    def backward(self, loss) -> None:
        pass

    def step(self) -> None:
        pass


def hand_aux(routes: list) -> float:
    """E * sum_e f_e P_e: f the fraction of the token slots routed to e, P the mean router probability."""
    p = torch.softmax(torch.stack([token(*r) for r in routes]), -1)
    f = [sum(e in r for r in routes) / len(routes) for e in range(E)]
    return E * sum(f[e] * float(p[:, e].mean()) for e in range(E))


def _moe_metrics_two_ranks() -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    me = stand_in(rank, 2)
    me.moe_layers, me.model_cfg = [1, 3], SimpleNamespace(num_experts=E)
    batches = iter([(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))] * 2)
    stats = StepStats.zeros(2, E, CPU)
    forward_backward(RoutedEngine(rank), batches, 2, stats, CPU, micro_loss=lambda loss: loss)
    stats = stats.reduce(2, 2)
    assert stats.layer_aux.shape == (2,) and stats.tokens_per_expert.shape == (2, E)
    m = TrainMetrics(me).moe_metrics(stats)
    for i, layer in enumerate((1, 3)):
        routes = [ROUTES[b][i] for b in range(4)]  # every micro-batch of both ranks
        slots = [e for batch in routes for r in batch for e in r]
        load = [slots.count(e) / len(slots) for e in range(E)]
        for e in range(E):
            assert m[f"moe/load/layer{layer}/expert{e}"] == pytest.approx(load[e], abs=1e-12)
        assert m[f"moe/load_max/layer{layer}"] == pytest.approx(max(load) * E, abs=1e-12)
        aux = sum(hand_aux(batch) for batch in routes) / 4  # the mean over micro-batches and ranks
        assert m[f"moe/aux_loss/layer{layer}"] == pytest.approx(aux, rel=1e-6)


@pytest.mark.timeout(60)
def test_moe_load_metrics_of_a_known_routing_on_two_ranks():
    run_distributed(_moe_metrics_two_ranks, 2, timeout=50)


def test_the_known_routing_is_what_the_router_picks():
    moe = routed_moe()
    for routes in ROUTES.values():
        for batch in routes:
            _, s = moe(torch.stack([token(*r) for r in batch]))
            want = torch.zeros(E, dtype=s["tokens_per_expert"].dtype)
            for r in batch:
                want[list(r)] += 1
            assert s["tokens_per_expert"].tolist() == want.tolist()
