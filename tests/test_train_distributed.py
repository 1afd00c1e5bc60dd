"""train.distributed: which accelerator DeepSpeed is told to use."""

import logging
import os

import torch

from train.distributed import set_ds_accelerator


def test_ds_accelerator_follows_the_device(monkeypatch, caplog):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    set_ds_accelerator(torch.device("cpu"))
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    # a GPU run that inherited a CPU run's setting (the GPU test of DeepSpeed training once failed on it)
    with caplog.at_level(logging.WARNING, logger="train.distributed"):
        set_ds_accelerator(torch.device("cuda", 0))
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    assert "DS_ACCELERATOR=cpu" in caplog.text
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # anything else the user chose stays
    set_ds_accelerator(torch.device("cuda", 0))
    assert os.environ["DS_ACCELERATOR"] == "xpu"
