"""The package graph of docs/architecture.md, enforced: imports go one way, and never in a cycle.

contract <- filter <- audit, sim;  contract <- training -> sim (data sets and numpy attacks only).
The stream filter depends on the contract and nothing else of ours, and never on torch. A new
import that crosses a boundary fails here, naming the file and the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package -> the project packages its modules may import (any depth below them)
ALLOWED = {
    "depois_stream.contract": {"depois_stream.contract"},
    "depois_stream.filter": {"depois_stream.contract", "depois_stream.filter", "depois_stream"},
    "depois_stream.audit": {"depois_stream.contract", "depois_stream.filter",
                            "depois_stream.audit"},
    "depois_stream.sim": {"depois_stream.contract", "depois_stream.filter",
                          "depois_stream.sim"},
    "training": {"depois_stream.contract", "depois_stream.sim.datasets",
                 "depois_stream.sim.attacks", "training"},
}
# Third-party libraries the contract may use at import time: it is shared by everything.
CONTRACT_THIRD_PARTY = {"numpy", "pydantic", "pydantic_core"}
NEVER_IN_DEPOIS_STREAM = {"torch", "training", "onnx", "onnxscript"}  # the training stack
NEVER_IN_FILTER = {"sklearn", "matplotlib", "mlxtend", "cleanlab"}  # nor the tools' extras
LAZY_ONLY = {"sklearn", "matplotlib", "mlxtend"}  # optional extras of the tools


def _modules() -> dict[str, Path]:
    out = {}
    for root in ("depois_stream", "training"):
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against the package
                    base = module.split(".")[: -child.level or None]
                    name = ".".join([*base, child.module] if child.module else base)
                else:
                    name = child.module or ""
                found.append((name, top))
                found.extend((f"{name}.{a.name}", top) for a in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef,
                                                        ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return found


def _package(module: str) -> str | None:
    for pkg in sorted(ALLOWED, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def _within(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def test_imports_follow_the_package_graph() -> None:
    modules = _modules()
    bad = []
    for module, path in modules.items():
        pkg = _package(module)
        if pkg is None:
            continue  # depois_stream/__init__, cli, __main__: the composition root
        for name, top in _imports(path, module):
            ours = name.split(".")[0] in ("depois_stream", "training")
            if ours:
                target = next((m for m in sorted(modules, key=len, reverse=True)
                               if name == m or name.startswith(m + ".")), name)
                if target == "depois_stream" and pkg != "depois_stream.filter":
                    continue  # `from depois_stream import __version__` is fine anywhere
                if not _within(target, ALLOWED[pkg]):
                    bad.append(f"{path.relative_to(REPO)}: imports {name}")
            elif pkg == "depois_stream.contract" and top:
                root = name.split(".")[0]
                if root not in CONTRACT_THIRD_PARTY and root not in sys.stdlib_module_names:
                    bad.append(f"{path.relative_to(REPO)}: the contract imports {name} at "
                               "import time (numpy and pydantic only; import optional "
                               "libraries inside the function that needs them)")
            root = name.split(".")[0]
            if pkg.startswith("depois_stream") and root in NEVER_IN_DEPOIS_STREAM:
                bad.append(f"{path.relative_to(REPO)}: depois_stream imports {name}")
            elif pkg in ("depois_stream.filter", "depois_stream.contract") and root in NEVER_IN_FILTER:
                bad.append(f"{path.relative_to(REPO)}: the stream filter imports {name}")
            elif pkg.startswith("depois_stream") and root in LAZY_ONLY and top:
                bad.append(f"{path.relative_to(REPO)}: imports the optional {name} at import "
                           "time (import it inside the function that needs it)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name, top in _imports(path, module):
            if not top:
                continue  # a lazy import inside a function cannot make an import-time cycle
            target = next((m for m in sorted(modules, key=len, reverse=True)
                           if name == m or name.startswith(m + ".")), None)
            if target and target != module and not module.startswith(target + "."):
                edges.add(target)
        graph[module] = edges
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            dfs(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_stream_filter_never_loads_torch_or_training() -> None:
    code = ("import sys\n"
            "import depois_stream.cli, depois_stream.filter.app, depois_stream.audit.cli\n"
            "from depois_stream import Detector\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'training', 'onnx', 'sklearn'})\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_the_architecture_doc_names_every_package() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    for pkg in ALLOWED:
        assert f"`{pkg}`" in doc, f"docs/architecture.md does not describe {pkg}"
