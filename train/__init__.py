"""`python -m train`: Hydra-configured DeepSpeed pretraining of Jamba models (see docs/train.md)."""
