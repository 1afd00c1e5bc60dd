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
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import ConfigError, env_rank, register, to_config
from .config_check import describe
from .console import setup_console

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


def _config_error(msg: str) -> None:
    """A config error: one line, from rank 0 only (every rank finds the same), exit 2."""
    if env_rank() == 0:
        print(f"ConfigError: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Compose and validate the overrides as Hydra will, before Hydra creates, writes or logs anything: a
    bad one ends here with one line and exit 2. Hydra's own flags (--cfg, --help, -m) are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            dcfg = compose(config_name="config", overrides=argv)
        to_config(dcfg)
    except (HydraException, OmegaConfBaseException) as e:
        _config_error(describe(e))
    except ConfigError as e:
        _config_error(str(e))


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register()
# DeepSpeed's ZeRO calls a torch.distributed function that torch deprecated; nothing for a user to do.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> int:
    from data import DataError

    from . import distributed
    from .checkpoint_layout import CheckpointError
    from .rundir import RunLock, RunLockError, buffer_log, record_job
    from .signals import exit_with_launcher

    lock, buf = None, None
    setup_console(env_rank())  # rank 0 speaks; warnings once; no DeepSpeed chatter
    try:
        cfg = to_config(dcfg)  # every range check, before anything starts
        exit_with_launcher()
        if env_rank() == 0:  # nothing of the run directory is touched before this
            lock = RunLock(cfg.run_dir).acquire()
            buf = buffer_log()  # train.log is written once the run is known to start
        dist = distributed.init(cfg.parallel)
        from .trainer import Trainer

        trainer = Trainer(cfg, dist)
        try:
            if dist.is_main:
                record_job(Path(cfg.run_dir).absolute(), dcfg, buf)
            trainer.fit()
        finally:
            trainer.close()
    except ConfigError as e:
        _config_error(str(e))
    except (CheckpointError, DataError, RunLockError) as e:
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    finally:
        if lock is not None:
            lock.release()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.argv = _strip_launcher_args(sys.argv)
    from .show import handle_flags

    handle_flags(sys.argv[1:])  # --cfg job, --help: print and exit
    check_overrides(sys.argv[1:])
    main()
