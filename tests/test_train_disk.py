"""A full disk, foreseen: a checkpoint that will not fit is one line with the figures and the fix, training
goes on and the next interval saves; `keep_last` saves that will not fit are said at start; a write that
fails names its cause ("No space left on device"); `latest` stays on the newest complete checkpoint. The
free-space probe is mocked; ENOSPC is injected into the writer."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from dist_utils import run_distributed

from train.checkpoint_writer import room_problem, write_cause
from train.testing import TINY

pytestmark = pytest.mark.distributed
ARGS = [*TINY, "trainer.eval_interval=0", "checkpoint.interval=2", "checkpoint.keep_last=2", "parallel=zero2"]


def trainer_for(run_dir: str, *more: str):
    import os

    import torch
    from hydra import compose, initialize_config_dir

    from train.config import register, to_config
    from train.distributed import Dist
    from train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # the run lock's work in a real run
    register()
    with initialize_config_dir(os.path.join(root, "conf"), version_base=None):
        cfg = to_config(compose("config", overrides=[*ARGS, f"run_dir={run_dir}", "run_name=t", *more]))
    return Trainer(cfg, Dist(0, 1, 0, torch.device("cpu")))


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        logging.getLogger().addHandler(self)
        logging.getLogger().setLevel(logging.INFO)

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


def _disk_full(run_dir: str) -> None:
    import train.checkpoint_writer as cw
    from train.checkpoint import CheckpointError, find_latest, is_complete, tag_for

    ckpts, got = Path(run_dir) / "checkpoints", Lines()
    trainer = trainer_for(run_dir, "trainer.max_steps=6")
    # no room until step 4: the start warns (keep_last), the save of step 2 is skipped, 4 and 6 are saved
    cw.free_bytes = lambda path: 10**15 if trainer.step >= 4 else 1000
    trainer.fit()
    trainer.close()
    ahead = [ln for ln in got.lines if ln.startswith("checkpoint.keep_last=2 (3 more checkpoints of ")]
    assert len(ahead) == 1 and " MB each) needs " in ahead[0] and "has 0.00 MB free" in ahead[0], got.lines
    skipped = [ln for ln in got.lines if ln.startswith("not saved: the checkpoint of step 2 needs")]
    assert len(skipped) == 1 and "lower checkpoint.keep_last" in skipped[0], got.lines
    assert "checkpoint.dir" in skipped[0] and "the next interval tries again" in skipped[0]
    assert not (ckpts / tag_for(2)).exists() and find_latest(ckpts) == ckpts / tag_for(6)
    assert is_complete(ckpts / tag_for(4))
    # the disk fills while step 8 is written: the error names the cause, `latest` stays on step 6
    real_write = cw.write

    def full(kind, path, payload):
        if tag_for(8) in str(path) and kind == "torch":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(kind, path, payload)

    cw.write = full
    trainer = trainer_for(run_dir, "trainer.max_steps=8")
    with pytest.raises(
        CheckpointError, match=r"writing a checkpoint failed: No space left on device \(.*step_0+8"
    ):
        trainer.fit()
    trainer.close()
    assert (ckpts / "latest").read_text() == tag_for(6) and find_latest(ckpts) == ckpts / tag_for(6)
    # no room for the final save: training ends, and the run fails with the figures in one line
    cw.write, cw.free_bytes = real_write, lambda path: 1000
    trainer = trainer_for(run_dir, "trainer.max_steps=7", "checkpoint.interval=0")
    with pytest.raises(
        CheckpointError, match=r"final checkpoint was not saved: the checkpoint of step 7 needs"
    ):
        trainer.fit()
    trainer.close()
    assert find_latest(ckpts) == ckpts / tag_for(6) and not (ckpts / tag_for(7)).exists()


@pytest.mark.timeout(200)
def test_a_full_disk_is_foreseen_said_and_survived(tmp_path):
    run_distributed(_disk_full, 1, str(tmp_path / "run"), timeout=180)


def test_the_cause_of_a_failed_write_is_named(tmp_path, monkeypatch):
    import train.checkpoint_writer as cw

    f = tmp_path / "step_00000030" / "mp_rank_00_model_states.pt"
    # torch.save on a full disk: "unexpected pos", no errno; the folder has no room left
    monkeypatch.setattr(cw, "free_bytes", lambda path: 4096)
    e = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15119914880 vs 15119914776")
    assert write_cause(e, f) == f"No space left on device ({f}): 0 MB free"
    monkeypatch.setattr(cw, "free_bytes", lambda path: 10**12)
    assert write_cause(e, f).startswith("[enforce fail at inline_container.cc:672]")  # not a full disk
    try:
        raise RuntimeError("wrapped") from OSError(errno.EIO, "Input/output error")
    except RuntimeError as wrapped:
        assert write_cause(wrapped, f) == f"Input/output error ({f})"
    assert room_problem(tmp_path, 100e9, 101e9, "x") == (  # 2% margin: 102 GB needed
        f"x needs 100.00 GB, {tmp_path} has 101.00 GB free: lower checkpoint.keep_last, free space there, "
        "or set checkpoint.dir to a larger disk"
    )
    assert room_problem(tmp_path, 100e9, 103e9, "x") is None
