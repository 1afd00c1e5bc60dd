"""Generation speed, cached (KV cache + Mamba state) against uncached (a full forward per token), side by side.

python benchmarks/generate_speed.py [--preset debug] [--device cpu] [--contexts 64,256,1024] [--new-tokens 32]
    [--batch 1] [--threads 1] [--out table.md]

For each prompt length: the same random prompt, greedy, both ways; the tokens must agree (else it stops
with an error). Decode tokens/s counts the tokens after the first (the first comes with the prompt's
forward, reported as prefill). On CUDA both run under bf16 autocast (fp32 weights), as train.generate does.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from jamba import JambaForCausalLM, get_preset
from jamba.generation import Sampling, generate


@torch.no_grad()
def fp32_check(model, vocab: int, device) -> str:
    """Cached logits (a 32-token prompt, then 32 single tokens) against one full forward, fp32."""
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    full = model(ids).logits
    cache = model.new_cache(1, 64)
    parts = [model(ids[:, :32], cache=cache).logits]
    parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(32, 64)]
    diff = (torch.cat(parts, dim=1) - full).abs().max().item()
    return f"fp32 check: max |cached - full| logit {diff:.2e} (max |logit| {full.abs().max().item():.2f})"


def run(model, prompt, new_tokens: int, use_cache: bool, dtype) -> tuple[torch.Tensor, float, float]:
    g = generate(
        model, prompt, new_tokens, Sampling(temperature=0), use_cache=use_cache, autocast_dtype=dtype
    )
    return g.tokens, g.prefill_s, (g.new_tokens - 1) / g.decode_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", default="64,256,1024", help="prompt lengths, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--out", help="also write the table (markdown) here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = get_preset(a.preset)
    model = JambaForCausalLM(cfg, seed=0).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{a.threads} CPU thread(s)"
    lines = [
        f"# generate speed: preset {a.preset} ({n_params / 1e6:.1f}M parameters, pattern {cfg.pattern}), "
        f"batch {a.batch}, {a.new_tokens} new tokens, greedy",
        f"device: {gpu}; torch {torch.__version__}; python {platform.python_version()}; "
        f"dtype {'bf16 autocast' if dtype else 'fp32'}",
        "",
        "| prompt tokens | cached tokens/s | uncached tokens/s | speedup | cached prefill ms | uncached prefill ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines.insert(2, fp32_check(model, cfg.vocab_size, device))
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    run(
        model, torch.randint(0, cfg.vocab_size, (a.batch, 8), generator=gen).to(device), 4, True, dtype
    )  # warm-up
    for ctx in (int(c) for c in a.contexts.split(",")):
        prompt = torch.randint(0, cfg.vocab_size, (a.batch, ctx), generator=gen).to(device)
        tok_c, pre_c, rate_c = run(model, prompt, a.new_tokens, True, dtype)
        tok_u, pre_u, rate_u = run(model, prompt, a.new_tokens, False, dtype)
        if dtype is None and not torch.equal(tok_c, tok_u):
            print(f"error: cached and uncached tokens differ at prompt length {ctx}", file=sys.stderr)
            return 1
        agree = (tok_c == tok_u).float().mean().item()
        row = f"| {ctx} | {rate_c:.1f} | {rate_u:.1f} | {rate_c / rate_u:.1f}x | {pre_c * 1e3:.0f} | {pre_u * 1e3:.0f} |"
        if dtype is not None and agree < 1:
            row += f" (bf16: {agree:.0%} of tokens agree)"
        lines.append(row)
        print(row, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
