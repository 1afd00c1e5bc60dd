"""Checkpoint files for expert-parallel models, keyed by global expert id (DeepSpeed's MoE checkpoint layout
is for its own MoE layer and saves only rank 0's experts of ours: see docs/parallel.md).

In a checkpoint directory:
    experts_ep<r>.safetensors          EP position r's expert tensors (its slice of every expert tensor), written
                                       by the rank of EP position r with edp_rank 0. Metadata per tensor key:
                                       {"expert_offset", "num_local", "num_experts"} (global expert ids).
    portable/dense.safetensors         optional, topology-free optimizer state: for every dense parameter its
    portable/experts_ep<r>.safetensors full fp32 master `<name>` and Adam moments `<name>::exp_avg`,
                                       `<name>::exp_avg_sq` (ZeRO's fragments, gathered with DeepSpeed's
                                       safe_get_full_* API); experts per EP position as above. Metadata: the
                                       optimizer step (Adam bias correction).
Readers take from whichever files overlap their global expert range, so any EP size can read them.
All functions are collective over the world (every rank calls them, in the same order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .expert_parallel import EXPERT_PARAM_NAMES, _expert_modules
from .topology import EPPosition, Topology

EXPERTS_FILE = "experts_ep{}.safetensors"
PORTABLE_DIR = "portable"
DENSE_FILE = "dense.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_params(model: nn.Module, ep: EPPosition) -> dict[str, tuple[nn.Parameter, int, int, int]]:
    """Full name -> (param, expert_offset, num_local, num_global) for every expert tensor of this rank."""
    out = {}
    for mname, ex in _expert_modules(model).items():
        E = ex.num_experts * ep.size
        for pname in EXPERT_PARAM_NAMES:
            out[f"{mname}.{pname}" if mname else pname] = (
                getattr(ex, pname),
                ep.offset(E),
                ex.num_experts,
                E,
            )
    return out


def _save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"json": json.dumps(meta)},
    )


def _expert_meta(params: dict) -> dict:
    return {
        name: {"expert_offset": off, "num_local": n, "num_experts": E}
        for name, (_, off, n, E) in params.items()
    }


def save_local_experts(model: nn.Module, topo: Topology, ckpt: Path) -> None:
    """Write this EP position's expert tensors to experts_ep<r>.safetensors (edp_rank 0 only; no
    communication)."""
    params = expert_params(model, topo.ep)
    if not params or topo.ep.size == 1 or not topo.writes_experts:
        return  # without expert parallelism DeepSpeed's module file holds every expert
    _save(
        {k: p for k, (p, *_) in params.items()},
        {"experts": _expert_meta(params), "ep_size": topo.ep.size},
        Path(ckpt) / EXPERTS_FILE.format(topo.ep.rank),
    )


class ExpertReader:
    """Global-expert-id slices out of a set of per-EP-position files (any EP size)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        if not files:
            raise FileNotFoundError("no expert files")
        self.files = []
        for f in files:
            h = safe_open(str(f), framework="pt")
            self.files.append((f, h, json.loads(h.metadata()["json"])))

    def get(self, key: str, name: str, start: int, count: int) -> torch.Tensor:
        """Experts [start, start + count) of parameter `name`, stored under `key`."""
        parts, want = [], start
        for _f, h, meta in sorted(self.files, key=lambda t: t[2]["experts"][name]["expert_offset"]):
            m = meta["experts"][name]
            lo, hi = m["expert_offset"], m["expert_offset"] + m["num_local"]
            if lo <= want < hi and want < start + count:
                take = min(hi, start + count) - want
                parts.append(h.get_slice(key)[want - lo : want - lo + take])
                want += take
        if want != start + count:
            raise FileNotFoundError(
                f"{name}: experts {want}..{start + count - 1} are in none of "
                f"{[str(f.name) for f, *_ in self.files]}"
            )
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def expert_files(d: Path) -> list[Path]:
    return sorted(Path(d).glob(EXPERTS_FILE.format("*")))


def load_local_experts(model: nn.Module, ep: EPPosition, ckpt: Path) -> None:
    """Copy this rank's experts (by global id) from the experts_ep*.safetensors of `ckpt` into the model;
    the files may come from another EP size. No communication."""
    params = expert_params(model, ep)
    if not params:
        return
    reader = ExpertReader(expert_files(ckpt))
    with torch.no_grad():
        for name, (p, off, n, E) in params.items():
            saved = reader.files[0][2]["experts"][name]["num_experts"]
            if saved != E:
                raise ValueError(f"{name}: the checkpoint has {saved} experts, the model {E}")
            p.copy_(reader.get(name, name, off, n))


# ---- portable optimizer state (ZeRO-1/2 through DeepSpeed's safe_get/set_full_* API) -------------------


def _is_zero(opt) -> bool:
    return hasattr(opt, "single_partition_of_fp32_groups")


