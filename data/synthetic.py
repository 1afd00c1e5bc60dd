"""Generated corpora: `python -m data.prepare --synthetic mqar [options]` (no download, deterministic).

MQAR, multi-query associative recall (Zoology, arXiv 2312.04927): each example lists K key-value pairs,
then a separator, then asks for every key once, in a random order, each query followed by its answer:

    k1 v1 k2 v2 ... kK vK <sep> k3 v3 k1 v1 ... <pad> ... <eos>

Keys are K distinct ids of the key alphabet, values independent uniform ids of the value alphabet (a
disjoint id range), so an answer is only in the context: chance is 1/|values|. Token ids: 0 pad, 1 bos,
2 eos, 3 sep, then the keys, then the values. An example is seq_len - 1 tokens; the loader's EOS after
it makes it exactly one training window of seq_len tokens, so every window is one whole example.
Example i has K = pairs[i % len(pairs)]: train and val hold the pair counts in equal shares.

Answer positions are derivable from the tokens (no second file): a target counts when its input token is
a key after the separator and the target is a value. The manifest says so (`tokenizer.loss: answers`),
and the loader then sets every other label to -100, so training loss and val loss are the cross-entropy
on the answers only, as Zoology trains (its labels are -100 except at the queries).

Train is generated from seed (seed, 0), val from (seed, 1); the same options give byte-identical shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .manifest import MANIFEST, Manifest, load_manifest, publish, write_manifest
from .shards import ShardWriter, encode_tokens

log = logging.getLogger("data.synthetic")
PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_KEY = 4
IGNORE = -100


@dataclass(frozen=True)
class MQARSpec:
    pairs: tuple[int, ...] = (4, 8, 16, 32, 48)
    seq_len: int = 256  # the training window; an example is seq_len - 1 tokens plus the loader's EOS
    num_keys: int = 512
    num_values: int = 512
    train_examples: int = 100_000
    val_examples: int = 5_000
    seed: int = 0
    shards: int = 16  # train shards (val: the same examples per shard); the loader's streams need several

    def validate(self) -> None:
        if not self.pairs or min(self.pairs) < 1:
            raise ValueError(f"--pairs must be positive numbers of key-value pairs, got {list(self.pairs)}")
        longest = 4 * max(self.pairs) + 1
        if longest > self.seq_len - 1:
            raise ValueError(
                f"--pairs {max(self.pairs)} needs {longest} tokens (4 per pair + separator) in an example of "
                f"seq_len - 1 = {self.seq_len - 1}: use --seq-len {longest + 1} or more, or fewer pairs"
            )
        if self.num_keys < max(self.pairs):
            raise ValueError(
                f"--keys {self.num_keys}: an example needs {max(self.pairs)} distinct keys (the largest of --pairs)"
            )
        if self.num_values < 2:
            raise ValueError(f"--values must be at least 2, got {self.num_values}")
        for name in ("train_examples", "val_examples", "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def key_range(self) -> tuple[int, int]:
        return FIRST_KEY, FIRST_KEY + self.num_keys

    @property
    def value_range(self) -> tuple[int, int]:
        return FIRST_KEY + self.num_keys, FIRST_KEY + self.num_keys + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.value_range[1]

    def describe(self) -> dict:
        """The manifest's `tokenizer` entry: what the ids mean and how targets are chosen."""
        return {
            "kind": "mqar",
            "spec": "mqar",
            "vocab_size": self.vocab_size,
            "bos_id": BOS,
            "eos_id": EOS,
            "pad_id": PAD,
            "sep_id": SEP,
            "keys": list(self.key_range),
            "values": list(self.value_range),
            "seq_len": self.seq_len,
            "pairs": list(self.pairs),
            "loss": "answers",
        }


def make_example(rng: np.random.Generator, k: int, spec: MQARSpec) -> np.ndarray:
    """One example of k pairs, seq_len - 1 tokens: context, separator, every key queried once, padding."""
    key_lo, val_lo = spec.key_range[0], spec.value_range[0]
    keys = key_lo + rng.choice(spec.num_keys, size=k, replace=False)
    values = val_lo + rng.integers(spec.num_values, size=k)
    order = rng.permutation(k)
    doc = np.full(spec.seq_len - 1, PAD, dtype=np.int64)
    doc[0 : 2 * k : 2], doc[1 : 2 * k : 2] = keys, values
    doc[2 * k] = SEP
    q = 2 * k + 1
    doc[q : q + 2 * k : 2], doc[q + 1 : q + 2 * k : 2] = keys[order], values[order]
    return doc


def examples(spec: MQARSpec, split: str) -> list[np.ndarray]:
    n = spec.train_examples if split == "train" else spec.val_examples
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1])
    return [make_example(rng, spec.pairs[i % len(spec.pairs)], spec) for i in range(n)]


