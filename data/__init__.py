"""Tokenized webdataset shards, streamed deterministically and resumably (see docs/data.md)."""

from importlib import import_module

from .config import DataConfig
from .errors import DataError

__all__ = ["DataConfig", "DataError", "TokenLoader", "ensure_builtin_corpus"]


def __getattr__(name: str):
    # Lazy: the loader imports torch, and `python -m data.prepare` should not pay for it up front.
    if name == "TokenLoader":
        return import_module(".loader", __name__).TokenLoader
    if name == "ensure_builtin_corpus":
        return import_module(".builtin", __name__).ensure_builtin_corpus
    raise AttributeError(f"module 'data' has no attribute {name!r}")
