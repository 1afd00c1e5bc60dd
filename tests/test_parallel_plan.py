"""Plan mode (issue 5 part 6): groups, experts per rank, ZeRO partitioning and memory per GPU, no GPU needed."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config

from jamba import JambaForCausalLM, get_preset
from jamba.config import CHECKPOINT_CHOICES
from jamba.experts import Experts
from parallel.config import ZERO_STAGES
from parallel.memory import GiB, ParamCounts, activation_bytes, estimate_memory, param_counts
from parallel.plan import checkpoint_modes, format_plan, load_model, main, search


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
    # bf16 = autocast (the trainer's one meaning): fp32 weights and gradients, bf16 matmuls
    assert z0.weights == z0.grads == 4 * 1200 and z0.optimizer == 8 * 1200
    assert z1.optimizer == 12 * (800 / 8 + 400 / 2) and z1.grads == 4 * 1200
    assert z2.grads == 4 * (800 / 8 + 400 / 2) and z2.weights == 4 * 1200
    assert z1.cast_copies == 2 * 1200 and est(1, "fp32").cast_copies == 0
    assert est(1, "auto").total == z1.total  # auto plans as bf16
    assert est(1, "fp32").activations > z1.activations
    with_buckets = estimate_memory(cfg, c, world, ep, 1, 1, 16, precision="bf16", bucket_elems=1e3)
    assert with_buckets.buckets == 2 * 1e3 * 4
    with pytest.raises(ValueError, match="precision"):
        est(1, "autocast")  # the old second vocabulary is gone


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
    assert "does NOT fit" in out and "search for the smallest plan" in out


def test_cli_rejects_bad_sizes(capsys):
    assert main(["--model", "debug", "--world-size", "8", "--ep", "3"]) == 2
    assert "does not divide the world size 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the trainer's stages only (argparse: exit 2)
        main(["--model", "debug", "--world-size", "8", "--zero", "3"])
    assert e.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    assert main(["--model", "nope", "--world-size", "8"]) == 2
    assert "presets: " in capsys.readouterr().err
    assert main(["--model", "debug", "--world-size", "8", "optim.lr=1"]) == 2
    assert "only model.<field>=<value>" in capsys.readouterr().err
    assert main(["--model", "debug", "--world-size", "8", "model.num_attention_heads=5"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err


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
    z0 = estimate_memory(cfg, c, 1, 1, 0, 4, 4096, precision="bf16", bucket_elems=0)
    z1 = estimate_memory(cfg, c, 1, 1, 1, 4, 4096, precision="bf16", bucket_elems=0)
    assert z0.optimizer == 8 * c.total and z1.optimizer == 12 * c.total
    assert z0.cast_copies == 2 * c.total
    argv = ["--model", "bench", "--world-size", "1", "--micro-batch", "4", "--seq-len", "4096"]
    assert main([*argv, "--zero", "1", "--ep", "1", "--act-ckpt", "none"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-0" in out and "optimizer (8 B/param)" in out and "bf16 weight copies" in out


def test_cli_takes_every_trainer_preset_and_model_overrides():
    for name in ("lm-100m", "mqar"):  # conf/model presets that jamba/presets.py does not list
        cfg = load_model(name, [])
        assert cfg.num_experts == 1
    small = load_model("debug", ["model.hidden_size=64", "model.num_attention_heads=4"])
    assert small.hidden_size == 64 and param_counts(small).total < param_counts(load_model("debug", [])).total


def _in_order(cfg, world, mb):
    """Every candidate in the documented order: recomputation up, micro-batch down, EP up, ZeRO up."""
    E = cfg.num_experts
    eps = [e for e in range(1, world + 1) if world % e == 0 and E % e == 0]
    cks = checkpoint_modes(cfg)
    assert set(cks) <= set(CHECKPOINT_CHOICES) and cks[0] == "none"
    mbs = [m for m in (mb, mb // 2, mb // 4, mb // 8) if m >= 1]
    return [(m, c, e, z) for c in cks for m in mbs for e in eps for z in ZERO_STAGES]


@pytest.mark.parametrize("world, mb", [(32, 4), (64, 8)])
def test_search_returns_the_first_plan_that_fits(jamba_counts, world, mb):
    cfg = get_preset("jamba-v0.1")
    plan, _ = search(cfg, world, mb, 4096, counts=jamba_counts)
    assert plan is not None
    limit = 80 * GiB * 0.9
    fits = [
        estimate_memory(cfg, jamba_counts, world, e, z, m, 4096, c).total <= limit
        for m, c, e, z in _in_order(cfg, world, mb)
    ]
    first = fits.index(True)
    assert _in_order(cfg, world, mb)[first] == (plan.micro_batch, plan.act_ckpt, plan.ep, plan.zero)


def test_cli_search_and_nothing_fits(capsys):
    assert main(["--model", "debug", "--world-size", "2", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "smallest plan that fits on 2 GPUs: parallel.zero_stage=1 parallel.expert_parallel_size=1"
    )
    assert "activation_checkpointing=none" in out and "verdict: fits" in out
    assert main(["--model", "jamba-v0.1", "--world-size", "1", "--seq-len", "4096"]) == 1
    assert "nothing fits on 1 GPUs of 80 GiB" in capsys.readouterr().out
