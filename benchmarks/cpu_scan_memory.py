"""Peak host memory and time of the PyTorch selective scan (forward + backward): whole-sequence chunked scan
vs the blocked one (`scan_block_size`, used for long sequences when mamba-ssm is not there).

    python benchmarks/cpu_scan_memory.py --seq 16384 [--d 512] [--block 512]

Each mode runs in its own process (max RSS is per process), with MALLOC_MMAP_THRESHOLD_=65536 so that freed
large buffers go back to the OS and the RSS growth tracks live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def one(mode: str, d: int, L: int, n: int, block: int) -> dict:
    from jamba.scan import selective_scan_blocked, selective_scan_chunked

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    A = (-torch.rand(d, n, generator=g) * 4).requires_grad_()
    ins = (r(1, d, L), r(1, d, L), A, r(1, n, L), r(1, n, L), r(d), r(1, d, L), r(d))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if mode == "chunked":
        y = selective_scan_chunked(*ins, delta_softplus=True)
    else:
        y = selective_scan_blocked(*ins, delta_softplus=True, block_size=block)
    y.sum().backward()
    dt = time.perf_counter() - t
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20  # KiB -> GiB
    return {"s": dt, "gib": grown}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.d, a.seq, a.n, a.block)))
        return
    print("| scan | 1 x d x L, n | fwd+bwd | peak RSS growth |\n| --- | --- | --- | --- |")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in ("chunked", "blocked"):
        cmd = [sys.executable, __file__, "--one", mode, "--seq", str(a.seq), "--d", str(a.d)]
        cmd += ["--n", str(a.n), "--block", str(a.block)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        label = mode if mode == "chunked" else f"blocked ({a.block})"
        print(f"| {label} | 1 x {a.d} x {a.seq}, {a.n} | {r['s']:.2f} s | {r['gib']:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
