"""The trainer's parts in isolation: schedules, param groups, DeepSpeed config, spike detector, checkpoint
bookkeeping (latest / prune / RNG), resume checks. In-process, no DeepSpeed engine."""

import functools
import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from tiny import tiny_config

from jamba import JambaForCausalLM
from parallel.zero import deepspeed_config, optimizer_param_groups
from train.checkpoint import Checkpointer
from train.checkpoint_layout import STATE_FILE, STATE_VERSION, CheckpointError, find_latest, resolve, tag_for
from train.checkpoint_load import safe_load
from train.config import CheckpointConfig, Schedule, ScheduleConfig, SpikeConfig
from train.distributed import Dist
from train.optim import SkippableAdamW, clip_divisor, grad_norm, lr_multiplier
from train.resume import check_compatible, find_checkpoint
from train.rng import rng_state, set_rng_state
from train.spikes import SpikeDetector


def tiny_model() -> JambaForCausalLM:
    return JambaForCausalLM(
        tiny_config(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1), seed=0
    )


# ---- schedules --------------------------------------------------------------------------------------------
def test_cosine_warms_up_then_decays_to_the_floor():
    s = ScheduleConfig(name=Schedule.cosine, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lr = [lr_multiplier(i, s) for i in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[9:109], lr[10:110], strict=True))
    assert lr[60] == pytest.approx(0.55) and lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    s = ScheduleConfig(
        name=Schedule.wsd, warmup_steps=5, total_steps=100, min_lr_ratio=0.0, decay_fraction=0.2
    )
    lr = [lr_multiplier(i, s) for i in range(100)]
    assert lr[4] == 1.0 and all(x == 1.0 for x in lr[5:80])
    assert lr[80] == pytest.approx(0.95) and lr[99] == pytest.approx(0.0)
    assert lr_multiplier(50, ScheduleConfig(name=Schedule.constant, warmup_steps=5, total_steps=100)) == 1.0


