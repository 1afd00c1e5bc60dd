"""End to end on a tiny trained run: train.generate from a run folder, a step_N folder and an export;
export's refusals leave nothing behind; init_from loads an export exactly, refuses another shape in one
line, and yields to the run's own checkpoint."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY, tiny_config
from train_runs import run_train

from jamba import JambaForCausalLM
from jamba.hf_compat import to_hf_state_dict
from train.checkpoint_layout import WEIGHTS_FILE, find_latest
from train.config import ConfigError
from train.export import main as export_main
from train.generate import build_model
from train.generate import main as generate_main
from train.weights import init_from, load_weights, start_from

pytestmark = pytest.mark.timeout(300)
GREEDY = ["--prompt", "The cat", "--max-new-tokens", "12", "--temperature", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-token ops: a second intra-op thread only waits (and spins badly on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    r = run_train(root / "run", [*TINY, "trainer.max_steps=3", "trainer.eval_interval=0"], timeout=200)
    assert r.returncode == 0, r.output[-3000:]
    out = root / "hf"
    assert export_main([str(root / "run"), str(out)]) == 0  # a run folder: its newest checkpoint
    return SimpleNamespace(dir=root / "run", step=find_latest(root / "run" / "checkpoints"), hf=out)


def test_generate_from_run_step_and_export(run, capsys):
    texts = []
    for source in (run.dir, run.step, run.hf):
        assert generate_main([str(source), *GREEDY]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("The cat") and "tokens/s" in out.err
        texts.append(out.out)
    assert texts[0] == texts[1] == texts[2]  # the same weights and ids, from all three forms
    assert generate_main([str(run.dir), *GREEDY, "--no-cache"]) == 0
    assert capsys.readouterr().out == texts[0]
    assert generate_main([str(run.dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_export_files_and_step_folder(run, tmp_path):
    assert export_main([str(run.step), str(tmp_path / "o")]) == 0  # a step_N folder
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "o").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~mask


@pytest.mark.parametrize(
    "change, why",
    [
        ({"layer_pattern": "M*M**M"}, "is not periodic"),
        ({"use_rope": True}, "use_rope=True cannot be exported"),
    ],
)
def test_export_refusals_write_nothing(tmp_path, capsys, change, why):
    cfg = tiny_config(num_hidden_layers=6, layer_pattern="M*MM*M", num_experts=1).replace(**change)
    (tmp_path / "ck").mkdir()
    save_file(to_hf_state_dict(JambaForCausalLM(cfg, seed=0)), str(tmp_path / "ck" / "model.safetensors"))
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert export_main([str(tmp_path / "ck"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert why in err and "python -m train.generate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_init_from_an_export_gives_identical_logits(run):
    trained = build_model(load_weights(run.dir), torch.device("cpu"))
    fresh = JambaForCausalLM(trained.config, seed=123).eval()
    ids = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(fresh(ids).logits, trained(ids).logits)
        init_from(fresh, run.hf)
        assert torch.equal(fresh(ids).logits, trained(ids).logits)
    other = JambaForCausalLM(trained.config.replace(hidden_size=64, num_hidden_layers=4), init=False)
    with pytest.raises(ValueError) as e:
        init_from(other, run.hf)
    assert str(e.value).count("\n") == 0 and "hidden_size 32 there, 64 here" in str(e.value)


def test_init_from_trains_from_the_weights_with_a_fresh_step(run, tmp_path):
    # lr 1e-30: the one step leaves every weight as loaded, so the saved checkpoint must equal the export
    r = run_train(
        tmp_path / "ft",
        [*TINY, "trainer.max_steps=1", "trainer.eval_interval=0", "optim.lr=1e-30", f"init_from={run.hf}"],
        timeout=200,
    )
    assert r.returncode == 0, r.output[-3000:]
    assert "initialised from" in r.output
    ckpt = find_latest(tmp_path / "ft" / "checkpoints")
    assert ckpt.name == "step_00000001"
    got, want = load_file(str(ckpt / WEIGHTS_FILE)), load_file(str(run.step / WEIGHTS_FILE))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    bad = run_train(tmp_path / "bad", [*TINY, "model.hidden_size=64", f"init_from={run.hf}"], timeout=200)
    assert bad.returncode == 2
    assert "ConfigError: init_from=" in bad.output and "hidden_size 32 there, 64 here" in bad.output


def test_init_from_yields_to_the_runs_own_checkpoint(run, caplog):
    model = JambaForCausalLM(load_weights(run.dir).config, seed=5)
    before = model.lm_head.weight.clone()
    with caplog.at_level("INFO"):
        start_from(str(run.hf), model, model.config, "auto", run.step)
    assert "not used: resuming this run's own checkpoint" in caplog.text
    assert torch.equal(model.lm_head.weight, before)
    with pytest.raises(ConfigError, match="both choose the starting weights"):
        start_from(str(run.hf), model, model.config, str(run.step), run.step)


def test_init_from_a_transformers_save(tmp_path):
    """A folder as transformers' save_pretrained writes it (per-expert tensors, its own config.json)."""
    import transformers

    from jamba.hf_compat import config_to_hf

    cfg = tiny_config()
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**config_to_hf(cfg, use_mamba_kernels=False)))
    hf.eval().save_pretrained(tmp_path)
    ours = JambaForCausalLM(cfg, seed=1).eval()
    assert init_from(ours, tmp_path).kind == "transformers"
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
