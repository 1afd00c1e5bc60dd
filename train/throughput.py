"""The hardware peak for MFU (FLOPs per token: jamba.counting), and memory in use."""

from __future__ import annotations

import logging
import resource
import time

import torch

log = logging.getLogger("train.throughput")

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets, SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def measured_cpu_flops(n: int = 512, reps: int = 8) -> float:
    """This process's fp32 GEMM throughput (its torch threads): the CPU "peak" MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, a known GPU's data-sheet bf16 peak, or on CPU the
    measured fp32 GEMM rate (so CPU MFU reads "fraction of what a large matmul gets here")."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return measured_cpu_flops()
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    log.warning("unknown GPU %r: no MFU (set logging.peak_tflops)", name)
    return None


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "mem/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "mem/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
        }
    return {"mem/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
