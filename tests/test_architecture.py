"""The architecture's rules, checked on the source (fast: no ranks, one fresh interpreter).

* Importing the CORE (``parallel``, ``sharding``, ``strategies``, ``layers``, ``costmodel``, ``testing``,
  ``seqshard`` while it exists, and ``ds_twolevel`` itself) pulls in none of deepspeed, transformers,
  accelerate, hf_integration.
* No core module imports the integration layer (``ds_twolevel.deepspeed``, ``tools``, ``accelerate``,
  ``hf_trainer``, ``guard``) or hf_integration, at any level, even inside a function; only the
  integration layer imports hf_integration. ``ds_twolevel/__init__.py`` is the public facade: it
  re-exports the DeepSpeed entry points (``ds_twolevel.initialize``, ...), so it alone may import
  ``ds_twolevel.deepspeed`` — what that costs at import time is the first check's business.
* No import circle among the modules of ds_twolevel/ and hf_integration/, counting every import:
  module-level ones, those inside functions (they run later, but the dependency is the same) and
  those under ``if TYPE_CHECKING:`` (they never run, but a type from another module is a dependency
  on it).
* Every function is at most 60 lines, every class at most 250 (``end_lineno - lineno + 1``).

Every check names what violates it: module, line, and the import or definition.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ds_twolevel", "hf_integration")
CORE_PACKAGES = ("parallel", "sharding", "strategies", "layers", "costmodel", "testing", "seqshard")
"""ds_twolevel's core sub-packages (``seqshard`` holds strategies until they move into ``strategies``)."""
INTEGRATION = ("ds_twolevel.deepspeed", "ds_twolevel.tools", "ds_twolevel.accelerate", "ds_twolevel.hf_trainer",
               "ds_twolevel.guard")
FACADE = "ds_twolevel"
HEAVY = ("deepspeed", "transformers", "accelerate", "hf_integration")
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 250


# -- the source tree ---------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of ds_twolevel/ and hf_integration/."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


MODULES = _modules()


def _is_core(module: str) -> bool:
    return module == FACADE or any(module == f"ds_twolevel.{p}" or module.startswith(f"ds_twolevel.{p}.")
                                   for p in CORE_PACKAGES)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _resolve(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, module: str, *, module_level: bool, type_checking: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of a file: module-level statements only, or every import anywhere.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
    Imports under ``if TYPE_CHECKING:`` do not run; they are counted only with ``type_checking``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
        if module_level and nested and not isinstance(node, ast.ClassDef):
            return  # a function body runs later; a class body runs at import time
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


# -- 1. importing the core is light ---------------------------------------------------------------------
def _core_modules() -> list[str]:
    return sorted(m for m in MODULES if _is_core(m))


def _heavy_after(modules: list[str]) -> dict[str, list[str]]:
    """Fresh interpreter: import ``modules``; which HEAVY packages are then in sys.modules (per module
    when asked for one at a time)."""
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"importing {modules} failed:\n{proc.stderr[-3000:]}"
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_importing_the_core_pulls_in_no_integration():
    core = _core_modules()
    assert "ds_twolevel.parallel.layout" in core and "ds_twolevel.layers.attention" in core, core
    heavy = _heavy_after(core)
    if heavy:  # find who: one fresh interpreter per core module
        culprits = {m: h for m in core if (h := _heavy_after([m]))}
        raise AssertionError(f"importing the core loads {heavy}; per module: "
                             + "; ".join(f"{m} -> {h}" for m, h in culprits.items()))


# -- 2. the import direction --------------------------------------------------------------------------
def _violations(rule) -> list[str]:
    found = []
    for module, path in MODULES.items():
        for target, line in _imports(path, module, module_level=False):
            why = rule(module, target)
            if why:
                found.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target} ({why})")
    return found


def _core_rule(module: str, target: str) -> str | None:
    if not _is_core(module):
        return None
    if _within(target, ("hf_integration",)):
        return "the core may not import hf_integration"
    if _within(target, INTEGRATION) and module != FACADE:
        return "the core may not import the integration layer, not even inside a function"
    return None


def _hf_integration_rule(module: str, target: str) -> str | None:
    if not _within(target, ("hf_integration",)) or _within(module, ("hf_integration",)):
        return None
    if _within(module, INTEGRATION):
        return None
    return "only the integration layer (" + ", ".join(INTEGRATION) + ") may import hf_integration"


def test_core_does_not_import_the_integration_layer():
    bad = _violations(_core_rule)
    assert not bad, "core modules import the integration layer:\n" + "\n".join(bad)


def test_only_the_integration_layer_imports_hf_integration():
    bad = _violations(_hf_integration_rule)
    assert not bad, "modules outside the integration layer import hf_integration:\n" + "\n".join(bad)


def test_core_imports_no_heavy_library_at_module_level():
    bad = []
    for module, path in MODULES.items():
        if _is_core(module):
            bad += [f"{path.relative_to(ROOT)}:{line}: {module} imports {target} at module level"
                    for target, line in _imports(path, module, module_level=True) if _within(target, HEAVY)]
    assert not bad, "core modules import heavy libraries at import time (import them inside functions):\n" + \
        "\n".join(bad)


# -- 3. no import circles -------------------------------------------------------------------------------
def _graph(*, module_level: bool, among: tuple[str, ...], type_checking: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        if not _within(module, among):
            continue
        edges = graph.setdefault(module, {})
        for target, line in _imports(path, module, module_level=module_level, type_checking=type_checking):
            if target in MODULES and target != module and _within(target, among):
                edges.setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    inside = set(component)
    edges = [f"{a} -> {b} ({MODULES[a].relative_to(ROOT)}:{line})" for a in component
             for b, line in sorted(graph[a].items()) if b in inside]
    return "circle " + " / ".join(component) + ":\n    " + "\n    ".join(edges)


def test_no_import_circle_at_module_level():
    graph = _graph(module_level=True, among=PACKAGES)
    circles = _cycles(graph)
    assert not circles, "\n".join(_describe(graph, c) for c in circles)


def test_no_import_circle_counting_every_import():
    """Function-level and TYPE_CHECKING imports included: e.g. strategies naming the cost model's
    ModelConfig, or hf_integration installing DeepSpeed hooks that export through hf_integration."""
    graph = _graph(module_level=False, among=PACKAGES, type_checking=True)
    assert "hf_integration.policy" in graph and "ds_twolevel.strategies.common" in graph
    circles = _cycles(graph)
    assert not circles, "\n".join(_describe(graph, c) for c in circles)


def test_every_import_is_seen(tmp_path):
    """The extraction counts an import inside a function and one under TYPE_CHECKING."""
    source = tmp_path / "sample.py"
    source.write_text("from typing import TYPE_CHECKING\nimport a\nif TYPE_CHECKING:\n    import b\n"
                      "def f():\n    import c\nclass K:\n    import d\n")
    every = {name for name, _ in _imports(source, "sample", module_level=False, type_checking=True)}
    assert {"a", "b", "c", "d"} <= every
    assert {name for name, _ in _imports(source, "sample", module_level=True)} == {"typing", "a", "d"}


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


# -- 4. sizes ------------------------------------------------------------------------------------------
def _oversized() -> list[str]:
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit, kind = MAX_FUNCTION_LINES, "function"
            elif isinstance(node, ast.ClassDef):
                limit, kind = MAX_CLASS_LINES, "class"
            else:
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {kind} {node.name} has {lines} lines "
                             f"(limit {limit})")
    return found


def test_functions_and_classes_are_short():
    bad = _oversized()
    assert not bad, f"{len(bad)} definition(s) over the size limits:\n" + "\n".join(bad)
