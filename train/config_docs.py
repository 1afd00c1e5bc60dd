"""One line per setting, read from the schema's own source: the comment on a field's line (or the comment
lines just above it) in train/config.py, data/config.py and jamba/config.py. `--help` prints these, so a
setting is described once, where it is defined.

JambaConfig's transformers-compatible fields carry no comment in jamba/config.py; their lines are in
MODEL_FIELD_HELP (the only place they are written).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import tokenize
from typing import Any

MODEL_FIELD_HELP = {
    "preset": "flavor of jamba/presets.py (conf/model/*.yaml pick one); the fields below override it",
    "vocab_size": "embedding rows; unset: the corpus's vocabulary rounded up to a multiple of 64",
    "hidden_size": "model width",
    "intermediate_size": "hidden width of each feed-forward (dense MLP or expert)",
    "num_hidden_layers": "decoder layers (one mixer + one feed-forward each)",
    "num_attention_heads": "query heads of the attention layers",
    "num_key_value_heads": "key/value heads (grouped-query attention; divides num_attention_heads)",
    "hidden_act": "feed-forward activation (silu only)",
    "attn_layer_offset": "attention at layers i % attn_layer_period == attn_layer_offset",
    "expert_layer_period": "MoE feed-forward every expert_layer_period layers",
    "expert_layer_offset": "MoE at layers i % expert_layer_period == expert_layer_offset",
    "num_experts": "experts per MoE layer (1: every feed-forward is dense)",
    "num_experts_per_tok": "experts each token is routed to (top-k)",
    "mamba_d_state": "Mamba state size per channel (N)",
    "mamba_d_conv": "Mamba causal-conv kernel width",
    "mamba_expand": "Mamba inner width = mamba_expand * hidden_size",
    "mamba_dt_rank": "rank of the Mamba dt projection; auto: ceil(hidden_size / 16)",
    "mamba_conv_bias": "bias in the Mamba causal conv",
    "mamba_proj_bias": "bias in the Mamba in/out projections",
    "mamba_dt_min": "smallest initial Mamba step size dt",
    "mamba_dt_max": "largest initial Mamba step size dt",
    "mamba_dt_init_floor": "floor of the initial dt",
    "rms_norm_eps": "RMSNorm epsilon",
    "router_aux_loss_coef": "weight of the MoE load-balancing loss",
    "router_z_loss_coef": "weight of the router z-loss (0: off)",
    "tie_word_embeddings": "share the embedding and LM-head weights",
    "initializer_range": "std of the normal weight init",
    "max_position_embeddings": "longest sequence the config declares (RoPE tables, exports)",
    "attention_dropout": "dropout on attention probabilities",
    "use_rope": "rotary position embeddings in attention (the paper uses none)",
    "rope_theta": "RoPE base",
    "pad_token_id": "padding id; unset in a run: the corpus tokenizer's",
    "bos_token_id": "beginning-of-sequence id; unset in a run: the corpus tokenizer's",
    "eos_token_id": "end-of-sequence id; unset in a run: the corpus tokenizer's",
}
_FIELD = re.compile(r"^(\s+)([A-Za-z_]\w*)\s*:")
_NOISE = re.compile(r"type:\s*ignore(\[[^\]]*\])?|noqa(:.*)?")


def _clean(comment: str) -> str:
    parts = [p.strip(" -") for p in comment.split("#")]
    return "; ".join(p for p in parts if p and not _NOISE.fullmatch(p))


def first_sentence(text: str) -> str:
    """The description's first sentence: one line of --help."""
    m = re.search(r"(?<=[a-z0-9)\]'`])\. (?=[A-Z(])", text)
    return (text[: m.start()] if m else text).rstrip(".")


@functools.cache
def source_docs(cls: type) -> dict[str, str]:
    """{field or enum member: its comment} from `cls`'s source; fields without a comment are absent."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, str] = {}  # 0-based line -> its comment
    starts: dict[int, int] = {}  # line where a statement ends -> line where it starts
    first = None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0] - 1] = _clean(tok.string)
        elif tok.type == tokenize.NEWLINE:
            starts[tok.start[0] - 1] = first if first is not None else tok.start[0] - 1
            first = None
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT) and first is None:
            first = tok.start[0] - 1
    body = None  # the indentation of the class body
    out: dict[str, str] = {}
    for end, start in sorted(starts.items(), key=lambda kv: kv[1]):
        m = _FIELD.match(lines[start]) or re.match(r"^(\s+)([A-Za-z_]\w*)\s*=", lines[start])
        if not m:
            continue
        body = body or m.group(1)
        if m.group(1) != body:
            continue
        trailing = [comments[i] for i in range(start, end + 1) if i in comments and comments[i]]
        above, i = [], start - 1
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, comments.get(i, ""))
            i -= 1
        text = " ".join(trailing) or " ".join(a for a in above if a)
        if text:
            out[m.group(2)] = text
    return out


def class_doc(cls: type) -> str:
    """The first line of a class's own docstring ('' for dataclass's generated signature)."""
    doc = cls.__doc__ or ""
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return doc.strip().splitlines()[0]


def field_doc(cls: type, name: str) -> str:
    """The description of field `name` of dataclass `cls` (ModelConfig: JambaConfig's source, then
    MODEL_FIELD_HELP)."""
    from jamba import JambaConfig

    if cls.__name__ == "ModelConfig":
        return source_docs(JambaConfig).get(name) or MODEL_FIELD_HELP.get(name, "")
    return source_docs(cls).get(name, "")


def choices(tp: Any) -> str:
    """'a | b | c' for an Enum type, '' otherwise."""
    import enum

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.name for m in tp)
    return ""


def setting_doc(cls: type, name: str, tp: Any) -> str:
    """One line for --help: the field's description, else (an Enum) its members' own comments."""
    if doc := first_sentence(field_doc(cls, name)):
        return doc
    if choices(tp):
        docs = source_docs(tp)
        return "; ".join(f"{m.name}: {docs[m.name]}" if m.name in docs else m.name for m in tp)
    return ""


def walk(cls: type, prefix: str = ""):
    """(dotted key, dataclass, field) for every leaf setting of a dataclass, nested ones flattened."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(tp):
            yield from walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", cls, f, tp
