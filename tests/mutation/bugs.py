"""The bugs tests/mutation/run.py plants, one at a time: each a literal replacement in one file (it must match
exactly once) and the tests that should catch it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


RUN = "tests/test_train_run.py::"
SPIKES = "tests/test_train_spikes.py::"
CKPT = "tests/test_parallel_checkpoint.py::"
KILLED = RUN + "test_killed_save_keeps_latest_and_resume_is_exact"
SCAN = "tests/test_jamba_scan_triton.py::"

BUGS = [
    # the 11 bugs of issue 18's audit
    Bug(
        "warmup_off_by_one",
        "LR warmup off by one inside lr_multiplier",
        "train/optim.py",
        "return (step + 1) / s.warmup_steps",
        "return step / s.warmup_steps",
        ("tests/test_train_parts.py::test_cosine_warms_up_then_decays_to_the_floor",),
    ),
    Bug(
        "lr_one_based_step",
        "the trainer passes the 1-based step to the schedule",
        "train/trainer.py",
        "lr = cfg.optim.lr * lr_multiplier(self.step, cfg.schedule)",
        "lr = cfg.optim.lr * lr_multiplier(step, cfg.schedule)",
        (RUN + "test_metrics_reach_jsonl_and_offline_wandb",),
    ),
    Bug(
        "aux_coef_one",
        "aux-loss coefficient 1 instead of router_aux_loss_coef",
        "jamba/model.py",
        "out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss",
        "out.loss = out.loss + out.aux_loss",
        ("tests/test_jamba_model.py::test_forward_backward_shapes_and_stats",),
    ),
    Bug(
        "z_loss_square",
        "z-loss without the square",
        "jamba/moe.py",
        "z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum()",
        "z_sum = torch.logsumexp(logits, dim=-1).sum()",
        ("tests/test_jamba_model.py::test_router_losses_follow_their_formulas",),
    ),
    Bug(
        "ep_save_swapped",
        # (the file names do not matter: readers place experts by the offsets recorded inside each file, so
        # the swap is planted there: swapping the names, this bug's first form, is harmless now)
        "experts of the EP positions swapped in the save (each file records the mirrored position's offset)",
        "parallel/checkpoint.py",
        'name: {"expert_offset": off, "num_local": n, "num_experts": E}',
        'name: {"expert_offset": E - n - off, "num_local": n, "num_experts": E}',
        (CKPT + "test_ep_checkpoint_four_ranks_then_two",),
    ),
    Bug(
        "data_state_not_restored",
        "data-loader state not restored on resume",
        "train/trainer.py",
        'self.train_data.load_state_dict(state["data"])',
        "pass",
        (KILLED,),
    ),
    Bug(
        "weights_only_experts_permuted",
        "experts permuted in the weights-only load",
        "train/checkpoint.py",
        "sd = load_file(str(ckpt / WEIGHTS_FILE))",
        'sd = {k: v.flip(0) if ".experts." in k else v for k, v in load_file(str(ckpt / WEIGHTS_FILE)).items()}',
        (RUN + "test_weights_only_resume_on_another_layout", CKPT + "test_ep_checkpoint_four_ranks_then_two"),
    ),
    Bug(
        "rollback_no_reload",
        "rollback without reloading the checkpoint",
        "train/callbacks/spikes.py",
        't.checkpointer.load(t.engine, ckpt, optimizer=state.get("world_size") == t.dist.world_size)',
        "pass",
        (SPIKES + "test_rollback_restores_the_checkpoint_and_moves_past_the_data",),
    ),
    Bug(
        "skip_ignored_under_zero",
        "skip_batch ignored under ZeRO",
        "train/optim.py",
        "with optimizer.update(skip=skip, max_norm=max_norm, norm=lambda: zero._global_grad_norm):",
        "with optimizer.update(skip=False, max_norm=max_norm, norm=lambda: zero._global_grad_norm):",
        (SPIKES + "test_skip_batch_under_zero2_on_two_ranks",),
    ),
    Bug(
        "rng_not_restored",
        "RNG state not restored on resume",
        "train/checkpoint.py",
        "set_rng_state(safe_load(rng), self.dist.device)",
        "pass",
        (KILLED,),
    ),
    Bug(
        "wandb_id_not_restored",
        "W&B run id not restored on resume",
        "train/trainer.py",
        'self.wandb_id = state.get("wandb_run_id") or self.wandb_id',
        "self.wandb_id = self.wandb_id",
        (KILLED,),
    ),
    # more of our own
    Bug(
        "softplus_dropped",
        "softplus on dt dropped (the reference scan)",
        "jamba/scan.py",
        "delta = F.softplus(delta)",
        "delta = delta",
        ("tests/test_jamba_hf_parity.py::test_logits_match_transformers_and_weights_round_trip",),
    ),
    Bug(
        "moe_top1",
        "MoE routes to top-1 instead of top-k",
        "jamba/moe.py",
        "torch.topk(probs, self.top_k, dim=-1)",
        "torch.topk(probs, 1, dim=-1)",
        ("tests/test_jamba_model.py::test_forward_backward_shapes_and_stats",),
    ),
    Bug(
        "causal_mask_off",
        "attention without the causal mask",
        "jamba/attention.py",
        "is_causal=True",
        "is_causal=False",
        ("tests/test_jamba_model.py::test_causality",),
    ),
    Bug(
        "grad_accum_not_averaged",
        "step loss summed over micro-batches, not averaged (grad accumulation)",
        "train/step.py",
        "out[n] = out[n] / (micro_batches * world_size)",
        "out[n] = out[n] / world_size",
        (CKPT + "test_train_resumes_on_one_rank_with_optimizer_states",),
    ),
    Bug(
        "ep_regroup_inverse",
        "EP all-to-all: received rows put back with the permutation instead of its inverse",
        "parallel/expert_parallel.py",
        "y_recv = y_grp[torch.argsort(perm)]",
        "y_recv = y_grp[perm]",
        ("tests/test_parallel_ep.py::test_expert_parallel_two_ranks",),
    ),
    Bug(
        "data_shard_order",
        "data: streams read overlapping shard positions (visit order)",
        "data/order.py",
        "divmod(stream + k * self.num_streams, len(self.shards))",
        "divmod(stream * self.num_streams + k, len(self.shards))",
        ("tests/test_data_loader.py::test_epochs_partition_shards_among_streams",),
    ),
    Bug(
        "ranks_same_streams",
        "data: every rank reads the streams of rank 0",
        "data/state.py",
        "return list(range(u, self.num_streams, self.layout.slots))",
        "return list(range(u % self.layout.slots_per_rank, self.num_streams, self.layout.slots))",
        ("tests/test_data_loader.py::test_ranks_read_disjoint_streams",),
    ),
    Bug(
        "consolidated_rank0_experts",
        "consolidated weights hold rank 0's experts on every EP position",
        "parallel/expert_parallel.py",
        "sd[key] = all_gather_cat(getattr(ex, pname).detach(), groups.ep_group)",
        "sd[key] = getattr(ex, pname).detach().repeat(groups.ep_size, 1, 1)",
        (KILLED,),
    ),
    Bug(
        "max_rollbacks_off_by_one",
        "max_rollbacks off by one (the allowed rollback fails)",
        "train/callbacks/spikes.py",
        "if t.rollbacks > t.cfg.spikes.max_rollbacks:",
        "if t.rollbacks >= t.cfg.spikes.max_rollbacks:",
        (SPIKES + "test_rollback_restores_the_checkpoint_and_moves_past_the_data",),
    ),
    Bug(
        "max_rollbacks_ignored",
        "max_rollbacks never enforced",
        "train/callbacks/spikes.py",
        "if t.rollbacks > t.cfg.spikes.max_rollbacks:",
        "if False:",
        (SPIKES + "test_too_many_rollbacks_stop_the_run",),
    ),
    Bug(
        "nonfinite_grad_applied",
        "non-finite gradients applied on one rank (stage 0)",
        "train/optim.py",
        "skip = skip or not math.isfinite(norm)  # as ZeRO does",
        "skip = skip  # as ZeRO does",
        (SPIKES + "test_nonfinite_gradients_skip_the_update",),
    ),
    Bug(
        "no_signal_handlers",
        "SIGTERM/SIGUSR1 handlers not installed",
        "train/signals.py",
        "signal.signal(sig, self._handle)",
        "pass",
        ("tests/test_train_signals.py::test_sigterm_and_sigusr1_save_and_exit_zero",),
    ),
    Bug(
        "stop_without_save",
        "a signal stops the run without saving",
        "train/callbacks/checkpoints.py",
        "if t.cfg.checkpoint.save_final or t.stop.stopping:",
        "if t.cfg.checkpoint.save_final:",
        ("tests/test_train_signals.py::test_sigterm_and_sigusr1_save_and_exit_zero",),
    ),
    Bug(
        "clip_dropped",
        "gradient clipping dropped on one rank (stage 0)",
        "train/optim.py",
        "return (norm + 1e-6) / max_norm",
        "return None",
        ("tests/test_train_parts.py::test_clipping_in_the_optimizer_step_equals_torch_clipping",),
    ),
    Bug(
        "eval_total_loss",
        "train.eval reports the loss with the router terms instead of the LM loss",
        "train/eval.py",
        "total, n_tok, n_batches = total + float(out.lm_loss) * n",
        "total, n_tok, n_batches = total + float(out.loss) * n",
        (RUN + "test_eval_cli_reports_loss_and_perplexity",),
    ),
    # session 7: determinism and the saved pre-gate y
    Bug(
        "deterministic_ignored",
        "trainer.deterministic does not turn deterministic algorithms on",
        "train/build.py",
        "    if on:\n        os.environ.setdefault",
        "    if False:\n        os.environ.setdefault",
        (
            "tests/test_train_async_save.py::test_a_save_killed_in_the_background_leaves_latest_on_the_previous",
        ),
    ),
    Bug(
        "mamba_scan_when_deterministic",
        "auto keeps mamba-ssm's atomic scan backward under deterministic algorithms",
        "jamba/scan.py",
        'if name == "mamba_ssm" and torch.are_deterministic_algorithms_enabled():',
        'if name == "mamba_ssm" and False:',
        (SCAN + "test_deterministic_algorithms_avoid_the_kernels_that_sum_with_atomics",),
    ),
    Bug(
        "conv_kernel_when_deterministic",
        "causal-conv1d's atomic backward kept under deterministic algorithms",
        "jamba/scan.py",
        "if _cc1d is not None and not torch.are_deterministic_algorithms_enabled():",
        "if _cc1d is not None:",
        (SCAN + "test_deterministic_algorithms_avoid_the_kernels_that_sum_with_atomics",),
    ),
    Bug(
        "deterministic_accepts_mamba_ssm",
        "trainer.deterministic=true accepted with model.scan_backend=mamba_ssm",
        "train/config.py",
        'not (self.trainer.deterministic and self.model.scan_backend == "mamba_ssm")',
        "True",
        ("tests/test_train_config.py::test_deterministic_refuses_mamba_ssms_scan",),
    ),
    Bug(
        "saved_y_after_gate",
        "the Triton forward saves y after the SiLU(z) gate instead of before it",
        "jamba/scan_triton.py",
        "                    if SAVE_Y:\n                        tl.store(yp_p + t0 + tt, y_tile.to(yp_ptr.dtype.element_ty), mask=m)\n"
        "                    z_tile = tl.load(z_p + t0 + tt, mask=m, other=0.0).to(tl.float32)\n"
        "                    y_tile *= z_tile * tl.sigmoid(z_tile)\n",
        "                    z_tile = tl.load(z_p + t0 + tt, mask=m, other=0.0).to(tl.float32)\n"
        "                    y_tile *= z_tile * tl.sigmoid(z_tile)\n"
        "                    if SAVE_Y:\n                        tl.store(yp_p + t0 + tt, y_tile.to(yp_ptr.dtype.element_ty), mask=m)\n",
        (SCAN + "test_triton_scan_matches_reference",),
    ),
    Bug(
        "keep_last_off_by_one",
        "checkpoint retention keeps keep_last - 1 checkpoints",
        "train/checkpoint.py",
        "keep = {p for _, p in done[-self.cfg.keep_last :]}",
        "keep = {p for _, p in done[-self.cfg.keep_last + 1 :]}",
        ("tests/test_train_parts.py::test_prune_keeps_last_n_every_m_and_drops_partials",),
    ),
    Bug(
        "no_decay_group_decays",
        "norms, biases, A_log, D and the dt bias get weight decay",
        "parallel/zero.py",
        '{"name": "no_decay", "params": plain_params, "weight_decay": 0.0}',
        '{"name": "no_decay", "params": plain_params, "weight_decay": weight_decay}',
        ("tests/test_train_parts.py::test_no_weight_decay_on_norms_biases_A_log_D",),
    ),
    Bug(
        "mamba_D_skip_dropped",
        "the Mamba D skip connection dropped (the reference scan)",
        "jamba/scan.py",
        "y = y + D.float()[None, :, None] * u.float()",
        "y = y + 0.0 * u.float()",
        ("tests/test_jamba_hf_parity.py::test_logits_match_transformers_and_weights_round_trip",),
    ),
    Bug(
        "conv_dweight_shifted",
        "the Triton conv's weight gradient pairs dpre with x one step off",
        "jamba/conv_triton.py",
        "tk = t - (W - 1) + k",
        "tk = t - (W - 1) + k + 1",
        ("tests/test_jamba_conv_triton.py::test_triton_conv_matches_reference",),
    ),
]