@dataclass(frozen=True)
class AnswerTargets:
    """Keeps the labels that are answers, sets the rest to -100 (picklable: DataLoader workers carry it)."""

    sep_id: int
    keys: tuple[int, int]
    values: tuple[int, int]

    def mask(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """True where labels[t] answers the query inputs[t]: a key after the separator, a value next."""
        after_sep = np.cumsum(inputs == self.sep_id, axis=-1) > 0
        is_key = (inputs >= self.keys[0]) & (inputs < self.keys[1])
        is_value = (labels >= self.values[0]) & (labels < self.values[1])
        return after_sep & is_key & is_value

    def __call__(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.where(self.mask(inputs, labels), labels, IGNORE)

    def pairs(self, inputs: np.ndarray) -> np.ndarray:
        """Key-value pairs in each row's context: the keys before the separator."""
        before_sep = np.cumsum(inputs == self.sep_id, axis=-1) == 0
        is_key = (inputs >= self.keys[0]) & (inputs < self.keys[1])
        return (before_sep & is_key).sum(axis=-1)


def answer_targets(tokenizer: dict, seq_len: int | None = None) -> AnswerTargets | None:
    """The label rule of a corpus whose manifest asks for loss on answers; None for ordinary text.
    With seq_len, a window that would not be exactly one example is an error."""
    if tokenizer.get("loss") != "answers":
        return None
    if seq_len is not None and seq_len != tokenizer["seq_len"]:
        raise DataError(
            f"this MQAR corpus was made for data.seq_len={tokenizer['seq_len']} (one example per window), "
            f"not {seq_len}: set data.seq_len={tokenizer['seq_len']} or prepare it with --seq-len {seq_len}"
        )
    return AnswerTargets(int(tokenizer["sep_id"]), tuple(tokenizer["keys"]), tuple(tokenizer["values"]))


def prepare_mqar(output: str, spec: MQARSpec, overwrite: bool = False) -> dict:
    """Write the corpus (train + val shards, manifest) to `output` through the shard writer every corpus
    uses; an existing corpus made with the same options is kept, one made with others is an error."""
    spec.validate()
    settings = {"synthetic": "mqar", **asdict(spec), "pairs": list(spec.pairs)}
    if (Path(output) / MANIFEST).exists() and not overwrite:
        have = load_manifest(output)
        if have.source == settings:
            log.info("%s already holds this MQAR corpus", output)
            return have.to_dict()
        raise DataError(
            f"{output} holds a corpus made with other settings ({json.dumps(have.source)}); "
            f"pass --overwrite or another --output"
        )
    if Path(output).exists() and not overwrite:
        raise DataError(f"{output} exists but holds no {MANIFEST}; pass --overwrite or remove it")
    tmp = Path(f"{output.rstrip('/')}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dtype = "uint16" if spec.vocab_size <= 1 << 16 else "uint32"
        per_shard = -(-spec.train_examples // spec.shards)
        # All examples have one length, so a shard of exactly per_shard examples is per_shard records.
        record = 512 + -(-len(encode_tokens(np.zeros(spec.seq_len - 1, dtype=dtype))) // 512) * 512
        splits = {}
        for split in ("train", "val"):
            writer = ShardWriter(tmp, split, per_shard * record, dtype)
            for doc in examples(spec, split):
                writer.add(doc)
            splits[split] = writer.close()
        man = Manifest(tokenizer=spec.describe(), dtype=dtype, splits=splits, source=settings)
        manifest = write_manifest(tmp, man)
        publish(tmp, Path(output), overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "prepared %s: MQAR, pairs %s, %d train + %d val examples of %d tokens, vocab %d",
        output,
        list(spec.pairs),
        spec.train_examples,
        spec.val_examples,
        spec.seq_len,
        spec.vocab_size,
    )
    return manifest


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    d = MQARSpec()
    p = argparse.ArgumentParser(
        prog="python -m data.prepare --synthetic mqar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--synthetic", required=True, choices=["mqar"], help="which generated corpus")
    p.add_argument("-o", "--output", default="data_cache/mqar", help="output directory")
    p.add_argument("--pairs", type=_ints, default=d.pairs, help="numbers of key-value pairs, e.g. 4,8,16")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="training window (set data.seq_len to it)")
    p.add_argument("--keys", type=int, default=d.num_keys, help="size of the key alphabet")
    p.add_argument("--values", type=int, default=d.num_values, help="size of the value alphabet")
    p.add_argument("--examples", type=int, default=d.train_examples, help="train examples")
    p.add_argument("--val-examples", type=int, default=d.val_examples, help="val examples (all pair counts)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shards", type=int, default=d.shards, help="train shards (>= the loader's streams)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing output")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = MQARSpec(
        pairs=a.pairs,
        seq_len=a.seq_len,
        num_keys=a.keys,
        num_values=a.values,
        train_examples=a.examples,
        val_examples=a.val_examples,
        seed=a.seed,
        shards=a.shards,
    )
    try:
        prepare_mqar(a.output, spec, a.overwrite)
    except ValueError as e:  # options that cannot make a corpus
        log.error("%s", e)
        return 2
    except DataError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
