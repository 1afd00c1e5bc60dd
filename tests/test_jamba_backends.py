"""Kernel backends chosen once at build (jamba/runtime.py): each experts backend that runs on CPU equals the
loop reference, an explicit backend that cannot run is one line naming why, a fallback is logged, and the
trainer's start log names what was chosen."""

import logging

import pytest
import torch
from test_jamba_model import tiny

from jamba import JambaForCausalLM
from jamba.experts import EXPERTS_BACKENDS, Experts, experts_backend_problem, resolve_experts_backend
from jamba.runtime import Runtime, resolve_backends
from train.build import log_kernels

CPU = [
    b
    for b in EXPERTS_BACKENDS
    if b != "auto" and experts_backend_problem(b, "cpu", torch.float32, 32, 48) is None
]


def test_loop_is_always_there_and_auto_on_cpu_is_the_loop():
    assert "loop" in CPU
    assert resolve_experts_backend("auto", "cpu", torch.float32) == ("loop", None)
    assert JambaForCausalLM(tiny(), device_type="cpu", dtype=torch.float32).backends.experts == "loop"


@pytest.mark.parametrize("backend", CPU)
def test_each_cpu_backend_equals_the_loop(backend):
    torch.manual_seed(0)
    ref, got = Experts(4, 32, 48), Experts(4, 32, 48)
    for p in (ref.gate_up_proj, ref.down_proj):
        torch.nn.init.normal_(p, std=0.2)
    got.load_state_dict(ref.state_dict())
    got.backend = backend
    counts = torch.tensor([5, 0, 9, 3])  # an expert without rows
    x = torch.randn(17, 32)
    outs = []
    for m in (ref, got):
        xi = x.clone().requires_grad_()
        y = m(xi, counts)
        y.pow(2).sum().backward()
        outs.append((y, xi.grad, m.gate_up_proj.grad, m.down_proj.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU)
def test_each_cpu_backend_in_the_model_equals_the_loop(backend):
    x = torch.randint(0, 97, (2, 17))
    grads = []
    for b in ("loop", backend):
        m = JambaForCausalLM(tiny(), seed=0, runtime=Runtime(experts_backend=b), device_type="cpu")
        assert m.backends.experts == b
        out = m(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("experts_backend", "grouped_gemm", "runs on CUDA in bf16 only"),
        ("experts_backend", "megablocks", "runs on CUDA in bf16 only"),
        ("scan_backend", "mamba_ssm", "needs the mamba-ssm package and a CUDA device"),
        ("conv_backend", "causal_conv1d", "needs the causal-conv1d package and a CUDA device"),
        ("experts_backend", "fast", "must be auto|grouped_mm|grouped_gemm|loop|megablocks"),
    ],
)
def test_an_explicit_backend_that_cannot_run_is_one_line(field, value, why):
    with pytest.raises(ValueError) as e:
        JambaForCausalLM(tiny(), runtime=Runtime(**{field: value}), device_type="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert msg.startswith(f"runtime.{field}") and why in msg and "\n" not in msg


def test_a_fallback_is_logged_never_silent(monkeypatch, caplog):
    # on a GPU without a usable grouped matmul (here: the probe fails) and without grouped_gemm, auto takes
    # the loop and says why
    import jamba.experts as ex

    monkeypatch.setattr(ex, "_grouped_mm_problem", lambda *a: "torch._grouped_mm fails here")
    monkeypatch.setattr(ex, "_gg", None)
    b = resolve_backends(Runtime(scan_backend="torch", conv_backend="torch"), "cuda", torch.bfloat16)
    assert b.experts == "loop"
    assert b.notes == (
        "experts: grouped_mm: torch._grouped_mm fails here; grouped_gemm: the grouped_gemm package is not "
        "installed: using loop",
    )
    m = JambaForCausalLM(
        tiny(), runtime=Runtime(scan_backend="torch", conv_backend="torch"), device_type="cpu"
    )
    with caplog.at_level(logging.WARNING, logger="jamba.runtime"):
        from jamba.runtime import apply_runtime

        apply_runtime(m, Runtime(scan_backend="torch", conv_backend="torch"), "cuda", torch.bfloat16)
    assert "experts: grouped_mm: torch._grouped_mm fails here" in caplog.text


def test_the_choice_is_logged_at_start(caplog):
    m = JambaForCausalLM(tiny(), runtime=Runtime(experts_backend=CPU[-1]), device_type="cpu")
    with caplog.at_level(logging.INFO, logger="train.build"):
        log_kernels(m)
    assert f"selective scan torch, causal conv torch, experts {CPU[-1]} (on cpu)" in caplog.text
