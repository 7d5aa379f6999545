"""The code's own rules (docs/architecture.md), checked on the source: module sizes, who imports whom,
and what the protocol needs.  No cluster; plain files and one fresh interpreter."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("distexec_kernel", "master", "slave")
MAX_LINES = 500
# What the master and the slave may import of distexec_kernel: its shared modules, not the client side.
SHARED = {"distexec_kernel", "distexec_kernel.protocol", "distexec_kernel.job_record", "distexec_kernel.languages",
          "distexec_kernel.diagnostics", "distexec_kernel.config", "distexec_kernel.wsclient", "distexec_kernel.procs",
          "distexec_kernel.liveness", "distexec_kernel.submission", "distexec_kernel.fairshare",
          "distexec_kernel.rich_outputs"}


def modules() -> dict[str, pathlib.Path]:
    """Every module of the three packages by its dotted name."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports when it runs, function-level imports included.

    Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they
    cannot make a cycle at import time (they name types for the checker).
    """
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for branch in ast.walk(tree)
                   if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                   for stmt in branch.body for node in ast.walk(stmt)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from . import x`` imports the submodule x when there is one.
            found.update(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_over_the_size_limit():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules().values()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"split these by idea: {over}"


def test_no_two_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_master_and_slave_import_only_the_shared_modules():
    graph = import_graph()
    for role, other in (("master", "slave"), ("slave", "master")):
        mine = {m: deps for m, deps in graph.items() if m.split(".")[0] == role}
        assert not {d for deps in mine.values() for d in deps if d.split(".")[0] == other}
        client_side = {m: sorted(d for d in deps if d.startswith("distexec_kernel") and d not in SHARED)
                       for m, deps in mine.items()}
        assert not {m: d for m, d in client_side.items() if d}, f"{role} imports the client side"


def test_protocol_needs_only_the_standard_library():
    # What the import adds, as start-up itself loads a few (site hooks, the editable install's finder).
    probe = ("import sys\nbefore = set(sys.modules)\nimport distexec_kernel.protocol\n"
             "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(["distexec_kernel", "distexec_kernel.job_record", "distexec_kernel.protocol",
                                      "distexec_kernel.strict_json"])


def test_every_name_the_docs_import_from_the_package_imports():
    """README, docs/ and the package's __all__ name what users import from ``distexec_kernel``;
    each imports in a fresh interpreter (``DistexecError``, which README says submit raises, once did not)."""
    import re
    documented = {"DistexecError", "RemoteError", "Job", "JobGroup"}  # named in README and docs as the API's
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for names in re.findall(r"from distexec_kernel import ([\w, ]+)", path.read_text()):
            documented.update(n.strip() for n in names.split(","))
    import distexec_kernel
    names = sorted(documented | set(distexec_kernel.__all__))
    probe = f"from distexec_kernel import {', '.join(names)}\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert documented <= set(distexec_kernel.__all__), documented - set(distexec_kernel.__all__)
