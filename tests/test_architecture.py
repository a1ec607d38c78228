"""The architecture rules DESIGN.md states, checked on the source: no import cycles between the
package's modules (function-local imports count), the model free of config and distributed
imports, and torch_npu imported by the device layer alone."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_files() -> dict[str, Path]:
    """Module name -> file, with kernels/ installed as sora_dist.kernels."""
    files = {}
    for path in [*(REPO / "sora_dist").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["sora_dist", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports anywhere in it (``from a import b`` counts as a.b when
    a.b is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sora_dist"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sora_dist"))
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle through a node, found by depth-first search (the graph is small)."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append(path)
                elif nxt not in path and nxt > start:  # each cycle once, from its smallest node
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_has_no_config_or_distributed_imports():
    for path in (REPO / "sora_dist" / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(n.startswith(("sora_dist.config", "sora_dist.parallel", "torch.distributed")) for n in names), path


def test_only_the_device_layer_imports_torch_npu():
    importers = [
        name for name, path in module_files().items()
        if "import torch_npu" in path.read_text() or "import_module(\"torch_npu\")" in path.read_text()
    ]
    assert importers == ["sora_dist.device"]
