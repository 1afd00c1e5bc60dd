"""Loss and perplexity of a checkpoint on a validation split: `python -m train.eval <checkpoint> [options]`.

<checkpoint> is a step_* directory or a checkpoint root (then its latest complete checkpoint). The model
comes from its model_config.json + model_state.safetensors (no pickled code is run); the data defaults to
the split the run validated on. One process; prints a JSON line. Nothing in the checkpoint is run: a
remote `data.path` (a URL or a `pipe:` command) recorded there is never used; give --data for one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import torch

from data import DataConfig, DataError, TokenLoader
from data.manifest import is_local
from jamba import JambaForCausalLM

from .checkpoint_layout import CheckpointError, read_state, resolve
from .progress import progress
from .weights import load_model  # noqa: F401 - this module's interface (probe, recall, tests)

log = logging.getLogger("train.eval")


def run_data_path(state: dict, given: str | None) -> str:
    """The corpus to read: `given` (the caller's own argument), else the checkpoint's data.path if it is a
    local path. A URL or `pipe:` command from a checkpoint is never used: whoever wrote the file would
    choose what runs here."""
    if given:
        return given
    data = state.get("config", {}).get("data", {})
    mixture = data.get("mixture") or []  # a mixture run validates on its first corpus
    path = mixture[0].get("path") if mixture and isinstance(mixture[0], dict) else data.get("path")
    if not isinstance(path, str) or not path:
        raise CheckpointError("the checkpoint names no data.path; give --data")
    if not is_local(path) or path.startswith("file:"):
        raise CheckpointError(
            f"the checkpoint's data.path {path[:200]!r} is not a local directory; a URL or pipe: command "
            f"from a checkpoint is never used: give --data"
        )
    return path


@torch.no_grad()
def loss_sums(
    forward, batches, max_batches: int, device: torch.device, tick=None
) -> tuple[float, int, int, bool]:
    """(summed token loss, tokens, batches, whether batches were left at max_batches) of
    `forward(x, labels=y)` (a model or the trainer's engine) over at most `max_batches` batches (0: all of
    them); `tick()` after each batch (progress). The trainer sums these over its ranks."""
    total, n_tok, n_batches = 0.0, 0, 0
    for x, y in batches:
        if max_batches and n_batches >= max_batches:
            return total, n_tok, n_batches, True
        out = forward(x.to(device), labels=y.to(device))
        n = int((y != -100).sum())
        total, n_tok, n_batches = total + float(out.lm_loss) * n, n_tok + n, n_batches + 1
        if tick is not None:
            tick()
    return total, n_tok, n_batches, False


def evaluate(model: JambaForCausalLM, loader: TokenLoader, max_batches: int, device: torch.device) -> dict:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with progress(f"evaluating {loader.split}", total=max_batches or None, logger=log) as tick, autocast:
        total, n_tok, n_batches, _ = loss_sums(model, loader, max_batches, device, tick)
    if n_tok == 0:
        raise DataError("the validation split gave no batches")
    loss = total / n_tok
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n_tok, "batches": n_batches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint")
    p.add_argument("--data", help="prepared corpus (default: the run's data.path, or its mixture's first)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--seq-len", type=int, help="default: the run's data.seq_len")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument(
        "--batches", type=int, default=0, help="at most this many batches (0: the whole val split)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ckpt = resolve(a.checkpoint)
        state = read_state(ckpt)
        run_data = state["config"]["data"]
        dcfg = DataConfig(
            path=run_data_path(state, a.data),
            seq_len=a.seq_len or run_data["seq_len"],
            micro_batch_size=a.micro_batch_size,
        )
        if a.split == "train" and not a.batches:
            raise ValueError("--split train is infinite: give --batches")
        device = torch.device(a.device)
        model = load_model(ckpt, device)
        loader = TokenLoader(dcfg, split=a.split)
        if loader.vocab_size > model.config.vocab_size:
            raise DataError(
                f"{dcfg.path} has {loader.vocab_size} token ids, the model {model.config.vocab_size}"
            )
        result = evaluate(model, loader, a.batches, device)
    except (CheckpointError, DataError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(
        json.dumps(
            {
                "checkpoint": str(ckpt),
                "step": state["step"],
                "data": dcfg.path,
                "split": a.split,
                "seq_len": dcfg.seq_len,
                **result,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
