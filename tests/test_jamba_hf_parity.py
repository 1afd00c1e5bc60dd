"""Our model against transformers' JambaForCausalLM on identical weights (fp32, CPU).

Tolerance: torch.testing.assert_close(rtol=1e-4, atol=1e-5 * max|reference logits|), i.e. every logit
within 1e-4 relative or 1e-5 of the logit scale; the max relative error (max |ours - ref| / max |ref|) is
printed (`pytest -s`). transformers' Mamba runs its pure-PyTorch sequential scan here, ours the chunked
scan; attention is transformers' eager path against our SDPA.
"""

import json
import subprocess
import sys

import pytest
import torch
import transformers  # pinned in the test extra: a broken install fails here
from tiny import tiny_config
from transformers.models.jamba.modeling_jamba import load_balancing_loss_func

from jamba import JambaConfig, JambaForCausalLM
from jamba.hf_compat import (
    config_from_hf,
    config_to_hf,
    from_pretrained_dir,
    load_hf_state_dict,
    read_safetensors_dir,
    save_pretrained_dir,
    to_hf_state_dict,
)
from train.export import main as export_main

VOCAB = 101


def tiny(**kw) -> JambaConfig:
    """The tiny model, wider, with transformers' default layout (attention period 8, offset 4)."""
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, attn_layer_period=8, attn_layer_offset=4
    )
    return tiny_config(**{**base, **kw})


CONFIGS = {
    # attention in every layer, dense feed-forwards
    "attention_only": tiny(num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0, num_experts=1),
    # written as a pattern: exported as attention period 3 / offset 2, never reached
    "mamba_only": tiny(num_hidden_layers=2, layer_pattern="MM", num_experts=1),
    # the paper's block: 1 attention : 7 Mamba, MoE every other layer (4 MoE layers)
    "hybrid_1to7_moe": tiny(
        num_hidden_layers=8,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
    ),
    # attention at 1, experts at 2 only: exactly one MoE layer
    "offsets": tiny(
        num_hidden_layers=4,
        attn_layer_period=4,
        attn_layer_offset=1,
        expert_layer_period=3,
        expert_layer_offset=2,
    ),
    "tied": tiny(
        num_hidden_layers=4,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        tie_word_embeddings=True,
    ),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, including those transformers initialises deterministically (A_log, D,
    dt_proj.bias, norms), at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
        elif name.endswith(".D"):
            p.copy_(r)
        elif name.endswith("dt_proj.bias"):
            p.copy_(r - 2)  # softplus(dt) spread around 0.1
        elif p.ndim == 1:
            p.copy_(1 + 0.2 * r)  # norm weights, conv bias
        else:
            p.copy_(r * p.shape[-1] ** -0.5)


def hf_model(cfg: JambaConfig, seed: int = 0):
    hc = transformers.JambaConfig.from_dict(
        config_to_hf(cfg, use_mamba_kernels=False), attn_implementation="eager"
    )
    m = transformers.JambaForCausalLM(hc).eval()
    randomize(m, seed)
    return m


def ours_from(hf) -> JambaForCausalLM:
    cfg = config_from_hf(hf.config.to_dict())
    m = JambaForCausalLM(cfg, init=False).eval()
    load_hf_state_dict(m, hf.state_dict())
    return m


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, label: str) -> float:
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"\n[parity] {label}: max relative error {rel:.2e} (logit scale {ref.abs().max().item():.2f})")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    return rel


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_and_weights_round_trip(name):
    cfg = CONFIGS[name]
    hf = hf_model(cfg)
    ours = ours_from(hf)
    assert ours.config.pattern == cfg.pattern
    x = inputs()
    has_moe = any(cfg.layers_is_moe)
    with torch.no_grad():
        ref = hf(x, output_router_logits=has_moe)
        out = ours(x)
    assert_logits_close(out.logits, ref.logits, name)

    # Back to transformers' names: exactly the original tensors (lm_head absent when tied).
    back, orig = to_hf_state_dict(ours), hf.state_dict()
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in back and ours.lm_head.weight is ours.model.embed_tokens.weight
        orig.pop("lm_head.weight")
    assert back.keys() == orig.keys()
    for k in orig:
        assert torch.equal(back[k], orig[k]), k

    if has_moe:
        # transformers pools every MoE layer's counts and probabilities into one loss; we average
        # per-layer losses. Each per-layer loss is transformers' function on that layer alone.
        E, k = cfg.num_experts, cfg.num_experts_per_tok
        per_layer = [load_balancing_loss_func((lg,), E, k) for lg in ref.router_logits]
        torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean(), rtol=1e-5, atol=1e-7)
        if len(per_layer) == 1:
            torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-7)
        print(f"[aux] {name}: ours {out.aux_loss.item():.6f} transformers {ref.aux_loss.item():.6f}")


