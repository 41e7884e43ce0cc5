"""The modules' import graph: no cycles, and the decode path layered sampling <- engine_kernels <- stack <- engine
<- decode, so each can be read (and imported) without the ones after it."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DECODE_PATH = ["sampling", "engine_kernels", "stack", "engine", "decode"]   # each may import only those before it


def local_imports():
    """module -> the repository's top-level modules it imports anywhere in its body (deferred imports
    inside functions included, since they close a cycle just the same)."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = (found & modules) - {name}
    return graph


def test_the_modules_import_each_other_without_a_cycle():
    graph = local_imports()
    state = {}

    def visit(name, path):
        if state.get(name) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [name]))
        if state.get(name) == "done":
            return
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_decode_path_is_layered():
    graph = local_imports()
    for i, name in enumerate(DECODE_PATH):
        later = set(DECODE_PATH[i + 1:]) & graph[name]
        assert not later, f"{name} imports {sorted(later)}, which come after it"
    assert "decode" in graph["gentraces"] and "engine" not in graph["gentraces"]  # decode is the entry point


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODE_PATH)
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_no_module_shadows_a_package_that_transformers_looks_for():
    """A top-level file named like an optional package that transformers probes for is found by that
    probe (the repository root is on sys.path) and imported in its place: kernels.py did this to the
    Hub's `kernels` package under transformers 5.25, and every model import failed."""
    import transformers.utils.import_utils as probes
    probed = set(re.findall(r"""_is_package_available\(\s*["']([\w.]+)["']""", Path(probes.__file__).read_text()))
    assert "kernels" in probed and "torch" in probed  # the probe list was read
    assert not probed & {p.stem for p in ROOT.glob("*.py")}
