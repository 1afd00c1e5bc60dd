"""What the terminal shows during a run: rank 0's lines, each warning once, no library chatter.

Other ranks log errors only (conf/hydra/job_logging/rank0.yaml): every rank meets the same warnings, so rank 0
says each once. Python warnings go through logging (so only rank 0 prints them, formatted, and train.log
keeps them). DeepSpeed messages that ask nothing of the user are dropped (DROP_DEEPSPEED); its others stay.
"""

from __future__ import annotations

import logging

# DeepSpeed warns that ZeRO runs "an untested optimizer" for any optimizer it does not ship: ours is torch's
# AdamW with a skip flag (train/optim.py), which ZeRO-1/2 partition like any torch optimizer.
DROP_DEEPSPEED = ("untested optimizer",)


class _Drop(logging.Filter):
    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


def setup_console(rank: int) -> None:
    """Call once per process, after Hydra configured logging and before DeepSpeed starts."""
    logging.captureWarnings(True)
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _Drop) for f in ds.filters):
        ds.addFilter(_Drop(DROP_DEEPSPEED))
    if rank != 0:
        ds.setLevel(logging.ERROR)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