def test_save_pretrained_dir_loads_in_transformers(tmp_path):
    cfg = CONFIGS["hybrid_1to7_moe"]
    hf_ref = hf_model(cfg, seed=1)
    ours = ours_from(hf_ref)
    files = save_pretrained_dir(ours, tmp_path / "m")
    assert files == ["config.json", "model.safetensors"]
    hf, info = transformers.JambaForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = inputs(1)
    with torch.no_grad():
        assert_logits_close(ours(x).logits, hf.eval()(x).logits, "save_pretrained_dir -> transformers")

    # The fused expert layout and a sharded folder load too (state dicts equal: same logits).
    save_pretrained_dir(ours, tmp_path / "fused", expert_layout="fused", max_shard_size=200_000)
    assert (tmp_path / "fused" / "model.safetensors.index.json").is_file()
    hf2, info = transformers.JambaForCausalLM.from_pretrained(tmp_path / "fused", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = hf.state_dict()
    for key, t in hf2.state_dict().items():
        assert torch.equal(t, ref[key]), key
    # ... and ours reads both back.
    for folder in ("m", "fused"):
        again = from_pretrained_dir(tmp_path / folder)
        got, want = again.state_dict(), ours.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_from_pretrained_dir_reads_transformers_save(tmp_path):
    cfg = CONFIGS["tied"]
    hf = hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path)  # per-expert tensors, no lm_head (tied)
    assert any(".experts.0.gate_proj.weight" in k for k in read_safetensors_dir(tmp_path))
    ours = from_pretrained_dir(tmp_path)
    assert ours.config.tie_word_embeddings
    back = to_hf_state_dict(ours)
    for k, t in hf.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(back[k], t), k


