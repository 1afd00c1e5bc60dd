"""Mixture-of-experts feed-forward, dropless, routed as Jamba does.

Router: softmax over experts in fp32, top-k, weights NOT renormalised. Mixtral-style load-balancing
loss E * sum_e f_e P_e (f_e: share of top-k slots given to expert e, summing to k; P_e: mean router
probability) per layer, and an optional router z-loss. Two hooks let `parallel/` spread the layer
without this file knowing about process groups:
  - `dispatcher(x, topk_idx, topk_w, experts) -> y` (default: all experts local);
  - `reduce_stats(counts, prob_sum, z_sum, n_tokens) -> the same four, summed over the EP group`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import JambaConfig
from .experts import Experts


def local_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Sort the (token, slot) pairs by expert, run every expert at once, scatter-add back."""
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=experts.num_experts)
    y = experts(x[token], counts) * topk_w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class SparseMoE(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.use_kernels)
        self.dispatcher: Callable = local_dispatch
        self.reduce_stats: Callable | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = torch.softmax(logits, dim=-1)
        topk_w, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        y = self.dispatcher(x, topk_idx, topk_w.to(x.dtype), self.experts)

        counts = torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)
        prob_sum = probs.sum(0)
        z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum()
        n = torch.tensor(float(x.shape[0]), device=x.device)
        if self.reduce_stats is not None:
            counts, prob_sum, z_sum, n = self.reduce_stats(counts, prob_sum, z_sum, n)
        aux = self.num_experts * torch.sum((counts.float() / n) * (prob_sum / n))
        stats = {"aux_loss": aux, "z_loss": z_sum / n, "tokens_per_expert": counts.detach()}
        return y.reshape(shape), stats
