"""How a built model runs, apart from its weights: kernel backends and chunk sizes.

These are not JambaConfig fields (model_config.json describes the weights; a knob saved there came back on
eval and export): the trainer keeps them in its `runtime` config group and the model takes them when it is
built. The backends are resolved once, for the device and matmul dtype the run uses, and recorded in
`model.backends`; nothing re-decides per call. Older model_config.json files that still hold these keys load
with the keys ignored (JambaConfig.from_dict says so).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import scan
from .experts import EXPERTS_BACKENDS, Experts, resolve_experts_backend

log = logging.getLogger("jamba.runtime")
CONV_BACKENDS = ("auto", "causal_conv1d", "triton", "torch")


@dataclass
class Runtime:
    # False: every `auto` below takes the PyTorch reference (an explicit backend is still honoured)
    use_kernels: bool = True
    # selective scan: auto (on a GPU the fastest available, measured; PyTorch elsewhere) | triton (ours) |
    # mamba_ssm | torch
    scan_backend: str = "auto"
    # causal conv: auto (causal-conv1d on a GPU, our Triton conv under deterministic algorithms) |
    # causal_conv1d | triton | torch
    conv_backend: str = "auto"
    # MoE experts: auto (grouped_mm on a GPU, else grouped_gemm, else loop; loop on CPU) | grouped_mm |
    # grouped_gemm | loop | megablocks (jamba/experts.py)
    experts_backend: str = "auto"
    scan_chunk_size: int = 16  # chunk length of the CPU selective scan
    # tokens per block of the PyTorch scan (no mamba-ssm): bounds its [b, block, d_inner, d_state] fp32 tensors
    scan_block_size: int = 512
    loss_chunk_size: int = 4096  # tokens per chunk of the cross-entropy (never full-vocab logits for all)
    # Tokens per feed-forward chunk when training (0: all at once). Long contexts: the MoE's [tokens*k, 2F]
    # intermediates of one chunk live at a time (each chunk is recomputed in backward). Exact.
    ff_chunk_size: int = 0

    def validate(self) -> None:
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"runtime.{fld}: {msg}")

        for fld, choices in (
            ("scan_backend", scan.SCAN_BACKENDS),
            ("conv_backend", CONV_BACKENDS),
            ("experts_backend", EXPERTS_BACKENDS),
        ):
            v = getattr(self, fld)
            need(v in choices, fld, f"must be {'|'.join(choices)}, got {v!r}")
        for fld in ("scan_chunk_size", "scan_block_size", "loss_chunk_size"):
            v = getattr(self, fld)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                fld,
                f"must be a positive int, got {v!r}",
            )
        v = self.ff_chunk_size
        need(
            isinstance(v, int) and v >= 0, "ff_chunk_size", f"must be an int >= 0 (0: no chunking), got {v!r}"
        )

    def replace(self, **changes) -> Runtime:
        return dataclasses.replace(self, **changes)


RUNTIME_KEYS = tuple(f.name for f in dataclasses.fields(Runtime))


@dataclass(frozen=True)
class Backends:
    """What a model runs, resolved once; `notes` say why an `auto` choice fell back (logged)."""

    device: str
    scan: str
    conv: str
    experts: str
    notes: tuple[str, ...] = ()
    ssd: str | None = None  # Mamba-2's SSD scan, when the model has Mamba-2 layers

    def describe(self) -> str:
        ssd = f", Mamba-2 SSD {self.ssd}" if self.ssd else ""
        return (
            f"selective scan {self.scan}{ssd}, causal conv {self.conv}, experts {self.experts} "
            f"(on {self.device})"
        )


def default_target() -> tuple[str, torch.dtype]:
    """(device type, matmul dtype) for a model built outside the trainer: the GPU in bf16 if there is one."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def _conv(name: str, device_type: str, use_kernels: bool) -> str:
    if name == "auto":
        return scan.conv_backend(device_type, use_kernels)
    problem = None
    if name == "causal_conv1d":
        if scan._cc1d is None or device_type != "cuda":
            problem = "needs the causal-conv1d package and a CUDA device"
        elif torch.are_deterministic_algorithms_enabled():
            problem = "its weight gradient is not deterministic (deterministic algorithms are on): use triton"
    elif name == "triton" and (
        scan._triton_conv() is None or (device_type != "cuda" and not scan._INTERPRET)
    ):
        problem = "needs triton and a CUDA device (on CPU only under TRITON_INTERPRET=1)"
    if problem:
        raise ValueError(f"runtime.conv_backend={name}: {problem}")
    return name


def resolve_backends(
    rt: Runtime, device_type: str, dtype: torch.dtype, hidden: int = 16, ffn: int = 16, has_moe: bool = True
) -> Backends:
    """The backends for `device_type` with matmuls in `dtype`; an explicit one that cannot run is a
    ValueError naming why."""
    rt.validate()
    kern = rt.use_kernels
    scan_name = scan.resolve_scan_backend(
        rt.scan_backend if kern or rt.scan_backend != "auto" else "torch", device_type
    )
    conv = _conv(rt.conv_backend, device_type, kern)
    notes: list[str] = []
    experts = "loop"
    if has_moe:
        want = rt.experts_backend if kern or rt.experts_backend != "auto" else "loop"
        try:
            experts, note = resolve_experts_backend(want, device_type, dtype, hidden, ffn)
        except ValueError as e:
            raise ValueError(f"runtime.{e}") from None
        if note:
            notes.append(f"experts: {note}")
    return Backends(device_type, scan_name, conv, experts, tuple(notes))


def apply_runtime(
    model: nn.Module, rt: Runtime, device_type: str | None = None, dtype: torch.dtype | None = None
) -> Backends:
    """Resolve the backends once and hand them and the chunk sizes to every module of `model` (a
    JambaForCausalLM). Logs each fallback. Returns what was chosen (also kept as `model.backends`)."""
    if device_type is None or dtype is None:
        device_type, dtype = default_target()
    cfg = model.config
    b = resolve_backends(
        rt, device_type, dtype, cfg.hidden_size, cfg.intermediate_size, any(cfg.layers_is_moe)
    )
    for note in b.notes:
        log.warning("%s", note)
    ssd = set()
    for m in model.modules():
        if hasattr(m, "set_backends"):  # mixers that pick kernels of their own from the run's (Mamba-2)
            ssd.add(m.set_backends(b, rt))
        elif hasattr(m, "scan_backend"):  # Mamba-1 mixers
            m.scan_backend, m.conv_backend = b.scan, b.conv
            m.use_kernels = b.scan != "torch"
            m.scan_chunk, m.scan_block = rt.scan_chunk_size, rt.scan_block_size
        if isinstance(m, Experts):
            m.backend = b.experts
        if hasattr(m, "chunk"):  # feed-forwards (dense and MoE)
            m.chunk = rt.ff_chunk_size
    if ssd:
        b = dataclasses.replace(b, ssd="/".join(sorted(ssd)))
    model.loss_chunk_size = rt.loss_chunk_size
    model.runtime, model.backends = rt, b
    return b
