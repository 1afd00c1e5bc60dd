"""Plan mode (issue 5 part 6): groups, experts per rank, ZeRO partitioning and memory per GPU, no GPU needed."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from jamba import JambaForCausalLM, get_preset
from jamba.experts import Experts
from parallel.memory import ParamCounts, activation_bytes, estimate_memory, param_counts
from parallel.plan import format_plan, main


@pytest.fixture(scope="module")
def jamba_counts() -> ParamCounts:
    return param_counts(get_preset("jamba-v0.1"))


@pytest.mark.parametrize(
    "cfg",
    [tiny_config(), tiny_config(tie_word_embeddings=True), tiny_config(num_experts=1), get_preset("debug")],
    ids=["tiny", "tied", "dense", "debug"],
)
def test_param_counts_equal_the_built_module(cfg):
    with torch.device("meta"):
        model = JambaForCausalLM(cfg, init=False)
    expert = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())  # a tied weight is yielded once
    c = param_counts(cfg)
    assert (c.dense, c.expert, c.moe_layers) == (total - expert, expert, sum(cfg.layers_is_moe))


def test_jamba_v01_parameter_counts(jamba_counts):
    # The paper: 52B total, 12B active. 16 MoE layers x 16 experts x 3 x 4096 x 14336.
    assert jamba_counts.expert == 16 * 16 * 3 * 4096 * 14336
    assert jamba_counts.total / 1e9 == pytest.approx(51.57, abs=0.01)
    active = jamba_counts.dense + jamba_counts.expert // 8
    assert active / 1e9 == pytest.approx(12.11, abs=0.01)


def test_zero_partitioning_arithmetic():
    cfg = get_preset("debug")
    c = ParamCounts(dense=800, expert=1600, moe_layers=4)
    world, ep = 8, 4  # EDP = 2; each rank holds 400 expert params

    def est(zero, precision="bf16", w=world, e=ep):
        return estimate_memory(cfg, c, w, e, zero, 1, 16, precision=precision, bucket_elems=0)

    z0, z1, z2 = est(0), est(1), est(2)
    assert (z0.local_dense, z0.local_expert) == (800, 400)
    assert z0.weights == z0.grads == 2 * 1200 and z0.optimizer == 12 * 1200
    assert z1.optimizer == 12 * (800 / 8 + 400 / 2) and z1.grads == 2 * 1200
    assert z2.grads == 2 * (800 / 8 + 400 / 2) and z2.weights == 2 * 1200
    z3 = est(3, w=8, e=1)
    assert z3.weights == 2 * (800 + 1600) / 8
    auto = est(1, "autocast")  # train/zero.py: fp32 weights and gradients, bf16 matmuls
    assert auto.weights == auto.grads == 4 * 1200 and auto.optimizer == z1.optimizer
    assert auto.activations == z1.activations
    assert est(1, "fp32").activations > z1.activations
    with_buckets = estimate_memory(cfg, c, world, ep, 1, 1, 16, precision="bf16", bucket_elems=1e3)
    assert with_buckets.buckets == 2 * 1e3 * 2
    with pytest.raises(ValueError, match="precision"):
        est(1, "fp16")


def test_activation_checkpointing_and_batch_scaling():
    cfg = get_preset("jamba-v0.1")
    none = activation_bytes(cfg, 1, 4096, "none", 2)
    full = activation_bytes(cfg, 1, 4096, "full", 2)
    moe = activation_bytes(cfg, 1, 4096, "moe", 2)
    assert full < moe < none
    loss = 4096 * cfg.vocab_size * 8
    assert activation_bytes(cfg, 2, 4096, "none", 2) - loss == pytest.approx(2 * (none - loss))


def test_plan_output_for_64_gpus(jamba_counts):
    out = format_plan(get_preset("jamba-v0.1"), "jamba-v0.1", 64, 8, 2, 1, 4096, "full", counts=jamba_counts)
    assert "[0,1,2,3,4,5,6,7] [8,9,10,11,12,13,14,15]" in out and "(8 groups)" in out
    assert "[0,8,16,24,32,40,48,56]" in out
    assert "ep_rank  7 (ranks 7,15,...,63): experts 14..15" in out
    assert "over EDP=8" in out and "over DP=64" in out
    assert "verdict: fits" in out


def test_plan_says_when_it_does_not_fit(jamba_counts):
    out = format_plan(get_preset("jamba-v0.1"), "jamba-v0.1", 8, 8, 1, 1, 4096, counts=jamba_counts)
    assert "does NOT fit" in out and "--zero 2" in out


def test_cli_rejects_bad_sizes(capsys):
    assert main(["--model", "debug", "--world-size", "8", "--ep", "3"]) == 2
    assert "does not divide the world size 8" in capsys.readouterr().err
    assert main(["--model", "debug", "--world-size", "8", "--ep", "2", "--zero", "3"]) == 2
    assert "ZeRO stage 3 cannot be combined" in capsys.readouterr().err
    assert main(["--model", "nope", "--world-size", "8"]) == 2


def test_cli_runs_on_the_debug_preset(capsys):
    assert (
        main(["--model", "debug", "--world-size", "4", "--ep", "2", "--zero", "2", "--seq-len", "256"]) == 0
    )
    out = capsys.readouterr().out
    assert "experts per rank: 2 of 4" in out and "ZeRO-2 partitions optimizer states + gradients" in out


def test_single_gpu_plan_is_the_trainers_stage_0(capsys):
    # one rank: train/ runs a plain engine (stage 0), so no fp32 master clone: Adam moments only (8 B/param),
    # plus autocast's bf16 weight copies (2 B/param)
    cfg = get_preset("bench")
    c = param_counts(cfg)
    z0 = estimate_memory(cfg, c, 1, 1, 0, 4, 4096, precision="autocast", bucket_elems=0)
    z1 = estimate_memory(cfg, c, 1, 1, 1, 4, 4096, precision="autocast", bucket_elems=0)
    assert z0.optimizer == 8 * c.total and z1.optimizer == 12 * c.total
    assert z0.cast_copies == 2 * c.total
    assert main(["--model", "bench", "--world-size", "1", "--micro-batch", "4", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-0" in out and "optimizer (8 B/param)" in out and "bf16 weight copies" in out
