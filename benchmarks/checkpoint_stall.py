"""How long one checkpoint save stops training: the old synchronous path vs the background writer.

One rank, the trainer's own model, optimizer and DeepSpeed engine (one step taken, so Adam's moments exist).
`sync`: what train/ did before: DeepSpeed's torch.save of its files (module weights + optimizer) and then
model_state.safetensors, all before training goes on (stall = write). `async`: Checkpointer.start (the
stall: host copies, pinned on a GPU) then the background write (write_s); the second async save reuses the
pinned buffers. Before the first async save, as the trainer does after its first step, Checkpointer.prepare
pins the buffers in a background thread while training steps run (their time is printed beside the steps'
time without it); `--no-prepare`: the first save pins its own buffers (the stall before this change).
Prints a Markdown table.

    python benchmarks/checkpoint_stall.py                            # CPU, a larger debug model
    python benchmarks/checkpoint_stall.py --preset bench --out /tmp/ckpt-bench   # one GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CPU_MODEL = ["model.hidden_size=512", "model.intermediate_size=1024", "model.num_hidden_layers=8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--out", default="/tmp/checkpoint_stall")
    ap.add_argument("--no-prepare", action="store_true", help="no pinning ahead: the first save pins")
    ap.add_argument("--no-sync", action="store_true", help="leave out the old synchronous save (its minute)")
    ap.add_argument("--saves", type=int, default=2, help="async saves: the first, then ones reusing buffers")
    ap.add_argument(
        "overrides", nargs="*", help="more train overrides (default on CPU: a larger debug model)"
    )
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import save_file

    from parallel.config import resolve_precision
    from train import distributed
    from train.build import build_data, build_engine, build_model, consolidated_state_dict
    from train.checkpoint import Checkpointer
    from train.config import register, to_config

    register()
    extra = args.overrides or (CPU_MODEL if args.preset == "debug" else [])
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        dcfg = compose(
            "config", [f"model={args.preset}", "data.micro_batch_size=1", "data.seq_len=128", *extra]
        )
    cfg = to_config(dcfg)
    dist = distributed.init(cfg.parallel)
    train_data, _ = build_data(cfg.data, dist)
    _, model = build_model(
        cfg, train_data.vocab_size, None, dist.device, resolve_precision(cfg.parallel.precision, dist.device)
    )
    engine, _ = build_engine(model, cfg, dist, resolve_precision(cfg.parallel.precision, dist.device))
    x, y = next(iter(train_data))
    x, y = x.to(dist.device), y.to(dist.device)

    def step() -> float:
        t = time.perf_counter()
        engine.backward(engine(x, labels=y).loss)
        engine.step()
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    state = {"step": 1, "model_config": {}, "config": {}, "world_size": 1}
    rows = []

    def size(d: Path) -> float:
        return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e9

    if not args.no_sync:  # the old path: DeepSpeed's own torch.save engine, then the safetensors weights
        t0 = time.perf_counter()
        engine.save_checkpoint(str(out / "sync"), tag="step_00000001", save_latest=False)
        weights = consolidated_state_dict(engine.module, dist)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            str(out / "sync" / "w.safetensors"),
        )
        stall = time.perf_counter() - t0
        rows.append(("sync (before)", stall, stall, size(out / "sync")))
        shutil.rmtree(out / "sync")

    ck = Checkpointer(cfg.checkpoint.__class__(dir=str(out / "async")), dist)
    ck.install_safe_loading(engine)
    host, overlap = ck.snapshot.host, ""
    if not args.no_prepare and ck.pins:
        alone = [step() for _ in range(3)]
        t0 = time.perf_counter()
        ck.prepare(engine, consolidated_state_dict(engine.module, dist))
        during = []
        while host.preparing is not None and host.preparing.is_alive():
            during.append(step())
        host.ready()
        overlap = (
            f"buffers pinned ahead in {time.perf_counter() - t0:.2f}s in the background "
            f"({host.prepared_s:.2f}s in the thread, {len(host.arena) / 1e9:.2f} GB); train steps meanwhile: "
            f"{len(during)}, {sum(during) / max(1, len(during)):.3f}s each (alone: {sum(alone) / 3:.3f}s)"
        )
    first = "async, first save" + (" (pinned ahead)" if ck.pins and not args.no_prepare else "")
    names = [first] + ["async, next save (buffers reused)"] * (args.saves - 1)
    for i, name in enumerate(names):
        ck.start(engine, i + 1, state, consolidated_state_dict(engine.module, dist))
        stall = ck.stall_s
        figures = ck.wait()
        rows.append((name, stall, figures["checkpoint/write_s"], figures["checkpoint/bytes"] / 1e9))
    shutil.rmtree(out, ignore_errors=True)

    n = sum(p.numel() for p in engine.module.parameters())
    print(f"\n{args.preset} ({n / 1e6:.1f}M parameters) on {dist.device}, torch {torch.__version__}\n")
    if overlap:
        print(overlap + "\n")
    print("| save | training stalls (s) | written in (s) | GB written |")
    print("| --- | ---: | ---: | ---: |")
    for name, stall, write_s, gb in rows:
        print(f"| {name} | {stall:.2f} | {write_s:.2f} | {gb:.2f} |")
    print(json.dumps({name: {"stall_s": s, "write_s": w, "gb": g} for name, s, w, g in rows}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
