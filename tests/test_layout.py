"""pipeline/ imports one way: every `import` of a pipeline module (top level or inside a
function) goes to its own layer or a lower one, and the module graph has no circle.

Layers, low to high: core (config schema, checks, distributed, lock) < data (template, tokenizer,
loader) < train | eval (siblings: neither imports the other) < stages < __main__ (the CLI).
"""

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
LAYER = {"core": 0, "data": 1, "train": 2, "eval": 2, "stages": 3, "__main__": 4}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PIPELINE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """The pipeline modules `path` imports, as dotted names (`from pipeline.x import y` counts
    `pipeline.x.y` when that is a module, else `pipeline.x`)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "pipeline" and m in MODULES}


def _layer(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself (empty __init__)
    return parts[1], LAYER[parts[1]]


FILES = {_module(p): p for p in PIPELINE.rglob("*.py") if "tasks" not in p.parts}
MODULES = set(FILES)
GRAPH = {m: _imports(p, m) for m, p in FILES.items()}


def test_every_module_has_a_layer():
    assert "pipeline.core.config" in MODULES and "pipeline.train.trainer" in MODULES  # the walk found them
    top = {m.split(".")[1] for m in MODULES if "." in m}
    assert top <= set(LAYER), f"folders without a layer: {top - set(LAYER)} (add them to LAYER)"


def test_no_upward_or_sideways_import():
    bad = []
    for m, deps in GRAPH.items():
        here = _layer(m)
        for d in deps:
            there = _layer(d)
            if here is None or there is None or here[0] == there[0]:
                continue
            if there[1] > here[1] or (there[1] == here[1]):
                bad.append(f"{m} ({here[0]}) imports {d} ({there[0]})")
    assert not bad, "imports against the layer order core < data < train|eval < stages < __main__:\n" + "\n".join(
        sorted(bad)
    )


def _circles(graph: dict) -> list[list[str]]:
    """Every circle a depth-first walk of `graph` (module -> imported modules) meets."""
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                circles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return circles


def test_no_import_circle():
    circles = _circles(GRAPH)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_walk_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks above can fail: the same walk over made-up modules."""
    (tmp_path / "a.py").write_text("from pipeline.stages import x\n")
    up = _imports(tmp_path / "a.py", "pipeline.core.a")
    assert "pipeline.stages" in up and _layer("pipeline.stages")[1] > _layer("pipeline.core.a")[1]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_config_is_torch_free():
    """`python -m pipeline` rejects a bad config before torch is imported (about 2 s)."""
    import subprocess
    import sys

    heavy = "{'torch', 'transformers'}"
    code = f"import sys, pipeline.core.config, pipeline.stages; print(sorted({heavy} & sys.modules.keys()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PIPELINE.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
