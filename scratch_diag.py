import sys, torch
sys.path.insert(0, "tests")
from test_jamba_model import tiny
from jamba import JambaForCausalLM
from jamba.moe import SparseMoE
torch._dynamo.reset()
cfg = tiny(hidden_size=64, intermediate_size=128, activation_checkpointing="mamba")
ref = JambaForCausalLM(cfg, seed=0).cuda()
eager = JambaForCausalLM(cfg, seed=0).cuda(); eager.load_state_dict(ref.state_dict())
comp = JambaForCausalLM(cfg, seed=0).cuda(); comp.load_state_dict(ref.state_dict()); comp.compile_layers()
x = torch.randint(0, 97, (2, 257), device="cuda")
logs = {}
def hook_all(m, tag):
    for name, mod in m.named_modules():
        if isinstance(mod, SparseMoE):
            def h(mod_, inp, out, name=name):
                logs.setdefault(tag, {}).setdefault(name, []).append(out.detach().float())
            mod.router.register_forward_hook(h)
for m, tag in ((ref, "fp32"), (eager, "eager"), (comp, "comp")):
    hook_all(m, tag)
def grads(m, ac):
    with torch.autocast("cuda", torch.bfloat16, enabled=ac):
        out = m(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}
lr, gr = grads(ref, False); le, ge = grads(eager, True); lc, gc = grads(comp, True)
print("loss", lr, le, lc)
rel = lambda a, b: float((a - b).norm() / b.norm().clamp(min=1e-8))
for n in gr:
    a, b = rel(gc[n], gr[n]), rel(ge[n], gr[n])
    if a > 2 * b + 1e-3 or "layers.3" in n or "layers.2" in n:
        print(f"{n:60s} comp {a:.4f} eager {b:.4f}", "  <-- WORSE" if a > 2 * b + 1e-3 else "")
k = cfg.num_experts_per_tok
for name in logs["fp32"]:
    lf = logs["fp32"][name][0]
    for tag in ("eager", "comp"):
        if name not in logs.get(tag, {}):
            print(name, tag, "no log"); continue
        lt = logs[tag][name][0]
        sf = torch.topk(lf, k, -1).indices.sort(-1).values; st = torch.topk(lt, k, -1).indices.sort(-1).values
        print(f"{name} {tag}: logits rel {rel(lt, lf):.2e}, tokens routed differently {(sf != st).any(-1).float().mean():.4f}, dtype-in {lt.dtype}")
