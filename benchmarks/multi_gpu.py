"""The multi-GPU check of issue 8, in one command: run it on a machine with N GPUs of one host (NCCL).

python benchmarks/multi_gpu.py --out runs/multi_gpu            # N = every visible GPU
python benchmarks/multi_gpu.py --gpus 4 --out runs/mgpu4 --only equivalence,throughput
python benchmarks/multi_gpu.py --cpu --gpus 2 --out /tmp/mg    # the same orchestration on CPU (gloo), tiny

Steps (each in its own processes, with its own timeout; a failure is a row of the table, the rest goes on):
  1. equivalence: `torchrun -nproc N benchmarks/ep_equivalence.py`: a small fp32 Jamba, expert-parallel
     over the N ranks (EP=N), and data-parallel with every expert on every rank (EP=1), against the unsharded
     model on the concatenated batch (computed on every rank): loss, aux loss, every gradient, grad norm;
  2. throughput: the trainer (`torchrun ... -m train`) with `model=bench` on 1 GPU (EP=1) and on N GPUs (EP=N,
     ZeRO-2), the same micro-batch per GPU; median tokens/s and MFU of the steps after the warm-up; scaling
     efficiency = tokens/s per GPU on N / tokens/s on 1 (goal >= 90%);
  3. all-to-all share: the N-GPU run profiles its last step on rank 0 (`logging.profile_step`); the NCCL
     all-to-all (send/recv) kernels' time against the step's wall time;
  4. resume: N ranks (EP=N, portable checkpoints) save at step S; N/2 ranks (EP=N/2, gradient accumulation 2:
     the same global batch) resume from it; their losses against the uninterrupted N-rank run's.

Everything lands in --out: results.json (merged over invocations, so `--only` may split the work across
commands), multi_gpu.md (the table, also printed), logs/<run>.log, runs/<run>/ (metrics.jsonl, profile).
Children get NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 (NVLink multicast
off, always) and TORCH_CUDA_ARCH_LIST=9.0 unless set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from multi_gpu_report import environment, table  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from multi_gpu_runner import ROOT, Runner, child_env, fail_reason  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from launch.commands import standalone_torchrun  # noqa: E402 - after ROOT is on sys.path

STEPS = ("equivalence", "throughput", "resume")


def _metrics(run_dir: Path) -> list[dict]:
    from train.metrics import read_jsonl

    path = run_dir / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def _steps(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: float(r[key]) for r in records if key in r and "event" not in r}


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out, self.cpu, self.n = args, args.out, args.cpu, args.gpus
        self.runner = Runner(self.out, self.cpu)
        self.runs = self.out / "runs"

    # the trainer's overrides shared by every run
    def base(self, name: str, model: str, seq_len: int) -> list[str]:
        common = [
            f"run_dir={self.runs / name}",
            f"run_name={name}",
            "logging.interval=1",
            "logging.wandb.mode=disabled",
            "trainer.eval_interval=0",
            "trainer.eval_batches=1",
            "checkpoint.interval=0",
            "checkpoint.save_final=false",
            "parallel=zero2",
        ]
        if self.cpu:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny import TINY  # the tests' tiny model (tests/tiny.py)

            return [*TINY, *common, "parallel.device=cpu", "parallel.backend=gloo"]
        return [f"model={model}", *common, f"data.seq_len={seq_len}", "parallel.device=cuda"]

    def train(self, name: str, nproc: int, overrides: list[str], timeout: float) -> dict:
        shutil.rmtree(self.runs / name, ignore_errors=True)
        last = {o.split("=", 1)[0]: i for i, o in enumerate(overrides)}  # one value per key: the last given
        overrides = [o for i, o in enumerate(overrides) if last[o.split("=", 1)[0]] == i]
        res = self.runner.run(name, standalone_torchrun(nproc, "-m", "train", *overrides), timeout)
        res["records"] = _metrics(self.runs / name)
        return res

    def ep_for(self, world: int, model: str) -> int:
        from jamba import get_preset

        E = 4 if self.cpu else get_preset(model).num_experts  # TINY has 4 experts
        return math.gcd(world, E)

    # ---- 1 ----
    def equivalence(self) -> dict:
        n = self.n
        if n < 2:
            return {"status": "SKIP", "detail": "needs >= 2 ranks"}
        cmd = standalone_torchrun(
            n, str(Path(__file__).resolve().parent / "ep_equivalence.py"), "--out", str(self.out)
        )
        if self.cpu:
            cmd.append("--cpu")
        (self.out / "equivalence_worker.json").unlink(missing_ok=True)
        res = self.runner.run("equivalence", cmd, self.args.timeout_equivalence)
        path = self.out / "equivalence_worker.json"
        if not res["ok"] or not path.exists():
            return {"status": "FAIL", "detail": fail_reason(res), "seconds": res["seconds"]}
        w = json.loads(path.read_text())
        return {"status": "PASS" if w["pass"] else "FAIL", **w, "seconds": res["seconds"]}

    # ---- 2 and 3 ----
    def throughput(self) -> dict:
        a, n = self.args, self.n
        model = a.model
        ep = self.ep_for(n, model)
        steps, warm = a.steps, a.warmup
        out: dict = {"model": "debug (TINY)" if self.cpu else model, "gpus": n, "ep": ep, "attempts": []}
        mbs = [2] if self.cpu else a.micro_batch
        compiles = [a.compile] if a.compile == "none" or self.cpu else [a.compile, "none"]
        multi = single = None
        for compile_, mb in [(c, mb) for c in compiles for mb in mbs]:
            if out["attempts"] and out["attempts"][-1].get("give_up_compile") == compile_:
                continue  # this compile setting failed for another reason than memory
            extra = [] if self.cpu else [f"data.micro_batch_size={mb}", f"parallel.compile={compile_}"]
            attempt: dict = {"micro_batch": mb, "compile": compile_}
            out["attempts"].append(attempt)
            multi = single = None
            if n > 1:
                ov = [
                    *self.base(f"throughput_{n}gpu", model, a.seq_len),
                    *extra,
                    f"parallel.expert_parallel_size={ep}",
                    f"trainer.max_steps={steps}",
                    f"logging.profile_step={steps}",
                ]
                multi = self.train(f"throughput_{n}gpu", n, ov, a.timeout_run)
                attempt["multi"] = "ok" if multi["ok"] else fail_reason(multi)
                if not multi["ok"]:
                    if not multi["oom"]:
                        attempt["give_up_compile"] = compile_
                    continue
            ov = [
                *self.base("throughput_1gpu", model, a.seq_len),
                *extra,
                "parallel.expert_parallel_size=1",
                f"trainer.max_steps={steps}",
            ]
            single = self.train("throughput_1gpu", 1, ov, a.timeout_run)
            attempt["single"] = "ok" if single["ok"] else fail_reason(single)
            if single["ok"] or not single["oom"]:
                break
        attempt = out["attempts"][-1]
        if single is None:  # the N-GPU run failed every way: the 1-GPU figure is still worth having
            ov = [
                *self.base("throughput_1gpu", model, a.seq_len),
                *([] if self.cpu else [f"data.micro_batch_size={attempt['micro_batch']}"]),
                *([] if self.cpu else [f"parallel.compile={attempt['compile']}"]),
                "parallel.expert_parallel_size=1",
                f"trainer.max_steps={steps}",
            ]
            single = self.train("throughput_1gpu", 1, ov, a.timeout_run)
            attempt["single"] = "ok" if single["ok"] else fail_reason(single)
        out.update(
            micro_batch=attempt["micro_batch"],
            compile=attempt["compile"],
            seq_len=32 if self.cpu else a.seq_len,
        )

        def summary(res: dict | None, world: int, skip: set[int]) -> dict:
            if res is None:
                return {"status": "SKIP", "detail": "not run"}
            if not res["ok"]:
                return {"status": "FAIL", "detail": fail_reason(res)}
            recs = [r for r in res["records"] if "perf/tokens_per_s" in r and "event" not in r]
            use = [r for r in recs if r["step"] > warm and r["step"] not in skip] or recs[-1:]
            if not use:
                return {"status": "FAIL", "detail": "no perf records in metrics.jsonl"}
            tps = statistics.median(r["perf/tokens_per_s"] for r in use)
            mfu = [r["perf/mfu"] for r in use if "perf/mfu" in r]
            mem = [r.get("mem/peak_allocated_gb", r.get("mem/peak_rss_gb")) for r in use]
            mem = [m for m in mem if m is not None]
            return {
                "status": "OK",
                "steps_used": [r["step"] for r in use],
                "tokens_per_s": tps,
                "tokens_per_s_per_gpu": tps / world,
                "mfu": statistics.median(mfu) if mfu else None,
                "step_time_s": statistics.median(r["perf/step_time_s"] for r in use),
                "peak_mem_gb": max(mem) if mem else None,
                "final_loss": use[-1].get("train/loss"),
            }

        out["single"] = summary(single, 1, set())
        out["multi"] = summary(multi, n, {steps})
        s, m = out["single"], out["multi"]
        if s["status"] == "OK" and m["status"] == "OK":
            out["scaling_efficiency"] = m["tokens_per_s_per_gpu"] / s["tokens_per_s"]
        # 3: the all-to-all share of the profiled step
        trace = self.runs / f"throughput_{n}gpu" / f"profile_step{steps}.json"
        if n < 2:
            out["profile"] = {"status": "SKIP", "detail": "no all-to-all on one GPU"}
        elif trace.exists():
            from train.profiling import collective_share

            out["profile"] = {
                "status": "OK",
                "step": steps,
                "trace": str(trace.relative_to(self.out)),
                **collective_share(trace),
            }
        else:
            out["profile"] = {
                "status": "FAIL",
                "detail": f"no {trace.name} ({m.get('detail', 'run failed')})",
            }
        return out

    # ---- 4 ----
    def resume(self) -> dict:
        a, n = self.args, self.n
        if n < 2 or n % 2:
            return {"status": "SKIP", "detail": f"needs an even number of ranks, got {n}"}
        model, half = a.resume_model, n // 2
        S, M = (2, 2) if self.cpu else (a.resume_save_at, a.resume_steps)
        ep_n, ep_h = self.ep_for(n, model), self.ep_for(half, model)
        common = ["checkpoint.portable=true", f"trainer.max_steps={S + M}"]
        if not self.cpu:
            common += [
                f"data.micro_batch_size={a.resume_micro_batch}",
                "parallel.precision=fp32",
                "parallel.compile=none",
            ]
        ref = self.train(
            f"resume_ref_{n}gpu",
            n,
            [
                *self.base(f"resume_ref_{n}gpu", model, a.resume_seq_len),
                *common,
                f"parallel.expert_parallel_size={ep_n}",
                f"checkpoint.interval={S}",
            ],
            a.timeout_run,
        )
        out = {
            "model": "debug (TINY)" if self.cpu else model,
            "save_at": S,
            "ep": [ep_n, ep_h],
            "ranks": [n, half],
        }
        ckpt = self.runs / f"resume_ref_{n}gpu" / "checkpoints" / f"step_{S:08d}"
        if not ref["ok"] or not (ckpt / "portable").is_dir():
            return {
                **out,
                "status": "FAIL",
                "detail": f"{n}-rank run: "
                + (fail_reason(ref) if not ref["ok"] else f"no portable checkpoint {ckpt}"),
            }
        got = self.train(
            f"resume_{half}gpu",
            half,
            [
                *self.base(f"resume_{half}gpu", model, a.resume_seq_len),
                *common,
                f"parallel.expert_parallel_size={ep_h}",
                "trainer.grad_accum_steps=2",
                f"resume={ckpt}",
            ],
            a.timeout_run,
        )
        if not got["ok"]:
            return {**out, "status": "FAIL", "detail": f"{half}-rank resume: {fail_reason(got)}"}
        want, have = _steps(ref["records"], "train/loss"), _steps(got["records"], "train/loss")
        want_lm, have_lm = _steps(ref["records"], "train/lm_loss"), _steps(got["records"], "train/lm_loss")
        compare = list(range(S + 1, S + M + 1))
        if sorted(have) != compare or not all(s in want for s in compare):
            return {
                **out,
                "status": "FAIL",
                "detail": f"steps logged after the resume {sorted(have)}, want {compare}",
            }
        diff = max(abs(have[s] - want[s]) for s in compare)
        diff_lm = max(abs(have_lm[s] - want_lm[s]) for s in compare if s in have_lm and s in want_lm)
        tol = 1e-5 if self.cpu else a.resume_tol
        return {
            **out,
            "status": "PASS" if diff <= tol else "FAIL",
            "steps": compare,
            "loss_ref": [want[s] for s in compare],
            "loss_resumed": [have[s] for s in compare],
            "max_abs_diff": diff,
            "max_abs_diff_lm": diff_lm,
            "tol": tol,
            "portable_state_used": "portable state" in got["text"],
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="N (default: every visible GPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "multi_gpu")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU, tiny model: tests the orchestration")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--model", default="bench", help="throughput preset")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", default="4,2", help="per GPU; the next one after an out-of-memory")
    ap.add_argument("--compile", default="auto", choices=["auto", "layers", "none"])
    ap.add_argument("--steps", type=int, default=None, help="throughput steps (default 20; CPU 5)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="steps left out of the median (default 5; CPU 1)"
    )
    ap.add_argument("--resume-model", default="bench-426m")
    ap.add_argument("--resume-seq-len", type=int, default=1024)
    ap.add_argument("--resume-micro-batch", type=int, default=2)
    ap.add_argument("--resume-save-at", type=int, default=3)
    ap.add_argument("--resume-steps", type=int, default=2, help="steps compared after the resume (< save-at)")
    ap.add_argument("--resume-tol", type=float, default=1e-3, help="max abs loss difference on GPU (fp32)")
    ap.add_argument("--timeout-equivalence", type=float, default=None, help="seconds (default 600; CPU 180)")
    ap.add_argument(
        "--timeout-run", type=float, default=None, help="seconds per trainer launch (default 900; CPU 240)"
    )
    args = ap.parse_args()
    args.out = args.out.absolute()
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if args.gpus is None:
        args.gpus = 2 if args.cpu else torch.cuda.device_count()
    if not args.cpu and (args.gpus < 1 or args.gpus > torch.cuda.device_count()):
        ap.error(
            f"--gpus {args.gpus}: {torch.cuda.device_count()} CUDA GPUs visible (use --cpu to try on CPU)"
        )
    args.micro_batch = [int(x) for x in str(args.micro_batch).split(",") if x]
    args.steps = args.steps or (5 if args.cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 5)
    args.timeout_equivalence = args.timeout_equivalence or (180 if args.cpu else 600)
    args.timeout_run = args.timeout_run or (240 if args.cpu else 900)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := [s for s in only if s not in STEPS]:
        ap.error(f"--only: unknown {bad}; choose from {STEPS}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("gpus") not in (None, args.gpus) or results.get("cpu", args.cpu) != args.cpu:
        results = {}  # another layout: start over
    results.update(gpus=args.gpus, cpu=args.cpu, environment=environment(args.cpu, args.gpus, child_env()))
    commands = {c["name"]: c for c in results.get("commands", [])}
    check = Check(args)
    if any(s in only for s in ("throughput", "resume")):
        from data import DataConfig, ensure_builtin_corpus

        t0 = time.monotonic()
        ensure_builtin_corpus(str(ROOT / DataConfig().path))  # once, before any timed launch
        print(f"[multi_gpu] built-in corpus ready ({time.monotonic() - t0:.0f} s)", flush=True)
    for step in only:
        t0 = time.monotonic()
        try:
            results[step] = getattr(check, step)()
        except Exception as e:  # noqa: BLE001 - a bug in one step must not lose the others
            results[step] = {"status": "FAIL", "detail": f"{type(e).__name__}: {e}"}
        results[step]["wall_s"] = round(time.monotonic() - t0, 1)
        commands.update({c["name"]: c for c in check.runner.commands})
        results["commands"] = list(commands.values())
        results_path.write_text(json.dumps(results, indent=1, default=str))
        (args.out / "multi_gpu.md").write_text(table(results))
    md = table(results)
    (args.out / "multi_gpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
