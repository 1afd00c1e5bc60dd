import pytest
import torch
from test_jamba_model import tiny

from jamba import JambaConfig, JambaForCausalLM, get_preset
from jamba.counting import SCAN_FLOPS_PER_STATE, count_params, flops_per_token, mfu
from jamba.presets import PRESETS


def module_counts(cfg: JambaConfig, device: str = "cpu") -> tuple[int, int, list[int]]:
    """(total, active, per-layer totals) read off the built module; active removes the unused experts."""
    with torch.device(device):
        m = JambaForCausalLM(cfg, init=False)
    total = sum(p.numel() for p in m.parameters())  # a tied weight is yielded once
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in m.model.layers]
    inactive = sum(
        (cfg.num_experts - cfg.num_experts_per_tok) * layer.feed_forward.experts.gate_up_proj[0].numel()
        + (cfg.num_experts - cfg.num_experts_per_tok) * layer.feed_forward.experts.down_proj[0].numel()
        for layer in m.model.layers
        if layer.is_moe
    )
    return total, total - inactive, per_layer


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(tie_word_embeddings=True),
        tiny(mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=5, mamba_expand=3, mamba_d_conv=3),
        tiny(num_experts=1, num_experts_per_tok=1),
        tiny(num_hidden_layers=5, layer_pattern="*E M ME *E M", num_experts=8, num_experts_per_tok=1),
        get_preset("debug"),
    ],
    ids=["untied", "tied", "mamba_biases", "dense", "pattern", "debug"],
)
def test_counts_equal_built_module(cfg):
    c = count_params(cfg)
    total, active, per_layer = module_counts(cfg)
    assert c["total"] == total
    assert c["active"] == active
    assert [layer["total"] for layer in c["per_layer"]] == per_layer
    assert c["embedding"] == cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert c["total"] == c["embedding"] + c["non_embedding"]
    assert c["active"] == c["embedding"] + c["active_non_embedding"]


def test_hand_count_of_one_small_config():
    # vocab 100, hidden 16, ffn 24, 2 layers: 0 = Mamba + dense MLP, 1 = attention + MoE (4 experts, top-2).
    cfg = JambaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=4,
        mamba_d_conv=4,
        mamba_expand=2,
    )  # dt_rank = ceil(16 / 16) = 1, d_inner 32
    embed = 100 * 16
    mamba = (
        16 * 64  # in_proj [2 * 32, 16]
        + 32 * 1 * 4  # conv1d.weight [32, 1, 4]
        + 32  # conv1d.bias
        + (1 + 2 * 4) * 32  # x_proj [dt_rank + 2 * d_state, 32]
        + 32 * 1
        + 32  # dt_proj weight [32, 1] + bias
        + 32 * 4  # A_log [32, 4]
        + 32  # D
        + 16 * 32  # out_proj [16, 32]
        + 1
        + 4
        + 4
    )  # dt / b / c layernorms
    assert mamba == 2217
    mlp = 24 * 16 + 24 * 16 + 16 * 24  # gate, up, down
    layer0 = mamba + mlp + 16 + 16  # + input_layernorm + pre_ff_layernorm
    attn = 16 * 16 + 8 * 16 + 8 * 16 + 16 * 16  # q, k, v (2 KV heads of 4), o
    router = 4 * 16
    experts = 4 * (2 * 24) * 16 + 4 * 16 * 24  # gate_up_proj [4, 48, 16], down_proj [4, 16, 24]
    layer1 = attn + router + experts + 16 + 16
    layer1_active = attn + router + 2 * (2 * 24 * 16 + 16 * 24) + 16 + 16
    final_norm, lm_head = 16, 100 * 16
    assert (layer0, layer1, layer1_active) == (3401, 5472, 3168)

    c = count_params(cfg)
    assert c["total"] == embed + layer0 + layer1 + final_norm + lm_head == 12089
    assert c["active"] == embed + layer0 + layer1_active + final_norm + lm_head == 9785
    assert [p["total"] for p in c["per_layer"]] == [layer0, layer1]
    assert count_params(cfg.replace(tie_word_embeddings=True))["total"] == 12089 - lm_head
    assert module_counts(cfg)[:2] == (12089, 9785)

    # FLOPs per token at seq_len 10, training (x3).
    matmul_params = (
        100 * 16  # lm_head
        + 16 * 64
        + 32 * 4
        + 9 * 32
        + 32
        + 16 * 32  # Mamba in, conv, x, dt, out
        + mlp
        + attn
        + router
        + 2 * (48 * 16 + 16 * 24)
    )
    f = flops_per_token(cfg, seq_len=10)
    assert f["matmul_params"] == matmul_params == 7872
    assert f["matmul"] == 3 * 2 * 7872
    assert f["attention"] == 3 * 1 * 2 * 2 * (10 / 2) * 16  # QK^T and AV over 5 keys on average (causal)
    assert f["selective_scan"] == 3 * 1 * SCAN_FLOPS_PER_STATE * 32 * 4
    assert f["total"] == 47232 + 960 + 2688
    fwd = flops_per_token(cfg, seq_len=10, training=False)
    assert fwd["total"] * 3 == f["total"]


def test_flops_reduce_to_palm_formula_for_dense_attention():
    cfg = tiny(attn_layer_period=1, attn_layer_offset=0, num_experts=1)
    T = 128
    f = flops_per_token(cfg, T, training=True, causal=False)
    n = cfg.num_hidden_layers
    assert f["selective_scan"] == 0
    assert f["total"] == 6 * f["matmul_params"] + 12 * n * cfg.hidden_size * T
    assert flops_per_token(cfg, T, causal=True)["attention"] == f["attention"] / 2


def test_mfu():
    cfg = get_preset("bench")
    per_token = flops_per_token(cfg, 4096)["total"]
    assert mfu(1e4, cfg, 4096, peak_flops=2 * 1e4 * per_token) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, cfg, 4096, peak_flops=0)


def test_bench_preset_is_2_47b():
    c = count_params(get_preset("bench"))
    assert c["total"] == pytest.approx(2.47e9, abs=0.01e9), (
        f"bench preset has {c['total'] / 1e9:.4f}B parameters, not 2.47B: benchmark figures stop comparing"
    )


def test_jamba_v01_is_52b_total_12b_active():
    c = count_params(get_preset("jamba-v0.1"))
    assert c["total"] == pytest.approx(51.6e9, abs=0.1e9)
    assert c["active"] == pytest.approx(12.1e9, abs=0.1e9)  # 11.6B without the two embedding matrices
    assert c["active_non_embedding"] == pytest.approx(11.6e9, abs=0.1e9)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_equal_module_on_meta(name):
    cfg = get_preset(name)
    total, active, per_layer = module_counts(cfg, device="meta")
    c = count_params(cfg)
    assert (c["total"], c["active"]) == (total, active)
    assert [layer["total"] for layer in c["per_layer"]] == per_layer
