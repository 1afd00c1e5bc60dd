"""Expert parallelism equals the unsharded model, on the ranks of one `torchrun` (NCCL on GPUs, gloo with --cpu).

    torchrun --standalone --nproc_per_node N benchmarks/ep_equivalence.py --out DIR [--cpu]

A small fp32 Jamba (2N experts; mamba-ssm / causal-conv1d where importable, TF32 off) expert-parallel over the
N ranks (EP=N), and data-parallel with every expert on every rank (EP=1, world-scope router statistics), against
one unsharded model on the N micro-batches concatenated (computed on every rank): max relative (norm-wise)
error of the loss, aux loss, dense gradients, all-gathered expert gradients and global grad norm. PASS at
<= 1e-4. Rank 0 writes DIR/equivalence_worker.json (read by benchmarks/multi_gpu.py) and prints the errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EQUIV_TOL = 1e-4  # relative (norm-wise), fp32


def _rel(a, b) -> float:
    import torch

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-30))


def run(out: Path, cpu: bool) -> None:
    import torch
    import torch.distributed as dist

    from jamba import JambaConfig, JambaForCausalLM
    from jamba.runtime import Runtime
    from parallel.data_parallel import allreduce_gradients
    from parallel.expert_parallel import apply_expert_parallel, gather_expert_grads, is_expert_param
    from parallel.grad_norm import global_grad_norm
    from parallel.topology import make_topology

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if cpu else torch.device("cuda", local)
    if not cpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (cuDNN's conv default is TF32)
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    E = 2 * world  # every EP size divides it
    cfg = JambaConfig(
        vocab_size=256,
        hidden_size=32 if cpu else 128,
        intermediate_size=48 if cpu else 256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=E,
        num_experts_per_tok=2,
        layer_pattern="M ME * *E",
        mamba_d_state=8 if cpu else 16,
        router_aux_loss_coef=0.05,
        router_z_loss_coef=0.01,
    )
    # mamba-ssm / causal-conv1d where importable; fp32 matmuls (the experts' backend chosen for them)
    rt = Runtime(use_kernels=not cpu, scan_chunk_size=8)
    dev_type = "cpu" if cpu else "cuda"
    seq = 12 if cpu else 256

    def batch(r: int):
        g = torch.Generator().manual_seed(1000 + r)
        x = torch.randint(0, cfg.vocab_size, (2, seq + 1), generator=g)
        return x[:, :-1].to(device), x[:, 1:].to(device)

    # the reference: one unsharded model on every rank's batch concatenated (one router-statistics group)
    ref = JambaForCausalLM(cfg, seed=0, runtime=rt, device_type=dev_type, dtype=torch.float32).to(device)
    xs, ys = zip(*(batch(r) for r in range(world)), strict=True)
    r_out = ref(torch.cat(xs), labels=torch.cat(ys))
    r_out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in ref_grads.values()]))

    results = {}
    for ep, scope in ((world, "ep"), (1, "world")):
        groups = make_topology(ep, device)
        model = JambaForCausalLM(cfg, seed=0, runtime=rt, device_type=dev_type, dtype=torch.float32)
        apply_expert_parallel(model, groups, stats_scope=scope)
        model.to(device)
        x, y = batch(rank)
        t0 = time.perf_counter()
        o = model(x, labels=y)
        o.loss.backward()
        allreduce_gradients(model.parameters(), groups)
        loss = o.loss.detach().clone()
        dist.all_reduce(loss)
        experts = gather_expert_grads(model, groups)
        dense = expert = 0.0
        for n, p in model.named_parameters():
            if n in experts:
                expert = max(expert, _rel(experts[n], ref_grads[n]))
            else:
                dense = max(dense, _rel(p.grad, ref_grads[n]))
        norm = global_grad_norm(model.parameters(), ep_group=groups.ep_group)
        aux = torch.tensor([_rel(o.aux_loss, r_out.aux_loss)], dtype=torch.float64, device=device)
        dist.all_reduce(aux, op=dist.ReduceOp.MAX)  # every rank's aux equals the reference's
        errs = {
            "loss": _rel(loss / world, r_out.loss),
            "aux_loss": float(aux),
            "dense_grads": dense,
            "expert_grads": expert,
            "grad_norm": _rel(norm, ref_norm),
        }
        results[f"ep{ep}"] = {
            "ep": ep,
            "stats_scope": scope,
            "local_expert_params": sum(1 for p in model.parameters() if is_expert_param(p)),
            "max_rel_err": errs,
            "worst": max(errs.values()),
            "pass": all(math.isfinite(v) and v <= EQUIV_TOL for v in errs.values()),
            "step_s": time.perf_counter() - t0,
        }
        if rank == 0:
            print(
                f"equivalence EP={ep} (stats over {scope}): "
                + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
            )
    if rank == 0:
        res = {
            "world": world,
            "num_experts": E,
            "device": str(device),
            "tol": EQUIV_TOL,
            "cases": results,
            "pass": all(c["pass"] for c in results.values()),
        }
        print("EQUIVALENCE", "PASS" if res["pass"] else "FAIL")
        (out / "equivalence_worker.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU, a tinier model")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run(a.out.absolute(), a.cpu)


if __name__ == "__main__":
    main()
