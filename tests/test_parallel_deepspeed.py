"""DeepSpeed ZeRO-1/2 with our expert parallelism (issue 5 part 5b, and 5c through DeepSpeed's own norm).

A few AdamW steps with gradient clipping through `deepspeed.initialize` on gloo/CPU, fp32, EP=2, give the
same parameters (all experts gathered) and the same clipped-gradient norms as one process that averages the
losses of the router-statistics groups (see tests/test_parallel_ep.py for the convention).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from test_parallel_ep import batch, tiny_cfg

from jamba import JambaForCausalLM
from parallel.expert_parallel import apply_expert_parallel, gather_full_state_dict
from parallel.topology import make_topology
from parallel.zero import optimizer_param_groups, skip_single_rank_allreduce

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import: DeepSpeed picks its accelerator then
import deepspeed  # noqa: E402 - a hard dependency: a broken install fails here

pytestmark = pytest.mark.distributed
STEPS, LR, CLIP = 3, 1e-2, 0.5


def reference(cfg, world: int, ep: int) -> tuple[dict, list[float]]:
    model = JambaForCausalLM(cfg, seed=0)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=LR)
    norms = []
    for s in range(STEPS):
        for start in range(0, world, ep):
            ranks = range(start, start + ep)
            x = torch.cat([batch(r + 100 * s)[0] for r in ranks])
            y = torch.cat([batch(r + 100 * s)[1] for r in ranks])
            (model(x, labels=y).loss / (world // ep)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
    return model.state_dict(), norms


def check_zero(stage: int, ep: int, ours: bool = False) -> None:
    """ours: the trainer's update (train/optim.py optimizer_step: DeepSpeed does not clip, our AdamW divides
    by ZeRO's norm) in place of DeepSpeed's clipping and torch's AdamW."""
    from parallel.deepspeed_moe import prepare_deepspeed_moe
    from train.optim import SkippableAdamW, optimizer_step

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_cfg()
    groups = make_topology(ep)
    model = JambaForCausalLM(cfg, seed=0)
    apply_expert_parallel(model, groups)
    assert prepare_deepspeed_moe(model, groups) == 2
    params = optimizer_param_groups(model, 0.1)
    moe_ids = {id(p) for g in params if g.get("moe") for p in g["params"]}
    expert_ids = {id(p) for p in model.parameters() if getattr(p, "allreduce", True) is False}
    assert moe_ids == expert_ids and expert_ids  # exactly the expert params sit in DeepSpeed MoE groups
    opt = (SkippableAdamW if ours else torch.optim.AdamW)(params, lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if ours else CLIP,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    assert engine.has_moe_layers
    norms = []
    for s in range(STEPS):
        x, y = batch(rank + 100 * s)
        engine.backward(engine(x, labels=y).loss)
        if ours:
            norms.append(optimizer_step(engine, opt, skip=False, max_norm=CLIP))
        else:
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
    got = gather_full_state_dict(engine.module, groups)
    want, want_norms = reference(cfg, world, ep)
    assert max(want_norms) > CLIP  # the clipping is in what is compared
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms), rtol=1e-5, atol=1e-5)
    for k, v in want.items():
        torch.testing.assert_close(
            got[k], v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"ZeRO-{stage} {k}: {m}"
        )


def run_two_ranks() -> None:
    check_zero(1, 2)
    check_zero(2, 2)
    check_zero(2, 2, ours=True)


def run_four_ranks() -> None:
    check_zero(2, 2)  # EDP groups of 2: expert gradients reduced over them, dense over all 4


@pytest.mark.timeout(200)
def test_zero1_zero2_ep2_two_ranks_match_single_process():
    run_distributed(run_two_ranks, 2, timeout=180)


@pytest.mark.timeout(200)
def test_zero2_ep2_four_ranks_match_single_process():
    run_distributed(run_four_ranks, 4, timeout=180)


def run_one_rank_stage0() -> None:
    """Stage 0 on one rank, as the trainer runs it: DeepSpeed's bucketed all-reduce (a flatten, a no-op
    all-reduce and a copy back of every gradient) is skipped, and the result is plain PyTorch's."""
    cfg = tiny_cfg()
    model = JambaForCausalLM(cfg, seed=0)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    skip_single_rank_allreduce(engine, dist.get_world_size())
    calls = []
    engine.buffered_allreduce_fallback = lambda *a, **k: calls.append(1)
    want = JambaForCausalLM(cfg, seed=0)
    ref_opt = torch.optim.AdamW(optimizer_param_groups(want, 0.1), lr=LR)
    for s in range(STEPS):
        x, y = batch(100 * s)
        engine.backward(engine(x, labels=y).loss)
        engine.step()
        want(x, labels=y).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert not calls
    for (k, v), w in zip(engine.module.state_dict().items(), want.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.timeout(120)
def test_one_rank_stage0_skips_deepspeed_allreduce_and_matches_torch():
    run_distributed(run_one_rank_stage0, 1, timeout=100)


@pytest.mark.gpu
@pytest.mark.timeout(400)
def test_bf16_autocast_training_through_deepspeed_gpu(tmp_path):
    # `python -m train` on one GPU, the GPU default (bf16 autocast through DeepSpeed's torch_autocast, fp32
    # masters) against the same run in fp32: close losses, but not the same numbers (bf16 really ran),
    # learning, and fp32 weights in the checkpoint
    from safetensors.torch import load_file
    from tiny import TINY
    from train_runs import run_train

    from train.checkpoint_layout import WEIGHTS_FILE, find_latest

    base = [
        *TINY,
        "parallel.device=cuda",
        "parallel.compile=none",
        "trainer.max_steps=8",
        "trainer.eval_interval=0",
        "checkpoint.interval=0",
    ]
    bf16 = run_train(tmp_path / "bf16", [*base, "parallel.precision=auto"], timeout=180)
    assert bf16.returncode == 0, bf16.output[-4000:]
    fp32 = run_train(tmp_path / "fp32", [*base, "parallel.precision=fp32"], timeout=180)
    assert fp32.returncode == 0, fp32.output[-4000:]
    assert ", bf16, ZeRO-0" in bf16.output and ", fp32, ZeRO-0" in fp32.output
    a, b = bf16.losses(), fp32.losses()
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 3e-2 * b[s] for s in a), (a, b)
    assert any(a[s] != b[s] for s in a) and a[8] < a[1]
    weights = load_file(str(find_latest(tmp_path / "bf16" / "checkpoints") / WEIGHTS_FILE))
    assert {t.dtype for t in weights.values()} == {torch.float32}
