"""The one dataclass that configures the data component (loader side; `prepare` has its own CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .mixture import MixtureEntry


@dataclass
class DataConfig:
    """Where the prepared corpus lives and how it is cut into batches.

    `path` is a directory holding `manifest.json` and the shards written by `python -m data.prepare`
    (relative paths are relative to the CWD), a URL prefix (`https://host/corpus`), or a template
    with `{name}` that webdataset can open, e.g. `pipe:aws s3 cp s3://bucket/corpus/{name} -`. A `pipe:`
    template is a shell command: it belongs in your own config, never in data or a checkpoint.
    """

    path: str = "data_cache/stdlib"  # the prepared corpus: a directory, URL prefix or `pipe:` template
    # Several prepared corpora (one tokenizer) blended by sampling weight: [{path: ..., weight: ...}, ...].
    # Each row of a micro-batch reads corpus c with probability weight_c / sum(weights), deterministically;
    # `path` is then not read, and validation uses the first corpus's val split.
    mixture: list[MixtureEntry] = field(default_factory=list)
    seq_len: int = 256  # tokens per training sequence
    micro_batch_size: int = 4  # sequences per rank per micro-batch
    seed: int = 1234  # data order (shuffles and stream assignment)
    # DataLoader worker processes per rank; 0 reads in the training process.
    num_workers: int = 0
    # Independent shard streams the train data is split into; 0 means min(train shards,
    # max(8, world_size * max(1, num_workers))) at the first start. Fixed by the checkpointed state
    # afterwards, and it bounds how many (rank, worker) slots a resume may use: set it (e.g. 64, within
    # the shard count) if you expect to grow the job.
    num_streams: int = 0
    # Shuffle shards per epoch, documents per shard visit and the windows of each visit (seeded, so every
    # row of a micro-batch is an independent draw); False reads in stored order.
    shuffle: bool = True
    # Check every shard's size and sha256 against the manifest as it is read.
    verify_checksums: bool = True
    prefetch_factor: int = 2  # batches each DataLoader worker reads ahead
    pin_memory: bool = False  # page-locked host batches (faster copies to a GPU)
    # Seconds a DataLoader worker may take for one batch before the main process raises (no hangs).
    timeout_s: float = 600.0
    # The manifest fingerprint the corpus must have ("" = any): pins the corpus (and, with
    # verify_checksums, every shard's bytes), so a replaced corpus fails at start-up.
    expect_fingerprint: str = ""

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "prefetch_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("num_workers", "num_streams"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.expect_fingerprint and not self.verify_checksums:
            raise ValueError("DataConfig.expect_fingerprint pins the shards only with verify_checksums=true")
        if float(self.timeout_s) < 0:
            raise ValueError(f"DataConfig.timeout_s must be >= 0, got {self.timeout_s!r}")
