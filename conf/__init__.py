"""Hydra configs for `python -m train` (YAML only; the schema is train/config.py)."""
