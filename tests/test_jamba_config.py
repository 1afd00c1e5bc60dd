import pytest

from jamba import JambaConfig, get_preset, parse_pattern, pattern_from_periods, periods_from_pattern
from jamba.presets import PRESETS


def test_defaults_match_transformers_layout():
    cfg = JambaConfig()
    assert cfg.mamba_dt_rank == 256
    assert cfg.layers_block_type.count("attention") == 4
    assert cfg.layers_block_type[4] == "attention" and cfg.layers_block_type[3] == "mamba"
    assert cfg.layers_is_moe[1] and not cfg.layers_is_moe[0]


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(attn_layer_offset=8), "attn_layer_offset"),
        (dict(expert_layer_offset=2), "expert_layer_offset"),
        (dict(num_attention_heads=3), "num_attention_heads"),
        (dict(num_key_value_heads=5), "num_key_value_heads"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(layer_pattern="MMX"), "layer_pattern"),
        (dict(layer_pattern="MM"), "layer_pattern"),
        (dict(mamba_dt_rank=-1), "mamba_dt_rank"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        JambaConfig(**changes)


def test_pattern_roundtrip():
    p = pattern_from_periods(8, 8, 4, 2, 1)
    assert p == "MMEMME*MEMME"
    cfg = JambaConfig(num_hidden_layers=8, layer_pattern="M ME M ME | *E M ME M")
    assert cfg.layers_block_type == ["mamba"] * 4 + ["attention"] + ["mamba"] * 3
    assert cfg.layers_is_moe == [False, True, False, True, True, False, True, False]
    assert periods_from_pattern(p) == dict(
        attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, has_moe=True
    )
    assert periods_from_pattern("M*M*MM") is None  # not periodic
    assert parse_pattern("*E") == [("*", True)]


def test_periods_and_pattern_agree():
    a = JambaConfig(num_hidden_layers=16, attn_layer_period=4, attn_layer_offset=1)
    b = JambaConfig(num_hidden_layers=16, layer_pattern=a.pattern)
    assert a.layers_block_type == b.layers_block_type and a.layers_is_moe == b.layers_is_moe


def test_presets_build_and_unknown_name():
    for name in PRESETS:
        get_preset(name)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("nope")


def test_from_dict_rejects_unknown_keys():
    d = JambaConfig().to_dict()
    assert JambaConfig.from_dict(d) == JambaConfig()
    d["hiden_size"] = 3
    with pytest.raises(ValueError, match="hiden_size"):
        JambaConfig.from_dict(d)


def test_saved_config_holds_one_layout():
    """model_config.json (to_dict) holds the pattern alone, whichever form the config was written in."""
    cfg = JambaConfig(num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4)
    d = cfg.to_dict()
    assert d["layer_pattern"] == "MMEMME*MEMME"
    assert [
        d[k] for k in ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")
    ] == [None] * 4
    back = JambaConfig.from_dict(d)
    assert back == cfg and back.layers_block_type == cfg.layers_block_type and back.pattern == cfg.pattern
    other = JambaConfig(num_hidden_layers=8, layer_pattern="MME*MEMMEMME")
    assert other != cfg  # equality is the model, not the form
    assert (
        other.to_dict()["attn_layer_period"] is None
    )  # not the stale 8 / 4 beside a pattern that moves attention
    # a config saved before (periods beside a pattern): the pattern wins, as it always did
    old = {
        **other.to_dict(),
        "attn_layer_period": 8,
        "attn_layer_offset": 4,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    }
    assert JambaConfig.from_dict(old) == other
    with pytest.raises(ValueError, match="attn_layer_period: must be a positive int"):
        JambaConfig(attn_layer_period=None)  # periods may be None only beside a pattern


def test_pattern_alphabet_comes_from_the_registry():
    with pytest.raises(ValueError, match=r"unexpected 'X' at position 1.*'S' \(mamba2\)"):
        parse_pattern("MX")
    assert parse_pattern("S*E") == [("S", False), ("*", True)]
    assert pattern_from_periods(4, 4, 2, 2, 1, mixer="S") == "SSE*SE"
    assert periods_from_pattern("SS*S") is None  # transformers' periods cannot place Mamba-2


def test_old_model_config_with_runtime_keys_loads(caplog):
    # model_config.json files written before the runtime settings left JambaConfig still load; the keys are
    # dropped with a note, the weights' fields kept
    old = {
        **JambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to_dict(),
        "activation_checkpointing": "full",
    }
    old.update(use_kernels=False, scan_backend="torch", loss_chunk_size=7, ff_chunk_size=3)
    with caplog.at_level("INFO", logger="jamba.config"):
        cfg = JambaConfig.from_dict(old)
    assert cfg.hidden_size == 64 and not hasattr(cfg, "loss_chunk_size")
    assert "ignoring activation_checkpointing" in caplog.text
    with pytest.raises(ValueError, match="unknown keys"):
        JambaConfig.from_dict({**old, "nonsense": 1})