# ---- optimizer ---------------------------------------------------------------------------------------------
def test_no_weight_decay_on_norms_biases_A_log_D():
    model = tiny_model()
    groups = {g["name"]: g for g in optimizer_param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {names[id(p)] for p in groups["no_decay"]["params"]}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    for suffix in (
        "A_log",
        ".D",
        "dt_proj.bias",
        "input_layernorm.weight",
        "final_layernorm.weight",
        "conv1d.bias",
    ):
        assert any(n.endswith(suffix) for n in plain), suffix
        assert not any(n.endswith(suffix) for n in decayed), suffix
    assert "lm_head.weight" in decayed and len(plain) + len(decayed) == len(names)


def test_expert_params_go_to_deepspeed_moe_groups():
    model = tiny_model()
    for n, p in model.named_parameters():
        if ".experts." in n:
            p.allreduce, p.group_name = False, "ep_size_2"  # what parallel/expert_parallel.py sets
    groups = optimizer_param_groups(model, 0.1)
    moe = [g for g in groups if g.get("moe")]
    assert moe and all(g["name"] == "ep_size_2" for g in moe)
    assert all(getattr(p, "allreduce", True) is False for g in moe for p in g["params"])
    assert all(getattr(p, "allreduce", True) for g in groups if not g.get("moe") for p in g["params"])


def test_skipped_step_changes_neither_weights_nor_moments():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((3,), 100.0)
    with opt.update(skip=True, max_norm=1.0, norm=173.2):
        opt.step()
        opt.step()  # ZeRO calls step once per param group
    assert torch.equal(p, before) and all(torch.equal(state[k], v) for k, v in opt.state[p].items())
    opt.step()  # the options end with the block
    assert not torch.equal(p, before)


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_norm", [0.0, 1.0, 1e6])
def test_clipping_in_the_optimizer_step_equals_torch_clipping(fused, max_norm, on_device):
    """The update clips by the divisor of the norm it is given (a float read back, or ZeRO's tensor asked for
    when the step runs), in the fused kernel or a foreach divide: the same weights and moments as
    torch.nn.utils.clip_grad_norm_ then AdamW, for every param group stepped in the block."""
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(n)) for n in (300, 7)]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o_ref = torch.optim.AdamW(ref, lr=0.1, fused=fused)
    o_ours = SkippableAdamW([{"params": [q]} for q in ours], lr=0.1, fused=fused)
    groups = o_ours.param_groups
    for step in range(3):
        grads = [torch.randn_like(p) * (3.0 if step != 1 else 1e-3) for p in ref]
        for p, q, g in zip(ref, ours, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        norm = grad_norm(ours)
        want = float(torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm else float("inf")))
        assert norm == pytest.approx(want, rel=1e-6)
        asked = []
        given = functools.partial(_ask, asked, norm) if on_device else norm
        with o_ours.update(skip=False, max_norm=max_norm, norm=given):
            for g in groups:  # as ZeRO: one step per param group, the norm asked for once
                o_ours.param_groups = [g]
                o_ours.step()
        o_ours.param_groups = groups
        assert len(asked) == (on_device and max_norm > 0) and not hasattr(o_ours, "grad_scale")
        o_ref.step()
        for p, q in zip(ref, ours, strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(o_ours.state[q]["exp_avg_sq"], o_ref.state[p]["exp_avg_sq"])


def _ask(asked: list, norm: float) -> torch.Tensor:
    asked.append(1)
    return torch.tensor(norm)


def test_clip_divisor_follows_torch():
    assert clip_divisor(0.5, 1.0) is None and clip_divisor(float("inf"), 1.0) is None
    assert clip_divisor(3.0, 1.0) == pytest.approx(3.0 + 1e-6)
    assert float(clip_divisor(torch.tensor(0.5), 1.0)) == 1.0
    assert float(clip_divisor(torch.tensor(3.0), 2.0)) == pytest.approx((3.0 + 1e-6) / 2.0)


def test_deepspeed_config():
    ds = deepspeed_config(
        zero_stage=2, micro_batch_size=4, grad_accum_steps=8, grad_clip=1.0, precision="bf16", on_gpu=True
    )
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert "torch_autocast" not in deepspeed_config(
        zero_stage=1, micro_batch_size=1, grad_accum_steps=1, grad_clip=0.0, precision="fp32", on_gpu=False
    )
    with pytest.raises(ValueError):
        deepspeed_config(
            zero_stage=3, micro_batch_size=1, grad_accum_steps=1, grad_clip=0, precision="fp32", on_gpu=False
        )


# ---- spikes ------------------------------------------------------------------------------------------------
def test_spike_detector():
    det = SpikeDetector(SpikeConfig(start_step=5, window=20, min_history=4, sigmas=6.0, min_jump=0.1))
    assert det.check_loss(1, 100.0) == (None, None)  # no verdict during warmup
    for x in [3.0, 2.9, 3.1, 3.0]:
        det.accept(x)
    assert det.check_loss(4, 100.0)[0] is None  # before start_step
    kind, thr = det.check_loss(6, 4.0)
    assert kind == "loss" and 3.0 < thr < 4.0
    assert det.check_loss(6, 3.2)[0] is None
    assert det.check_loss(6, float("nan"))[0] == "nonfinite_loss"
    assert det.check_loss(1, float("inf"))[0] == "nonfinite_loss"  # non-finite is a spike even in warmup
    det.count, det.skipped = 3, 2  # the W&B counters spikes/count, spikes/skipped continue after a resume
    other = SpikeDetector(det.cfg)
    other.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert other.threshold(6) == det.threshold(6) and (other.count, other.skipped) == (3, 2)


# ---- checkpoint bookkeeping ------------------------------------------------------------------------------------
def fake_checkpoint(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_text("x")
    if complete:
        (d / STATE_FILE).write_text(json.dumps({"version": STATE_VERSION, "step": step, "samples": step}))
    return d


def test_latest_skips_partial_and_dangling(tmp_path):
    assert find_latest(tmp_path) is None
    fake_checkpoint(tmp_path, 10)
    good = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # a save that was killed
    (tmp_path / "latest").write_text(tag_for(30))  # even if `latest` pointed at it
    assert find_latest(tmp_path) == good
    (tmp_path / "latest").write_text(tag_for(20))
    assert find_latest(tmp_path) == good == resolve(tmp_path) == resolve(good)
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve(tmp_path / tag_for(30))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve(tmp_path / "nothing")


def test_prune_keeps_last_n_every_m_and_drops_partials(tmp_path):
    for s in range(10, 101, 10):
        fake_checkpoint(tmp_path, s)
    fake_checkpoint(tmp_path, 105, complete=False)
    (tmp_path / "latest").write_text(tag_for(100))
    ck = Checkpointer(
        CheckpointConfig(dir=str(tmp_path), keep_last=2, keep_every=40), Dist(0, 1, 0, torch.device("cpu"))
    )
    ck.prune()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        tag_for(40),
        tag_for(80),
        tag_for(90),
        tag_for(100),
    ]


def test_rng_state_roundtrips_through_weights_only_load(tmp_path):
    dev = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(dev), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(safe_load(tmp_path / "rng.pt"), dev)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_safe_load_refuses_pickled_code(tmp_path):
    torch.save({"f": math.sqrt}, tmp_path / "evil.pt")  # a global outside the allow-list
    with pytest.raises(CheckpointError, match="weights_only"):
        safe_load(tmp_path / "evil.pt")


# ---- resume checks --------------------------------------------------------------------------------------------
def test_resume_rules(tmp_path, caplog):
    root = tmp_path / "ckpt"
    ck = Checkpointer(CheckpointConfig(dir=str(root)), Dist(0, 1, 0, torch.device("cpu")))
    assert find_checkpoint("auto", ck) is None and find_checkpoint("never", ck) is None
    good = fake_checkpoint(root, 10)
    assert find_checkpoint("auto", ck) == good
    with pytest.raises(CheckpointError, match="resume=never"):
        find_checkpoint("never", ck)
    shapes, state = (
        {"w": [4, 4]},
        {
            "step": 10,
            "param_shapes": {"w": [4, 4]},
            "model_config": {"hidden_size": 4},
            "config": {"optim": {"lr": 1.0}, "data": {"path": "a"}},
            "global_batch_size": 8,
        },
    )
    new = {"optim": {"lr": 0.5}, "data": {"path": "b"}, "checkpoint": {"load_optimizer_states": True}}
    with caplog.at_level(logging.INFO, logger="train.resume"):
        check_compatible(good, {**state, "world_size": 2}, shapes, {"hidden_size": 4}, new, 8, world_size=2)
    assert "optim.lr changed from 1.0 to 0.5" in caplog.text and "data.path changed" in caplog.text
    with pytest.raises(CheckpointError, match="another model.*hidden_size: 4 -> 8"):
        check_compatible(good, state, {"w": [8, 8]}, {"hidden_size": 8}, state["config"], 8, world_size=1)
    with pytest.raises(CheckpointError, match="written by 2 ranks.*load_optimizer_states=false"):
        check_compatible(good, {**state, "world_size": 2}, shapes, {"hidden_size": 4}, new, 8, world_size=1)
    new["checkpoint"]["load_optimizer_states"] = False  # weights only: allowed
    check_compatible(good, {**state, "world_size": 2}, shapes, {"hidden_size": 4}, new, 8, world_size=1)