def _plain_state(opt, p: torch.nn.Parameter, k: str) -> torch.Tensor | None:
    """A moment of `p` held by a plain torch optimizer (ZeRO stage 0: the parameters are the fp32 masters)."""
    st = opt.state.get(p, {})
    return st[k].detach().float() if k in st else torch.zeros_like(p, dtype=torch.float32)


def _link(opt) -> None:
    # ZeRO links the optimizer-state fragments after the first param group's step, before torch AdamW has
    # state for the later (MoE) groups: re-link now (docs/parallel.md).
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _adam_step(opt) -> int:
    params = opt.single_partition_of_fp32_groups if _is_zero(opt) else list(opt.state)
    state = opt.optimizer.state if _is_zero(opt) else opt.state
    for p in params:
        st = state.get(p, {})
        if "step" in st:
            return int(st["step"])
    return 0


def save_portable(engine, topo: Topology, ckpt: Path) -> None:
    """Every parameter's full fp32 master and Adam moments: dense ones by rank 0, experts by edp_rank 0 of
    each EP position. Collective (the gathers reduce over each parameter's data-parallel group)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt, model = engine.optimizer, engine.module
    zero = _is_zero(opt)
    if zero:
        _link(opt)
    elif not isinstance(opt, torch.optim.Optimizer):
        raise RuntimeError(f"a portable checkpoint needs an Adam-type optimizer, not {type(opt).__name__}")
    experts = expert_params(model, topo.ep)
    dense, local = {}, {}
    for name, p in model.named_parameters():
        out = local if name in experts else dense
        out[name] = safe_get_full_fp32_param(p) if zero else p.detach().float()
        for k in MOMENTS:
            out[f"{name}::{k}"] = safe_get_full_optimizer_state(p, k) if zero else _plain_state(opt, p, k)
    missing = [k for k, v in {**dense, **local}.items() if v is None]
    if missing:
        raise RuntimeError(
            f"portable checkpoint: no optimizer state for {missing[:3]} (ZeRO stage 1/2 and "
            f"an Adam-type optimizer are needed)"
        )
    meta = {"step": _adam_step(opt)}
    out_dir = Path(ckpt) / PORTABLE_DIR
    if topo.is_main:
        _save(dense, meta, out_dir / DENSE_FILE)
    if experts and topo.writes_experts:
        _save(
            local,
            {**meta, "experts": _expert_meta(experts), "ep_size": topo.ep.size},
            out_dir / EXPERTS_FILE.format(topo.ep.rank),
        )


def has_portable(ckpt: Path) -> bool:
    return (Path(ckpt) / PORTABLE_DIR / DENSE_FILE).is_file()


def load_portable(engine, ep: EPPosition, ckpt: Path) -> int:
    """Weights, fp32 masters and Adam moments from the portable state of `ckpt`, on any world size and EP
    size; returns the optimizer step. Call on a fresh engine (before its first step). No communication."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    opt, model = engine.optimizer, engine.module
    d = Path(ckpt) / PORTABLE_DIR
    h = safe_open(str(d / DENSE_FILE), framework="pt")
    step = json.loads(h.metadata()["json"])["step"]
    experts = expert_params(model, ep)
    reader = ExpertReader(expert_files(d)) if experts else None
    if not _is_zero(opt):  # stage 0 (one rank): the parameters are the fp32 masters, the state is opt's
        _load_plain(opt, model, h, step, experts, reader)
        return step
    # torch AdamW creates its state lazily at the first step: create it (zeros, the saved step) so that
    # ZeRO can link every parameter's fragment to it.
    for p in opt.single_partition_of_fp32_groups:
        st = opt.optimizer.state[p]
        st["step"] = torch.tensor(float(step), dtype=torch.float32)
        for k in MOMENTS:
            st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    _link(opt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            get = _portable_getter(name, experts, h, reader)
            fp32 = get(name)
            p.copy_(fp32.to(p.dtype))
            safe_set_full_fp32_param(p, fp32.to(p.device))
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, get(f"{name}::{k}").to(p.device), k)
    return step


def _portable_getter(name: str, experts: dict, h, reader):
    """key -> tensor for one parameter of the portable state: an expert's rows come through `reader` (its slice
    of the global experts), everything else straight from the safetensors handle."""
    if name not in experts:
        return h.get_tensor
    _, off, n, _ = experts[name]
    return lambda key: reader.get(key, name, off, n)


def _load_plain(opt, model, h, step: int, experts: dict, reader) -> None:
    with torch.no_grad():
        for group in opt.param_groups:
            fused = bool(group.get("fused"))
            for p in group["params"]:
                opt.state[p] = {  # what torch AdamW's lazy init makes (fused keeps `step` on the device)
                    "step": torch.tensor(
                        float(step), dtype=torch.float32, device=p.device if fused else "cpu"
                    )
                }
        for name, p in model.named_parameters():
            get = _portable_getter(name, experts, h, reader)
            p.copy_(get(name).to(p.dtype))
            if p in opt.state:
                for k in MOMENTS:
                    opt.state[p][k] = get(f"{name}::{k}").to(p.device, p.dtype)