def test_export_cli(tmp_path):
    cfg = CONFIGS["offsets"]
    ours = JambaForCausalLM(cfg, seed=0)
    # A plain state dict + our config.json, as a .pt file.
    (tmp_path / "ckpt").mkdir()
    torch.save(ours.state_dict(), tmp_path / "ckpt" / "model.pt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert export_main([str(tmp_path / "ckpt" / "model.pt"), str(tmp_path / "out")]) == 0
    hf, info = transformers.JambaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = to_hf_state_dict(ours)
    for k, t in hf.state_dict().items():
        assert torch.equal(t, ref[k]), k

    # The folder holding it works the same.
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "out_from_dir")]) == 0

    # A DeepSpeed checkpoint folder with the consolidated files the trainer writes; bf16 output.
    from safetensors.torch import save_file

    tag = tmp_path / "ds" / "global_step7"
    tag.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step7\n")
    save_file(
        {k: v.contiguous() for k, v in to_hf_state_dict(ours).items()}, str(tag / "model_state.safetensors")
    )
    (tag / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    assert export_main([str(tmp_path / "ds"), str(tmp_path / "out_ds"), "--dtype", "bfloat16"]) == 0
    sd = read_safetensors_dir(tmp_path / "out_ds")
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert json.loads((tmp_path / "out_ds" / "config.json").read_text())["dtype"] == "bfloat16"
    # Re-exporting a model folder works (case 1).
    assert export_main([str(tmp_path / "out"), str(tmp_path / "out2")]) == 0


def test_export_cli_errors(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "latest").write_text("step3")
    assert export_main([str(tmp_path / "ds"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed" in err and "model_state.safetensors" in err
    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
    # A state dict that does not fit its config: nothing written, the tensor named.
    cfg = CONFIGS["attention_only"]
    sd = JambaForCausalLM(cfg, seed=0).state_dict()
    sd["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    (tmp_path / "bad").mkdir()
    torch.save({"model": sd}, tmp_path / "bad" / "model.pt")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert export_main([str(tmp_path / "bad"), str(tmp_path / "o")]) == 2
    assert "model.layers.1.self_attn.q_proj.weight expected [64, 64] got [3, 3]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    help_text = subprocess.run(
        [sys.executable, "-m", "jamba.export", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "checkpoint" in help_text and "output_dir" in help_text and "--dtype" in help_text


def test_bad_state_dicts_name_the_tensor():
    cfg = CONFIGS["offsets"]
    m = JambaForCausalLM(cfg, seed=0)
    good = to_hf_state_dict(m)

    sd = dict(good)
    del sd["model.layers.2.feed_forward.experts.down_proj"]
    with pytest.raises(
        ValueError, match=r"missing \(1\): model\.layers\.2\.feed_forward\.experts\.down_proj \[4, 64, 96\]"
    ):
        load_hf_state_dict(m, sd)

    sd = {**good, "model.layers.0.mamba.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected \(1\): model\.layers\.0\.mamba\.extra\.weight \[3\]"):
        load_hf_state_dict(m, sd)

    sd = {**good, "model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight expected \[32, 64\] got \[64, 64\]"
    ):
        load_hf_state_dict(m, sd)

    # All problems at once, in one error.
    sd = {k: v for k, v in good.items() if k != "lm_head.weight"}
    sd["model.layers.0.mamba.A_log"] = torch.zeros(1)
    sd["bogus"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_hf_state_dict(m, sd)
    assert all(s in str(e.value) for s in ("lm_head.weight", "A_log", "bogus"))

    # Tied: an lm_head equal to the embedding is accepted, a different one is not.
    t = JambaForCausalLM(CONFIGS["tied"], seed=0)
    sd = to_hf_state_dict(t)
    load_hf_state_dict(t, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf_state_dict(t, {**sd, "lm_head.weight": torch.zeros_like(sd["model.embed_tokens.weight"])})


def test_config_conversion():
    # Defaults agree with transformers' (a key absent from config.json means the same on both sides).
    hf_default = transformers.JambaConfig().to_dict()
    assert config_from_hf(hf_default) == JambaConfig()
    assert config_from_hf({}) == JambaConfig()
    for name, cfg in CONFIGS.items():
        d = config_to_hf(cfg)
        assert d["model_type"] == "jamba" and d["architectures"] == ["JambaForCausalLM"]
        hc = transformers.JambaConfig.from_dict(d)
        assert hc.layers_block_type == cfg.layers_block_type, name
        assert [e > 1 for e in hc.layers_num_experts] == cfg.layers_is_moe, name
        back = config_from_hf(d)
        assert back.pattern == cfg.pattern and back.replace(layer_pattern=None) == back
    cfg = tiny(mamba_dt_min=0.002, router_z_loss_coef=0.01)
    assert config_from_hf(config_to_hf(cfg)) == cfg

    with pytest.raises(ValueError, match="not periodic"):
        config_to_hf(tiny(num_hidden_layers=6, layer_pattern="M*M*MM"))
    with pytest.raises(ValueError, match="use_rope"):
        config_to_hf(tiny(use_rope=True))
    with pytest.raises(ValueError, match="head_dim"):
        config_from_hf({**config_to_hf(tiny()), "head_dim": 32})
    with pytest.raises(ValueError, match="sliding_window"):
        config_from_hf({"sliding_window": 4096})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "mamba"})
    with pytest.raises(ValueError, match=r"unknown keys \['mystery_knob'\]"):
        config_from_hf({"mystery_knob": 1})
    assert config_from_hf({"mystery_knob": 1}, ignore_unknown=True) == JambaConfig()
    # Keys of the hub's Jamba-v0.1 config.json (remote-code era included) that do not affect the weights.
    hub = config_from_hf(
        {
            "num_local_experts": 8,
            "use_mamba_kernels": True,
            "torch_dtype": "bfloat16",
            "use_cache": False,
            "sliding_window": None,
            "num_logits_to_keep": 1,
            "n_ctx": 1024,
            "calc_logits_for_entire_prompt": False,
            "mamba_inner_layernorms": True,
            "auto_map": {},
            "transformers_version": "4.40.0.dev0",
        }
    )
    assert (hub.num_experts, hub.max_position_embeddings) == (8, 1024)
    with pytest.raises(ValueError, match="mamba_inner_layernorms"):
        config_from_hf({"mamba_inner_layernorms": False})
