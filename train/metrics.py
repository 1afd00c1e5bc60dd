"""Where metrics go: W&B, a JSONL file in the run directory and a console progress line. Rank 0 only.

A record is a flat dict of scalars with a "step" key; an event (a loss spike, a rollback) has an "event"
key as well. Every sink gets the same records.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

from .config import ConfigError, WandbConfig

log = logging.getLogger("train.metrics")
# Events whose fields also go to a W&B table (one row per event, appended): W&B history charts numbers only,
# so the text fields (kind, action, policy, layer) live there; the numeric codes are in the history.
# Table key -> its columns (after "step") and the event fields they hold.
EVENT_TABLES = {
    "spike": (
        "spikes/events",
        {
            "kind": "spike/kind",
            "action": "spike/action",
            "policy": "spike/policy",
            "layer": "spike/max_layer",  # the layer with the largest gradient norm
            "loss": "spike/loss",
            "threshold": "spike/threshold",
        },
    )
}


def _plain(v):
    """JSON-safe scalar: non-finite floats become the strings "nan"/"inf"/"-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a")  # a resumed run appends; the last record of a step wins

    def log(self, record: dict) -> None:
        self.file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbSink:
    def __init__(self, cfg: WandbConfig, run_dir: Path, name: str, run_id: str, config: dict) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"logging.wandb.mode={cfg.mode.value} but wandb is not installed: "
                "pip install wandb, or set logging.wandb.mode=disabled"
            ) from None
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.mode.value,
            config=config,
            # silent: no banner, sparklines or run summary on the console (~30 lines a run); the trainer's
            # end-of-run summary names the W&B folder and how to upload it
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        self.dir = Path(self.run.settings.sync_dir).absolute()
        self.url = self.run.url if cfg.mode.value == "online" else None  # silent: the summary shows it
        # Steps go back after a rollback and repeat after a resume: plot against our step, not W&B's.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.tables: dict = {}

    def log(self, record: dict) -> None:
        row = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if record.get("event") in EVENT_TABLES:
            key, fields = EVENT_TABLES[record["event"]]
            if key not in self.tables:
                import wandb

                columns = ["step", *fields]
                self.tables[key] = wandb.Table(
                    columns=columns, log_mode="INCREMENTAL", allow_mixed_types=True
                )
            self.tables[key].add_data(record["step"], *(_plain(record.get(f)) for f in fields.values()))
            row[key] = self.tables[key]
        self.run.log(row)

    def close(self) -> None:
        self.run.finish()


class DeferredSink:
    """A sink made on its first record (W&B's offline run folder): an attempt that fails before it logs
    anything adds nothing to the run directory."""

    def __init__(self, make) -> None:
        self.make, self.sink = make, None

    def log(self, record: dict) -> None:
        if self.sink is None:
            self.sink = self.make()
        self.sink.log(record)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class ConsoleSink:
    """One progress line per record; events as warnings."""

    def __init__(self, max_steps: int, world_size: int = 1) -> None:
        self.max_steps, self.world_size = max_steps, world_size

    def log(self, record: dict) -> None:
        if "event" in record:
            log.warning(
                "%s at step %d: %s",
                record["event"],
                record["step"],
                ", ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k not in ("event", "step", "time")),
            )
            return
        if "train/loss" not in record:
            if "val/loss" in record:
                log.info(
                    "step %d | val loss %.4f | val ppl %.2f | %s",
                    record["step"],
                    record["val/loss"],
                    record["val/ppl"],
                    val_sample(record, self.world_size),
                )
            return
        parts = [
            f"step {record['step']}/{self.max_steps}",
            f"loss {record['train/loss']:.4f}",
            f"lr {record['train/lr']:.2e}",
            f"gnorm {_fmt(record.get('train/grad_norm'))}",
            f"{record['perf/tokens_per_s']:,.0f} tok/s",
        ]
        if "perf/mfu" in record:
            parts.append(f"mfu {100 * record['perf/mfu']:.1f}%")
        mem = record.get("mem/peak_allocated_gb", record.get("mem/peak_rss_gb"))
        if mem is not None:
            parts.append(f"mem {mem:.2f} GB")
        parts.append(f"eta {_duration(record.get('perf/eta_s', 0.0))}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        pass


def val_sample(record: dict, world_size: int) -> str:
    """What a val loss was measured on, e.g. "4 batches x 2 ranks, 4,096 tokens" (a sample, unless the
    whole split was read: `python -m train.eval` gives the whole split's loss)."""
    batches, tokens = record.get("val/batches"), record.get("val/tokens")
    if batches is None or tokens is None:
        return "sample size unknown"
    n = batches // world_size if world_size > 1 else batches
    per_rank = f"{n} batch{'' if n == 1 else 'es'}" + (f" x {world_size} ranks" if world_size > 1 else "")
    whole = "the whole val split: " if record.get("val/whole_split") else ""
    return f"{whole}{per_rank}, {tokens:,} tokens"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Metrics:
    """Fan-out to the sinks; on ranks other than 0 it holds none and does nothing."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks
        self.last: dict = {}  # the newest value of every key logged (the end-of-run summary reads it)

    def log(self, step: int, values: dict) -> None:
        self.last.update({k: (step, v) for k, v in values.items()})
        self._emit({"step": step, "time": time.time(), **values})

    def event(self, name: str, step: int, **fields) -> None:
        self._emit({"event": name, "step": step, "time": time.time(), **fields})

    def _emit(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# ---- reading a run's metrics back ------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_wandb_file(path: Path) -> list[dict]:
    """History rows of one W&B run file (.wandb: a LevelDB-style log of protobuf records in 32 KiB blocks
    after a 7-byte header), so an offline run can be read without network or a W&B account."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, partial = Path(path).read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles a block: skip the padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind in (2, 3):  # first, middle
            partial = chunk if kind == 2 else partial + chunk
        elif kind == 4:  # last
            records.append(partial + chunk)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            )
    return rows


def read_wandb_table(path: Path, key: str) -> list[dict]:
    """The rows (column -> value) of an incremental table logged under `key` in the W&B run file `path`: each
    logged increment is a JSON file under the run's files/ (path in the history row), holding its new rows."""
    files = Path(path).parent / "files"
    rows = []
    for h in read_wandb_file(path):
        if f"{key}/path" in h:
            table = json.loads((files / h[f"{key}/path"]).read_text())
            rows += [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    return rows
