"""CPU forward+backward time of a preset (default: `debug` at batch 4 x seq 256).

python benchmarks/cpu_step.py [--preset debug] [--batch 4] [--seq 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from jamba import JambaForCausalLM, get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    m = JambaForCausalLM(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    times = []
    for _ in range(args.steps + 2):
        t = time.perf_counter()
        m(x[:, :-1], labels=x[:, 1:]).loss.backward()
        times.append(time.perf_counter() - t)
        m.zero_grad(set_to_none=True)
    t = times[2:]
    print(
        f"| preset | batch x seq | threads | fwd+bwd median | min |\n| --- | --- | --- | --- | --- |\n"
        f"| {args.preset} | {args.batch}x{args.seq} | {args.threads} | {1000 * statistics.median(t):.0f} ms | "
        f"{1000 * min(t):.0f} ms |"
    )


if __name__ == "__main__":
    main()
