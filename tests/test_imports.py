"""The import graph of our packages, read from the source with `ast` (nothing is imported): no cycles between
modules, no private name imported from another package, jamba/ free of torch.distributed.

Every import counts, also one inside a function: a cycle hidden behind a late import is still two files that
each need the other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "jamba", "launch", "parallel", "train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module of ours, names taken from it) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in known:
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{target}.{n}" in known]  # `from pkg import submodule`
            out += [(f"{target}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest:
                out.append((target, rest))
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the modules of ours it imports; (importer, module, name) of every private name imported."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, path in mods.items():
        for target, names in _imports(m, path, known):
            if target != m:
                graph[m].add(target)
            private += [(m, target, n) for n in names if n.startswith("_") and not n.startswith("__")]
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 50  # the packages were found
    assert cycles(graph) == []


def test_no_private_names_imported_from_another_package():
    _, private = import_graph()
    across = [f"{m} imports {n} from {t}" for m, t, n in private if m.split(".")[0] != t.split(".")[0]]
    assert across == []


def test_jamba_does_not_import_torch_distributed():
    bad = []
    for p in sorted((ROOT / "jamba").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad += [f"{p.name}: {n}" for n in names if n.startswith("torch.distributed")]
    assert bad == []
