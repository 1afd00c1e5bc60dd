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

from .chunks import checkpointed_chunks
from .config import JambaConfig
from .experts import Experts


def expert_counts(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert, as a one-hot sum: no host sync (torch.bincount on CUDA reads the max back to the
    host) and no scatter (compiled, an index_add became a sorting index_put: 0.5 ms per call at 32K slots on
    an H100, 2 calls per MoE layer; the compare-and-sum fuses into one small kernel)."""
    return (flat_idx.unsqueeze(-1) == torch.arange(num_experts, device=flat_idx.device)).sum(0)


class _GatherSlots(torch.autograd.Function):
    """rows = x[order // k]: the (token, slot) pairs in expert order. Autograd's backward of that indexing
    is a sorting scatter-add (index_put with accumulate); `order` is a permutation, so the backward is a
    gather through its inverse and a sum over each token's k slots (no atomics, no sort)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (order,) = ctx.saved_tensors
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return g.index_select(0, inv).view(-1, ctx.k, g.shape[-1]).sum(1), None, None


def local_dispatch(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """Sort the (token, slot) pairs by expert, run every expert at once, put rows back in (token, slot)
    order with a permutation (no atomics) and sum the k weighted slots of each token."""
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    y = experts(_GatherSlots.apply(x, order, k), expert_counts(flat, experts.num_experts))
    y = torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1)
    return (y * topk_w.unsqueeze(-1)).sum(1).to(x.dtype)


class SparseMoE(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size)
        self.dispatcher: Callable = local_dispatch
        self.reduce_stats: Callable | None = None
        self.chunk = 0  # runtime.ff_chunk_size (jamba/runtime.py)

    def _dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """All tokens at once, or (training, ff_chunk_size set) in recomputed chunks of tokens. Every rank
        of an expert-parallel group sees the same token count, so all take the same number of chunks."""
        c, t = self.chunk, x.shape[0]
        if not c or t <= c or not (torch.is_grad_enabled() and x.requires_grad):
            return self.dispatcher(x, topk_idx, topk_w, self.experts)
        return checkpointed_chunks(self.dispatcher, c, x, topk_idx, topk_w, args=(self.experts,))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = torch.softmax(logits, dim=-1)
        topk_w, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        y = self._dispatch(x, topk_idx, topk_w.to(x.dtype))

        counts = expert_counts(topk_idx.reshape(-1), self.num_experts)
        prob_sum = probs.sum(0)
        z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum()
        n = torch.tensor(float(x.shape[0]), device=x.device)
        if self.reduce_stats is not None:
            counts, prob_sum, z_sum, n = self.reduce_stats(counts, prob_sum, z_sum, n)
        aux = self.num_experts * torch.sum((counts.float() / n) * (prob_sum / n))
        stats = {"aux_loss": aux, "z_loss": z_sum / n, "tokens_per_expert": counts.detach()}
        return y.reshape(shape), stats
