"""conf/ + train/config.py: composition, strictness, presets; no process is started."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from jamba import PRESETS
from train.config import (
    ConfigError,
    SpikePolicy,
    build_model_config,
    register,
    to_config,
    to_container,
)
from train.config_check import describe

CONF = str(Path(__file__).resolve().parent.parent / "conf")
register()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_the_cpu_debug_run():
    cfg = to_config(load())
    assert cfg.model.preset == "debug" and cfg.parallel.zero_stage == 1
    assert cfg.logging.wandb.mode.value == "offline" and cfg.resume == "auto"
    assert cfg.schedule.total_steps == cfg.trainer.max_steps  # interpolated
    assert cfg.checkpoint.dir == "runs/debug/checkpoints"
    mc = build_model_config(cfg.model, cfg.parallel.activation_checkpointing)
    assert mc.hidden_size == PRESETS["debug"]["hidden_size"] and mc.extra == {"preset": "debug"}
    plain = to_container(cfg)
    assert plain["spikes"]["policy"] == "log" and plain["model"]["preset"] == "debug"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_a_model_option(preset):
    cfg = to_config(load(f"model={preset}"))
    mc = build_model_config(cfg.model)
    assert cfg.model.preset == preset and mc.num_hidden_layers == PRESETS[preset]["num_hidden_layers"]


def test_overrides_reach_the_model_and_the_sections():
    cfg = to_config(
        load(
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "optim.lr=1e-3",
            "parallel=zero2",
            "schedule=wsd",
            "spikes.policy=rollback",
            "parallel.activation_checkpointing=full",
        )
    )
    mc = build_model_config(cfg.model, cfg.parallel.activation_checkpointing)
    assert mc.hidden_size == 64 and mc.activation_checkpointing == "full"
    assert cfg.optim.lr == 1e-3 and cfg.parallel.zero_stage == 2 and cfg.schedule.name.value == "wsd"
    assert cfg.spikes.policy == SpikePolicy.rollback


@pytest.mark.parametrize(
    "override",
    [
        "optim.lrr=1",
        "model.hidden=3",
        "trainer.max_steps=ten",
        "spikes.policy=panic",
        "parallel.precision=fp8",
        "model=nonexistent",
        "bogus=1",
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        load(override)


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.zero_stage=3", "parallel.zero_stage"),
        ("optim.lr=-1", "optim.lr"),
        ("checkpoint.keep_last=0", "keep_last"),
        ("data.seq_len=0", "seq_len"),
        ("model.num_attention_heads=5", "model"),
        ("parallel.activation_checkpointing=some", "activation_checkpointing"),
    ],
)
def test_range_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        cfg = to_config(load(override))
        build_model_config(cfg.model, cfg.parallel.activation_checkpointing)


@pytest.mark.parametrize("override, key", [("+optim.lrr=1e-3", "optim.lrr"), ("+bogus.deep=1", "bogus")])
def test_keys_the_schema_lacks_are_refused_even_with_plus(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: not a setting"):
        to_config(load(override))


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "", "x y", "~"])
def test_run_name_is_one_plain_directory_name(name):
    with pytest.raises(ConfigError, match="^run_name: "):
        to_config(load(f"run_name='{name}'"))
    assert to_config(load("run_name=ok.1_a-b")).run_dir == "runs/ok.1_a-b"


def test_expert_parallel_size_must_divide_the_experts():
    with pytest.raises(
        ConfigError, match="^parallel.expert_parallel_size: 2 does not divide model.num_experts=3"
    ):
        to_config(load("parallel.expert_parallel_size=2", "model.num_experts=3"))
    assert to_config(load("parallel.expert_parallel_size=2", "model.num_experts=4")).model.num_experts == 4


def test_deterministic_refuses_mamba_ssms_scan():
    with pytest.raises(ConfigError, match="^trainer.deterministic: needs a deterministic scan"):
        to_config(load("trainer.deterministic=true", "model.scan_backend=mamba_ssm"))
    assert to_config(load("trainer.deterministic=true")).trainer.deterministic


@pytest.mark.parametrize(
    "override, want",
    [
        ("optim.lrr=1", "optim.lrr: Key 'lrr' not in 'OptimConfig'"),
        ("trainer.max_steps=ten", "trainer.max_steps: Value 'ten'"),
        ("model=nonexistent", "Could not find 'model/nonexistent' Available options in 'model': "),
    ],
)
def test_composition_errors_are_described_in_one_line(override, want):
    with pytest.raises(Exception) as e:
        load(override)
    line = describe(e.value)
    assert want in line and "\n" not in line
