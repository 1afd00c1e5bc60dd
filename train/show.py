"""What a run will train, shown before and kept after: `--cfg job`, `--help`, the layout table.

`python -m train [overrides] --cfg job` prints the resolved config with the preset's real model values (the
corpus's vocabulary and special ids where the corpus is prepared) and every `${...}` resolved, then the
layout. `--help` lists the config groups and every setting with its description (train/config_docs.py).
A run logs the layout at start (rank 0) and keeps `config.yaml` and `layout.txt` in its run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from jamba import JambaConfig
from jamba.config import parse_pattern

from .config import Config, ConfigError, build_model_config, to_container
from .config_docs import choices, class_doc, setting_doc, walk

log = logging.getLogger("train")
ROW = 32  # layers per row of the layout table
CONF = Path(__file__).resolve().parent.parent / "conf"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---- the layout -----------------------------------------------------------------------------------------
def layout_summary(m: JambaConfig) -> str:
    """'M ME M* ...' as one pattern string plus its counts, e.g. 'MEM*E (3 layers: 1 attention, 2 mamba; ...)'."""
    kinds = m.layers_block_type
    moe = sum(m.layers_is_moe)
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
    ff = f"{moe} MoE ({m.num_experts} experts, top-{m.num_experts_per_tok}), {len(kinds) - moe} dense"
    return f"{m.pattern} ({len(kinds)} layers: {counts}; feed-forward: {ff})"


def layout_table(m: JambaConfig) -> list[str]:
    """A compact table, one column per layer: its index, mixer (M mamba, * attention) and feed-forward
    (E MoE, - dense); rows of ROW layers."""
    layers = parse_pattern(m.pattern)  # the pattern's own symbols, whatever mixers jamba/ knows
    mixers = [mixer for mixer, _ in layers]
    ffs = ["E" if moe else "-" for _, moe in layers]
    out = []
    for s in range(0, len(mixers), ROW):
        idx = range(s, min(s + ROW, len(mixers)))
        w = len(str(idx[-1]))
        out.append("  layer " + " ".join(f"{i:>{w}}" for i in idx))
        out.append("  mixer " + " ".join(f"{mixers[i]:>{w}}" for i in idx))
        out.append("  ffn   " + " ".join(f"{ffs[i]:>{w}}" for i in idx))
    return out


def layout_text(m: JambaConfig) -> str:
    return "\n".join(
        [f"layout {layout_summary(m)}", *layout_table(m), "  (M mamba, * attention; E MoE, - dense)"]
    )


# ---- the resolved config ------------------------------------------------------------------------------
def corpus_tokenizer(cfg: Config) -> dict | None:
    """The tokenizer description of the corpus a run reads (its first corpus), if it can be known here."""
    from data.manifest import MANIFEST, is_local, load_manifest

    path = cfg.data.mixture[0].path if cfg.data.mixture else cfg.data.path
    if is_local(path) and (Path(path) / MANIFEST).is_file():
        try:
            return load_manifest(path).tokenizer
        except Exception:  # noqa: BLE001 - a display falls back to the preset's values
            return None
    if os.path.normpath(path) == os.path.normpath(type(cfg.data)().path):  # the built-in corpus, unprepared
        from data.tokenizer import ByteTokenizer

        return ByteTokenizer().describe()
    return None


def model_values(cfg: Config) -> JambaConfig:
    """The model a run builds: the preset, the overrides, and the corpus's vocabulary and ids where unset."""
    from .build import padded_vocab_size

    model, tok = cfg.model, corpus_tokenizer(cfg)
    if tok is not None:
        ids = {k: tok[k[:3] + "_id"] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model = dataclasses.replace(model, **{k: v for k, v in ids.items() if getattr(model, k) is None})
        if model.vocab_size is None:
            model = dataclasses.replace(model, vocab_size=padded_vocab_size(int(tok["vocab_size"])))
    return build_model_config(model, cfg.parallel.activation_checkpointing)


def resolved_dict(cfg: Config, m: JambaConfig) -> dict:
    """The run's config as plain values: `${...}` resolved, `model` holding every field's real value."""
    d = to_container(cfg)
    fields = {f.name for f in dataclasses.fields(type(cfg.model))}
    d["model"] = {"preset": cfg.model.preset, **{k: v for k, v in m.to_dict().items() if k in fields}}
    return d


def config_yaml(cfg: Config, m: JambaConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(resolved_dict(cfg, m)))


def write_run_files(run_dir: Path, config: dict, m: JambaConfig) -> None:
    """Rank 0, once the run has started: <run_dir>/config.yaml (resolved) and layout.txt."""
    from .checkpoint import atomic_write

    d = {**config, "model": {"preset": config["model"]["preset"], **_model_fields(config, m)}}
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(d)))
    atomic_write(run_dir / "layout.txt", layout_text(m) + "\n")


