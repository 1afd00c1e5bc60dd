"""The Jamba model: interleaved attention / Mamba mixers, each followed by a dense or MoE feed-forward.

Module names mirror transformers' JambaForCausalLM so state dicts are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import JambaConfig
from .init import init_weights
from .layers import FEED_FORWARDS, MIXERS, checkpointed
from .norm import RMSNorm
from .runtime import Runtime, apply_runtime


@dataclass
class JambaOutput:
    loss: torch.Tensor | None = None  # lm_loss + aux_coef * aux_loss + z_coef * z_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router_stats: list[dict] = field(default_factory=list)  # one per MoE layer, with its "layer" index


class DecoderLayer(nn.Module):
    def __init__(self, cfg: JambaConfig, idx: int) -> None:
        super().__init__()
        self.idx = idx
        symbol, self.is_moe = cfg.layers[idx]
        spec = MIXERS[symbol]  # jamba/layers.py: the mixer's module and the attribute it lives under
        self.kind, self.mixer_attr = spec.name, spec.attr
        setattr(self, spec.attr, spec.cls(cfg))
        self.feed_forward = FEED_FORWARDS["E" if self.is_moe else ""].cls(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_attr)

    def forward(self, x: torch.Tensor, cache=None) -> tuple[torch.Tensor, dict | None]:
        """cache: this layer's mixer cache (generation), or None."""
        # branch outputs join the residual stream in its dtype (fp32, or bf16 with residual_in_fp32=False)
        x = x + self.mixer(self.input_layernorm(x), cache=cache).to(x.dtype)
        stats = None
        if self.is_moe:
            y, stats = self.feed_forward(self.pre_ff_layernorm(x))
        else:
            y = self.feed_forward(self.pre_ff_layernorm(x))
        return x + y.to(x.dtype), stats


class JambaModel(nn.Module):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpointing = "none"  # set by parallel.apply (a training technique, not the model's)
        self.residual_in_fp32 = cfg.residual_in_fp32

    def _checkpointed(self, layer: DecoderLayer) -> bool:
        return checkpointed(self.checkpointing, layer.kind, layer.is_moe)

    def forward(self, input_ids: torch.Tensor, cache: list | None = None) -> tuple[torch.Tensor, list[dict]]:
        """cache: one mixer cache per layer (JambaForCausalLM.new_cache); input_ids then are the tokens that
        follow those the caches have seen, and the caches are updated."""
        x = self.embed_tokens(input_ids)
        dev = x.device.type
        if not self.residual_in_fp32 and torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))  # every residual add then stays in that dtype
        all_stats = []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x, stats = layer(x, cache[i])
            elif self.training and torch.is_grad_enabled() and self._checkpointed(layer):
                x, stats = checkpoint(layer, x, use_reentrant=False)
            else:
                x, stats = layer(x)
            if stats is not None:
                all_stats.append({"layer": layer.idx, **stats})
        return self.final_layernorm(x), all_stats


def _ce_chunk(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, chunk_fn=_ce_chunk
) -> torch.Tensor:
    """Mean next-token loss without keeping [tokens, vocab] logits alive: each chunk's logits are
    recomputed in backward."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hs, ls = h[s : s + chunk], labels[s : s + chunk]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            total = total + checkpoint(chunk_fn, hs, weight, ls, use_reentrant=False)
        else:
            total = total + chunk_fn(hs, weight, ls)
    return total / (labels != -100).sum().clamp(min=1)


class JambaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: JambaConfig,
        init: bool = True,
        seed: int | None = None,
        runtime: Runtime | None = None,
        device_type: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """`runtime`: kernels and chunk sizes (jamba/runtime.py; default Runtime()), resolved once for
        `device_type` with matmuls in `dtype` (default: the GPU in bf16 if there is one, else the CPU)."""
        super().__init__()
        self.config = cfg
        self.model = JambaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._ce_chunk = _ce_chunk  # compile_layers() swaps in the compiled one
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init:
            init_weights(self, cfg, seed=seed)
        apply_runtime(self, runtime or Runtime(), device_type, dtype)  # sets loss_chunk_size, backends

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """One cache per layer for generating up to max_len tokens (prompt included); dtype: that of the
        activations (the autocast dtype under autocast). Pass it to forward(cache=...)."""
        p = self.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype
        return [layer.mixer.new_cache(batch_size, max_len, device, dtype) for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        cache: list | None = None,
    ) -> JambaOutput:
        """labels are aligned with input_ids (already shifted: labels[t] is the token after input_ids[t]);
        -100 is ignored. Logits are returned when asked, or when no labels are given. cache: see new_cache."""
        if input_ids.is_cuda:  # no host sync on GPU: a bad id fails the step asynchronously
            torch._assert_async(
                (input_ids.max() < self.config.vocab_size) & (input_ids.min() >= 0),
                "input_ids out of range [0, vocab_size)",
            )
        elif input_ids.max() >= self.config.vocab_size or input_ids.min() < 0:
            raise ValueError(
                f"input_ids out of range [0, {self.config.vocab_size}): "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}"
            )
        h, stats = self.model(input_ids, cache)
        out = JambaOutput(router_stats=stats)
        if return_logits or labels is None:
            out.logits = self.lm_head(h)
        if labels is not None:
            if out.logits is not None:
                out.lm_loss = F.cross_entropy(
                    out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
                )
            else:
                out.lm_loss = chunked_cross_entropy(
                    h, self.lm_head.weight, labels, self.loss_chunk_size, self._ce_chunk
                )
            out.loss = out.lm_loss
        if stats:
            out.aux_loss = torch.stack([s["aux_loss"] for s in stats]).mean()
            out.z_loss = torch.stack([s["z_loss"] for s in stats]).mean()
            if out.loss is not None:
                out.loss = out.loss + self.config.router_aux_loss_coef * out.aux_loss
                if self.config.router_z_loss_coef > 0:
                    out.loss = out.loss + self.config.router_z_loss_coef * out.z_loss
        return out

    def compile_layers(self, **compile_kwargs) -> JambaForCausalLM:
        """torch.compile each decoder layer in place (parameter names unchanged, so checkpoints and
        DeepSpeed see the same model) and the loss chunk. Layers of one kind share a compiled graph; the
        mamba-ssm / causal-conv1d calls are graph breaks. What it buys: RMSNorm, SwiGLU, router and
        dtype casts fused into few kernels (benchmarks/results/)."""
        for layer in self.model.layers:
            layer.compile(**compile_kwargs)
        self.model.final_layernorm.compile(**compile_kwargs)
        self._ce_chunk = torch.compile(_ce_chunk, **compile_kwargs)
        return self

    def no_weight_decay_names(self) -> set[str]:
        """Norm weights, biases, A_log, D: excluded from weight decay by the optimizer."""
        return {
            n
            for n, p in self.named_parameters()
            if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or n.endswith("A_log")
        }
