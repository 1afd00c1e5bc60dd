"""Sampling from a JambaForCausalLM: the prompt in one cached forward, then one token at a time.

With the caches (attention: keys and values; Mamba: the conv inputs and the scan state) a new token runs
each layer on that token only: the Mamba layers' cost does not grow with the context, attention reads its
cache once. `use_cache=False` runs the whole sequence again for every token (the baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .model import JambaForCausalLM


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1: all)


@dataclass
class Generation:
    tokens: torch.Tensor  # [b, prompt + new] token ids (int64), prompt included
    new_tokens: int  # generated per row (the longest row, when some stopped early)
    prefill_s: float  # the prompt's forward (and the first token)
    decode_s: float  # every later token


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """[b, vocab] logits -> [b] token ids."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # the tokens after the set reached p (the first stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: JambaForCausalLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    vocab_limit: int | None = None,
    use_cache: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> Generation:
    """Continue every row of `prompt` [b, T] (int64 ids on the model's device) by up to max_new_tokens.
    stop_id: a row ends after it (all rows ended: stop). vocab_limit: ids at or above it are never sampled
    (the model's vocabulary is padded beyond the tokenizer's)."""
    s = sampling or Sampling()
    b, t = prompt.shape
    dev = prompt.device
    if t == 0:
        raise ValueError("the prompt is empty: give at least one token")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(f"prompt ids out of range [0, {model.config.vocab_size}): min {lo}, max {hi}")
    model.eval()
    autocast = torch.autocast(
        dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    )
    cache = model.new_cache(b, t + max_new_tokens, dev, autocast_dtype) if use_cache else None
    tokens, done = prompt, torch.zeros(b, dtype=torch.bool, device=dev)
    step_input = prompt
    t0 = time.perf_counter()
    prefill_s, n = 0.0, 0
    for n in range(1, max_new_tokens + 1):
        with autocast:
            h, _ = model.model(step_input if use_cache else tokens, cache)
            logits = model.lm_head(h[:, -1]).float()
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        nxt = sample_next(logits, s, generator)
        if stop_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
            done = done | (nxt == stop_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if n == 1:
            _sync(dev)
            prefill_s = time.perf_counter() - t0
        if stop_id is not None and bool(done.all()):
            break
    _sync(dev)
    return Generation(tokens, n, prefill_s, time.perf_counter() - t0 - prefill_s)