def _model_fields(config: dict, m: JambaConfig) -> dict:
    return {k: v for k, v in m.to_dict().items() if k in config["model"]}


def log_layout(m: JambaConfig) -> None:
    for line in layout_text(m).splitlines():
        log.info("%s", line)


# ---- --help ------------------------------------------------------------------------------------------------
def _value(v) -> str:
    if isinstance(v, str):
        return v or "''"
    if v is None:
        return "null"
    return str(v).lower() if isinstance(v, bool) else str(v)


def help_text(cfg: Config, m: JambaConfig) -> str:
    values = resolved_dict(cfg, m)
    out = [
        "python -m train [KEY=VALUE | GROUP=OPTION ...]   (also under torchrun / the deepspeed launcher)",
        "  --cfg job     print the resolved config (these values, the model's layout) and exit",
        "  --help        this text; other Hydra flags: --hydra-help",
        "",
        "Config groups (GROUP=OPTION picks a file of conf/GROUP/):",
    ]
    for g in sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        opts = ", ".join(sorted(f.stem for f in (CONF / g).glob("*.yaml")))
        out.append(f"  {g:<12} {opts}")
    out += ["", "Settings (KEY=VALUE; the values shown are this command line's):"]
    section = None
    for key, cls, f, tp in walk(Config):
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section, doc = top, class_doc(_section_type(top)) if top else ""
            out += ["", f"{top or '(top level)'}:" + (f" {doc}" if doc else "")]
        v = values
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        doc = setting_doc(cls, f.name, tp)
        if (opts := choices(tp)) and f"{opts.split(' | ')[-1]}:" not in doc:
            doc = f"{doc} [{opts}]" if doc else f"[{opts}]"
        out.append(f"  {key} = {_value(v)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(out)


def _section_type(name: str) -> type:
    import typing

    return typing.get_type_hints(Config)[name]


# ---- the flags, before Hydra sees them ------------------------------------------------------------------
def _compose(overrides: list[str]) -> Config:
    from hydra import compose, initialize_config_dir

    from .config import to_config

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return to_config(compose(config_name="config", overrides=overrides))


def handle_flags(argv: list[str]) -> None:
    """`--cfg job` / `-c job` and `--help` / `-h`: print, then exit (0; 2 for a config error). Anything
    else (Hydra's other flags, a run) returns."""
    flags = {"help": any(a in ("--help", "-h") for a in argv), "job": False}
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--cfg", "-c") and i + 1 < len(argv) and argv[i + 1] == "job":
            flags["job"], i = True, i + 2
            continue
        if a not in ("--help", "-h"):
            rest.append(a)
        i += 1
    if not (flags["help"] or flags["job"]) or any(a.startswith("-") for a in rest):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config_check import describe

    try:
        cfg = _compose(rest)
        m = model_values(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"ConfigError: {describe(e)}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)
        sys.exit(2)
    if flags["help"]:
        print(help_text(cfg, m))
    else:
        print(config_yaml(cfg, m), end="")
        if cfg.model.vocab_size is None and corpus_tokenizer(cfg) is None:
            print("# model.vocab_size and the special ids: the preset's here; a run takes the corpus's")
        print("# " + layout_text(m).replace("\n", "\n# "))
    sys.exit(0)
