"""Entry point: `python -m train [overrides]`, alone or under torchrun / the deepspeed launcher.

python -m train model=debug optim.lr=1e-3
torchrun --standalone --nproc_per_node 2 -m train
deepspeed --num_gpus 8 --module train model=bench
"""

from __future__ import annotations

from .signals import STOP

if __name__ == "__main__":  # first: a stop signal during start-up is a request to stop, not a crash
    STOP.install()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from . import outcome  # noqa: E402
from .config import ConfigError, env_rank, register, to_config  # noqa: E402
from .config_check import describe  # noqa: E402
from .console import setup_console  # noqa: E402

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
    _fail(f"ConfigError: {msg}", every_rank_finds_it=True)


def _fail(line: str, every_rank_finds_it: bool) -> None:
    """One line for a failure, exit 2: from rank 0 when every rank finds the same error, else from the
    first rank to record it (a data error may be one rank's alone; its peers then lose it and stay quiet)."""
    first = outcome.write(outcome.FAILED, line) if not every_rank_finds_it or env_rank() == 0 else False
    if first:
        for h in logging.getLogger().handlers:  # train.log, once the attempt was underway
            if isinstance(h, logging.FileHandler):
                h.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None))
        if not outcome.recorded():  # else our launcher prints it, last
            print(line, file=sys.stderr, flush=True)
    sys.exit(2)


# what a collective raises when another rank is gone (gloo raises a plain RuntimeError)
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator")


def lost_peer(e: BaseException) -> bool:
    from torch.distributed import DistError

    return isinstance(e, DistError) or any(s in str(e) for s in LOST_PEER)


def _stopped(line: str) -> None:
    """A handled stop signal: rank 0 says where the run stopped; every rank exits 0."""
    if env_rank() == 0:
        log.warning("%s", line)
        outcome.write(outcome.STOPPED, line)


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
    from torch.distributed import DistError

    from data import DataError

    from .checkpoint import CheckpointError
    from .rundir import RunLock, RunLockError

    lock, phase = None, {"training": False}
    setup_console(env_rank())  # rank 0 speaks; warnings once; no DeepSpeed chatter
    try:
        cfg = to_config(dcfg)  # every range check, before anything starts
        if STOP.signalled and "LOCAL_RANK" not in os.environ:
            return _stopped(f"stopped by {STOP.name()} during start-up: nothing was written")
        if env_rank() == 0:  # nothing of the run directory is touched before this
            lock = RunLock(cfg.run_dir).acquire()
            STOP.abort_hooks.append(lock.release)
        train(cfg, dcfg, phase)
    except ConfigError as e:
        _config_error(str(e))
    except (CheckpointError, RunLockError) as e:
        _fail(f"{type(e).__name__}: {e}", every_rank_finds_it=True)
    except DataError as e:  # while training, a shard of one rank's may be the cause: that rank says it
        _fail(f"DataError: {e}", every_rank_finds_it=not phase["training"])
    except (DistError, RuntimeError) as e:
        if not lost_peer(e):
            raise
        # This rank lost a peer: when that peer recorded its error, the cause is said; stay quiet.
        if not outcome.recorded():
            log.error("rank %d lost contact with the other ranks: %s", env_rank(), str(e).splitlines()[0])
        sys.exit(1)
    finally:
        if lock is not None:
            lock.release()
    return 0


def train(cfg, dcfg: DictConfig, phase: dict) -> None:
    """Start the ranks, agree on a stop asked during start-up, train; the job's record is written by rank 0
    once the attempt is underway (its first step done), so a failed attempt changes no file of the run."""
    from . import distributed
    from .rundir import buffer_log, record_job
    from .signals import exit_with_launcher, stop_agreed
    from .trainer import Trainer

    exit_with_launcher()
    buf = buffer_log() if env_rank() == 0 else None
    dist = distributed.init(cfg.parallel)
    if stop_agreed(STOP, dist):  # a signal on any rank while they started
        _stopped(f"stopped by {STOP.name()} during start-up: nothing was written")
    else:
        trainer = Trainer(cfg, dist, STOP)
        phase["training"] = True
        try:
            trainer.fit(lambda: buf is None or record_job(Path(cfg.run_dir).absolute(), dcfg, buf))
        finally:
            trainer.close()
        if line := trainer.stop_summary():
            _stopped(line)
    distributed.shutdown()


if __name__ == "__main__":
    sys.argv = _strip_launcher_args(sys.argv)
    from .show import handle_flags

    handle_flags(sys.argv[1:])  # --cfg job, --help: print and exit
    check_overrides(sys.argv[1:])
    main()
