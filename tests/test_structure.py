"""The code's shape, checked: no import cycles, dvc.yaml's code deps true to what each stage imports, short
functions. Imports are read from the source (module-level and inside functions alike: both run)."""

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT, STAGES

PACKAGES = ("tasks", "flows")


def module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    if path.exists():
        return path
    init = ROOT / name.replace(".", "/") / "__init__.py"
    return init if init.exists() else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imported(path: Path) -> set[str]:
    """The project modules a file imports (`from tasks import x` counts as tasks.x when x is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {module_name(p): imported(p) for p in files}


def closure(module: str) -> set[Path]:
    """The files a module runs: itself, what it imports (transitively), and the packages they are in."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(imported(path))
    return seen


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle found by a depth-first walk, as the modules around it."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_cycle_is_found():
    """The check can fail: modules that import each other (directly or around three) are reported."""
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_dvc_yaml_code_deps_are_what_each_stage_runs():
    """DVC reruns a stage when a dependency changes: a module the stage imports but dvc.yaml does not list
    would let a stale result look up to date."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name in STAGES:
        module = stages[name]["cmd"].split("-m ", 1)[1].split()[0]
        deps = [ROOT / d for d in stages[name]["deps"] if isinstance(d, str) and not d.startswith("$")]
        needed = closure(module)
        lacking = sorted(str(p.relative_to(ROOT)) for p in needed if not any(p == d or d in p.parents for d in deps))
        if lacking:
            missing[name] = lacking
        assert all(d.exists() for d in deps), f"{name}: dvc.yaml lists deps that do not exist"
    assert missing == {}, f"dvc.yaml misses modules its stages import: {missing}"


def test_functions_are_short():
    """No function in tasks/ or flows/ over 60 lines; the training loop's epoch loop (Trainer.fit) reads in one screen."""
    long = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_the_settings_reference_is_generated_and_current():
    """docs/settings.md is generated from the settings' descriptions: regenerate it when they change
    (python -m tasks.settings reference > docs/settings.md)."""
    from tasks.settings import reference

    assert (ROOT / "docs/settings.md").read_text() == reference(ROOT / "params.yaml"), "docs/settings.md is stale"
