"""Entry point: `python -m train [overrides]`, alone or under torchrun / the deepspeed launcher.

python -m train model=debug optim.lr=1e-3
torchrun --standalone --nproc_per_node 2 -m train
deepspeed --num_gpus 8 --module train model=bench
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from .config import ConfigError, register

log = logging.getLogger("train")


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (Hydra would reject it); LOCAL_RANK carries it too."""
    out = []
    for a in argv:
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        else:
            out.append(a)
    return out


register()
# DeepSpeed's ZeRO calls a torch.distributed function that torch deprecated; nothing for a user to do.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> int:
    from data import DataError

    from . import distributed
    from .checkpoint import CheckpointError
    from .config import to_config

    try:
        cfg = to_config(dcfg)  # every range check, before anything starts
        dist = distributed.init(cfg.parallel)
        from .trainer import Trainer

        trainer = Trainer(cfg, dist)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except (ConfigError, CheckpointError, DataError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.argv = _strip_launcher_args(sys.argv)
    main()
