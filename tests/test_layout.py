"""The package's layout, read from its import lines: no cycle, and every import points down the flow.

The flow is recipe -> plan -> formats / methods / kernels -> pipeline -> output -> the public API and
the commands. A module may import what comes before it in that flow (the planner reads the recipe;
the pipeline runs a plan) and the shared leaves below everything (errors, dtypes, tensor names), never
what comes after it: the planner knows nothing of the pipeline, a format nothing of the planner, a
kernel nothing of formats. Imports inside functions count too (they are how a cycle hides).

    python -m pytest tests/test_layout.py       # the check; it prints the offending import lines
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_mlx"

# layer of each top-level module or package: a module imports only from layers below its own,
# or from its own package (a package's modules may import each other, without a cycle)
LAYERS = {
    "errors": 0,
    "dtypes": 0,
    "names": 0,
    "digest": 0,
    "mlx_lm_config": 0,  # imports nothing of the package; the GGUF writer reads RoPE through it
    "device": 1,
    "distributed": 1,  # the processes of a run under mlx.launch and their exchanges (imports only errors)
    "recipe": 1,
    "kernels": 2,
    "methods": 3,
    "formats": 3,
    "adapters": 4,  # LoRA adapters read and applied over any format's reader; the planner and hub.py use them
    "chat_template": 4,
    "options": 4,
    "vocab": 5,
    "hub": 5,
    "plan": 6,
    "pipeline": 7,
    "output": 8,
    "merge": 9,
    "arguments": 9,
    "convert": 10,
    "extract_lora": 10,
    "lora_merge": 10,
    "evaluate": 10,
    "run": 10,
    "example": 11,
    "evolve": 11,  # merge search: merges in memory, scores with evaluate and lm-eval, writes through output
    "moe": 11,  # mixture of experts from dense models: reads through formats/adapters, writes through output
    "cli": 12,
    "__init__": 13,
    "__main__": 13,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import of the package in the file, nested ones included."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("mergekit_mlx")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mergekit_mlx"):
                continue
            # `from . import x` / `from .kernels import cpu_native` may name submodules
            names = [f"{target}.{a.name}" for a in node.names]
            found += [(n if _is_module(n) else target, node.lineno) for n in names]
    return found


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


@functools.cache
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges.setdefault(module_name(path), set()).update(t for t, _ in imports_of(path))
    return edges


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in graph()} - set(LAYERS))
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_the_import_graph_has_no_cycle():
    modules = graph()
    edges = {m: {t for t in ts if t in modules} for m, ts in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_import_points_down_the_flow():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for target, line in imports_of(path):
            a, b = top(me), top(target)
            if a == b:
                continue  # within one package (cycles are the other test's business)
            if LAYERS.get(b, -1) >= LAYERS.get(a, 99):
                wrong.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {me} (layer {LAYERS.get(a)}) imports {target} (layer {LAYERS.get(b)})"
                )
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mergekit_mlx")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {me} imports {a.name}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)
