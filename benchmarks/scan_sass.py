"""The Triton scan's kernels compiled offline for a GPU (no GPU needed): registers, spills, SASS instructions.

    python benchmarks/scan_sass.py [--shape 4,4096,4096,16] [--tiling BD=16,T=4] [--arch 90] [--top 12]

Runs the op's host code (jamba/scan_op.py _fwd and _bwd) on meta tensors with every kernel launch captured,
compiles each launch's specialization with triton for sm_<arch> (ptxas as triton bundles it), and prints per
kernel: registers and stack (cuobjdump -res-usage), the static SASS instruction count and its most frequent
opcodes (nvdisasm). The loops over a chunk's T steps are unrolled, so a kernel's count divided by T is close
to its instructions per step: what bounded the scan on an H200 (benchmarks/results/2026-12-02-h200-triton-scan.md).
Needs TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("scan_sass.py: unset TRITON_INTERPRET (it compiles the kernels, it does not run them)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from jamba import scan_op  # noqa: E402
from jamba import scan_triton as kern  # noqa: E402
from jamba import scan_triton_bwd as kern_bwd  # noqa: E402
from jamba import scan_triton_bwd2 as kern_bwd2  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class Capture:
    """Stands in for a JIT kernel: `k[grid](*args, **meta)` records the launch instead of running it."""

    def __init__(self, fn, log: list) -> None:
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **meta: self.log.append((self.fn, grid, args, meta))


def _type(x) -> tuple[str, bool]:
    """Triton's signature type of one runtime argument, and whether it is 16-divisible (as the launcher's
    specialization assumes of allocator pointers and of ints that are multiples of 16)."""
    if isinstance(x, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[x.dtype], True
    if isinstance(x, bool):
        return "i1", False
    if isinstance(x, int):
        return ("i64" if abs(x) >= 2**31 else "i32"), x % 16 == 0
    raise TypeError(f"unexpected kernel argument {type(x)}")


def compile_launch(fn, args, meta, arch: int):
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    meta = dict(meta)
    opts = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    for i, (name, x) in enumerate(zip(names, args, strict=False)):
        if isinstance(x, int) and not isinstance(x, bool) and x == 1:
            sig[name], consts[name] = "constexpr", 1  # the launcher specializes ints equal to 1
            continue
        t, div = _type(x)
        sig[name] = t
        if div:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, v in meta.items():
        sig[name], consts[name] = "constexpr", v
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    return triton.compile(src, target=target, options=backend.parse_options(opts).__dict__)


def sass_report(cubin: bytes, top: int) -> tuple[str, int, collections.Counter]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([BIN / "nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    usage = " ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+)", res))
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if m and m.group(1) != "NOP":
            ops[m.group(1)] += 1
    return usage, sum(ops.values()), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4,4096,4096,16", help="b,d,L,n")
    ap.add_argument("--tiling", default="", help="ScanTiling fields, e.g. BD=16,T=4,split_bwd=1")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dump", default="", help="a folder: write each kernel's TTGIR and SASS there")
    a = ap.parse_args()
    b, d, L, n = map(int, a.shape.split(","))
    fields = dict(kv.split("=") for kv in a.tiling.split(",") if kv)
    tg = dataclasses.replace(scan_op.TILING["cuda"], **{k: int(v) for k, v in fields.items()})
    scan_op.TILING["cpu"] = tg  # meta tensors take the "cpu" entry
    log: list = []
    for mod, name in [(kern, "_scan_fwd_kernel"), (kern, "_combine_kernel"), (kern_bwd, "_scan_bwd_kernel"),
                      (kern_bwd, "_bwd_carry_kernel"), (kern_bwd2, "_scan_bwd2_kernel")]:  # fmt: skip
        setattr(mod, name, Capture(getattr(mod, name), log))
    m = dict(device="meta")
    u, delta, z = (torch.empty(b, d, L, dtype=torch.bfloat16, **m) for _ in range(3))
    B, C = (torch.empty(b, L, n, dtype=torch.bfloat16, **m).transpose(1, 2) for _ in range(2))
    A, D, bias = torch.empty(d, n, **m), torch.empty(d, **m), torch.empty(d, **m)
    y, hs, yp = scan_op._fwd(u, delta, A, B, C, D, z, bias, True)
    scan_op._bwd(torch.empty_like(y), u, delta, A, B, C, D, z, bias, hs, yp, True)
    print(f"shape b,d,L,n = {a.shape}; {tg}; sm_{a.arch}")
    seen = set()
    for fn, grid, args, meta in log:
        key = (fn.__name__, tuple(sorted((k, v) for k, v in meta.items())))
        if key in seen:
            continue
        seen.add(key)
        k = compile_launch(fn, args, meta, a.arch)
        usage, total, ops = sass_report(k.asm["cubin"], a.top)
        mode = f" MODE={meta['MODE']}" if "MODE" in meta else ""
        if a.dump:
            out = Path(a.dump) / f"{fn.__name__}{mode.replace(' MODE=', '_')}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".ttgir").write_text(k.asm["ttgir"])
            out.with_suffix(".cubin").write_bytes(k.asm["cubin"])
        print(f"\n{fn.__name__}{mode} grid {grid}: {usage}, {total} SASS instructions")
        print("  " + ", ".join(f"{op} {c}" for op, c in ops.most_common(a.top)))


if __name__ == "__main__":
    main()
