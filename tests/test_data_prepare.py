"""`python -m data.prepare`: inputs (dirs, globs, txt/jsonl/gz), shards, manifest, val split, built-in corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from pathlib import Path

import pytest
from test_data_common import cfg, take, write_corpus

import data.builtin as builtin
import data.prepare as prep
from data import DataError, TokenLoader, ensure_builtin_corpus
from data.manifest import load_manifest
from data.prepare import main, prepare
from data.sources import WorkUnit, builtin_corpus_files, plan_units, read_unit

pytestmark = pytest.mark.timeout(60)


def mixed_inputs(root: Path) -> Path:
    write_corpus(root / "txt", 10)
    recs = [{"content": f"record {i} " * (i + 1), "id": i} for i in range(20)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs[:5]))
    with gzip.open(root / "txt" / "c.txt.gz", "wt") as f:
        f.write("gzipped text document")
    (root / "ignored.csv").write_text("not,picked,up")
    return root


def test_mixed_inputs_manifest_and_checksums(tmp_path):
    src = mixed_inputs(tmp_path / "src")
    out = tmp_path / "out"
    man = prepare(
        [str(src)],
        str(out),
        text_field="content",
        workers=1,
        progress=False,
        shard_size_mb=4 / 1024,
        val_fraction=0.2,
    )
    tr, va = man["splits"]["train"], man["splits"]["val"]
    assert tr["documents"] + va["documents"] == 10 + 20 + 5 + 1 and va["documents"] == 7
    assert man["source"]["files"] == 13 and man["tokenizer"]["kind"] == "byte"
    assert len(tr["shards"]) > 1  # rolled at the target size
    for shard in tr["shards"] + va["shards"]:
        blob = (out / shard["name"]).read_bytes()
        assert len(blob) == shard["bytes"] and hashlib.sha256(blob).hexdigest() == shard["sha256"]
    assert load_manifest(str(out)).fingerprint == man["fingerprint"]
    assert not list(tmp_path.glob("out.partial*"))
    again = prepare(
        [str(src / "*.jsonl*"), str(src / "txt")],
        str(tmp_path / "again"),
        text_field="content",
        workers=1,
        progress=False,
        shard_size_mb=4 / 1024,
        val_fraction=0.2,
    )
    assert again["fingerprint"] == man["fingerprint"]  # globs + dirs, same files: byte-identical output


def test_cli_parallel_processes_and_progress_bar(tmp_path, capsys):
    src = write_corpus(tmp_path / "src", 30)
    out = tmp_path / "out"
    assert main([str(src), "-o", str(out), "--workers", "2", "--shard-size-mb", "0.002"]) == 0
    err = capsys.readouterr().err
    assert "prepare out" in err and "100%" in err  # tqdm progress bar
    serial = prepare([str(src)], str(tmp_path / "serial"), workers=1, progress=False, shard_size_mb=0.002)
    assert load_manifest(str(out)).fingerprint == serial["fingerprint"]  # process count does not matter
    assert main([str(src), "-o", str(out), "--shard-size-mb", "0.002"]) == 0  # already prepared: a no-op
    assert main([str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 1


def test_overwrite_rebuilds(tmp_path):
    src = write_corpus(tmp_path / "src", 8)
    out = str(tmp_path / "out")
    first = prepare([str(src)], out, workers=1, progress=False)
    write_corpus(src, 9, seed=1)
    assert prepare([str(src)], out, workers=1, progress=False) == first
    assert (
        prepare([str(src)], out, workers=1, progress=False, overwrite=True)["fingerprint"]
        != first["fingerprint"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_large_jsonl_is_split_into_line_aligned_units(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} " + "x" * (i % 37)}) + "\n" for i in range(500)))
    units = plan_units([str(path)], split_bytes=997)
    assert len(units) > 10
    texts = [t for u in units for t in read_unit(u)[0]]
    assert texts == read_unit(WorkUnit(str(path)))[0] and len(texts) == 500


def test_builtin_corpus_is_the_stdlib(tmp_path, monkeypatch):
    files = builtin_corpus_files()
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)
    assert any(f.endswith("/json/decoder.py") for f in files)
    out = str(tmp_path / "stdlib")
    man = prepare(None, out, workers=1, progress=False, max_files=40)
    assert man["source"]["builtin_stdlib"] and man["source"]["files"] == 40
    x, y = take(TokenLoader(cfg(out)), 1)[0]
    assert len(x) == 2


def test_ensure_builtin_corpus_is_idempotent_and_race_safe(tmp_path, monkeypatch):
    few = builtin_corpus_files()[:30]
    calls = []
    real_prepare = builtin.prepare

    def counting_prepare(*a, **kw):
        calls.append(1)
        return real_prepare(*a, **{**kw, "workers": 1, "progress": False})

    monkeypatch.setattr(prep, "builtin_corpus_files", lambda: few)
    monkeypatch.setattr(builtin, "prepare", counting_prepare)
    path = str(tmp_path / "cache" / "stdlib")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_builtin_corpus(path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert results == [path] * 3 and len(calls) == 1
    assert ensure_builtin_corpus(path) == path and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["stdlib", "stdlib.lock"]
    with pytest.raises(ValueError, match="prepared with tokenizer 'byte'"):
        ensure_builtin_corpus(path, tokenizer="bpe")


def test_shards_are_plain_webdataset_tars(tmp_path):
    import webdataset as wds

    src = write_corpus(tmp_path / "src", 10)
    path = str(tmp_path / "out")
    prepare([str(src)], path, workers=1, progress=False, val_fraction=0, shard_size_mb=1)
    shard = load_manifest(path).shards("train")[0]
    samples = list(wds.WebDataset(f"{path}/{shard.name}", shardshuffle=False).decode())
    assert len(samples) == shard.documents == 10
    assert sum(s["tokens.npy"].size for s in samples) == shard.tokens


def test_output_without_manifest_is_not_clobbered(tmp_path):
    src = write_corpus(tmp_path / "src", 4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds no manifest.json"):
        prepare([str(src)], str(tmp_path / "out"), workers=1, progress=False)
    assert (tmp_path / "out" / "precious.txt").exists()


def test_shard_size_is_fitted_to_a_small_input(tmp_path, caplog):
    """~1.2 MB of text with the defaults: >= 16 train shards, so 2 ranks x 4 workers can read it."""
    src = write_corpus(tmp_path / "src", n_docs=600, length=(200, 400))
    man = prepare([str(src)], str(tmp_path / "out"), progress=False)
    assert len(man["splits"]["train"]["shards"]) >= 16
    assert 64 << 10 <= man["source"]["shard_bytes"] < 1 << 20
    loader = TokenLoader(cfg(str(tmp_path / "out"), num_workers=4), rank=1, world_size=2)
    assert loader.state_dict()["num_streams"] == 8  # chosen from the shards there are
    tiny = write_corpus(
        tmp_path / "tiny", n_docs=1, length=(5, 10)
    )  # one short document: a warning saying what to do
    with caplog.at_level("WARNING", logger="data.prepare"):
        prepare([str(tiny)], str(tmp_path / "tiny-out"), progress=False, val_fraction=0)
    assert "only 1 train shards" in caplog.text and "--shard-size-mb" in caplog.text
    with pytest.raises(
        ValueError, match=r"2 \(rank, worker\) slots, but .* only 1 train shard.*--shard-size-mb"
    ):
        TokenLoader(cfg(str(tmp_path / "tiny-out")), rank=0, world_size=2)
