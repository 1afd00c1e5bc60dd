"""Reading a composed config: keys the schema lacks, and one line for a Hydra/OmegaConf error."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf


def unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `cfg` the schema lacks (Hydra's `+key=` adds them even to a structured config)."""
    out, known = [], set(schema.keys())
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key not in known:
            out.append(full)
            continue
        node, snode = cfg._get_node(key), schema._get_node(key)
        if (
            isinstance(node, DictConfig)
            and isinstance(snode, DictConfig)
            and dataclasses.is_dataclass(OmegaConf.get_type(snode))
        ):
            out += unknown_keys(node, snode, full + ".")
    return out


def describe(e: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, then what is wrong with it."""
    cause = e.__cause__ if e.__cause__ is not None else e
    key = getattr(cause, "full_key", None)
    text = str(cause).split("Config search path")[0]
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.strip().startswith(("full_key:", "reference_type=", "object_type="))
    ]
    if key and cause is not e:
        return f"{key}: {lines[0] if lines else type(cause).__name__} ({str(e).splitlines()[0]})"
    return " ".join(lines) or type(e).__name__
