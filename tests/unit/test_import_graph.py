"""The modules of `rlhf` import each other one way only: no import cycle, at module level, in a function or
for type annotations; and none uses another module's private (underscore) names.

The graph is read from the source with `ast`, so nothing is imported. An edge A -> B means that A
imports B somewhere: at the top, inside a function, under `if TYPE_CHECKING:` (it never runs, but a
module that needs another's types to be read depends on it as much as one that calls it), relatively, or
by name for importlib (a string that is exactly "rlhf.b" or "rlhf.b:function"); names assembled at run
time are not seen. Importing `rlhf.x.y` also runs the `__init__` of package `rlhf.x`, so that is an edge
too, unless A lies inside `rlhf.x`: then `rlhf.x` is already being imported when A runs. A package
importing its own submodules is therefore no cycle, while a submodule that takes names from its
package's `__init__` (which imports the submodule) is one.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import rlhf

SRC = Path(rlhf.__file__).resolve().parent.parent
"""The dir that holds the `rlhf` package (src/)."""


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the `rlhf` package under `root`, by dotted name ("rlhf.a.b"; a package's __init__: "rlhf.a")."""
    modules = {}
    for path in sorted((root / "rlhf").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def ancestors(name: str) -> list[str]:
    """"rlhf.a.b.c" -> ["rlhf.a.b", "rlhf.a", "rlhf"]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is an `rlhf` module (`rlhf.a.f` names function f of rlhf.a), or None."""
    return next((m for m in [name, *ancestors(name)] if m in modules), None)


def _from_base(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name of `from X import ...`, a relative X resolved against `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]  # the package `module` lives in
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(rlhf module, line) for each import in `module`'s source, at any depth (`if TYPE_CHECKING:` blocks
    included); other packages are skipped.

    `from P import n` imports submodule P.n when there is one, else takes name n from P itself. A string
    constant naming an rlhf module (other than "rlhf", also a logger name) counts as an import by name.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(_known(alias.name, modules), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else _known(base, modules), node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "rlhf.a.b" or "rlhf.a.b:function", for importlib: a module the code imports by name
            name = node.value.split(":")[0] if node.value.count(":") == 1 else node.value
            if name in modules and name != "rlhf":
                found.append((name, node.lineno))
    return [(target, line) for target, line in found if target is not None]


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it depends on: the first line that imports it}, over the `rlhf` modules only."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for module, path in modules.items():
        own_packages = set(ancestors(module))
        for target, line in sorted(imports(module, path, modules), key=lambda item: item[1]):
            # the target, then the package __init__s its import runs (not those `module` is inside)
            for dependency in [target, *(a for a in ancestors(target) if a not in own_packages)]:
                if dependency != module:
                    graph[module].setdefault(dependency, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The groups of modules that reach each other (Tarjan), each sorted; single modules are left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def shortest_cycle(graph: dict[str, dict[str, int]], group: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected `group`, as [a, b, ..., a]."""
    start, members = group[0], set(group)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in graph[node]:
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt in members and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{group} is not strongly connected")


def describe(graph: dict[str, dict[str, int]], modules: dict[str, Path], cycle: list[str], root: Path) -> str:
    """"rlhf.a (rlhf/a.py:3) -> rlhf.b (rlhf/b/__init__.py:10) -> rlhf.a", each with its import's line."""
    steps = [f"{here} ({modules[here].relative_to(root)}:{graph[here][there]})"
             for here, there in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


def cycles_in(root: Path) -> list[str]:
    """One shortest cycle, described, per group of `rlhf` modules under `root` that import each other."""
    modules = package_modules(root)
    graph = import_graph(modules)
    return [describe(graph, modules, shortest_cycle(graph, group), root) for group in strongly_connected(graph)]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _dotted(node: ast.expr) -> str | None:
    """"a.b.c" for the expression a.b.c (names and attributes only), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def private_uses(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """("rlhf.b._name", line) for each private name of another `rlhf` module that `module` uses: imported
    (`from rlhf.b import _name`) or read off the module (`b._name` after `from rlhf import b`, `import
    rlhf.b as b` or `import rlhf.b`). A local name bound to a module anywhere in the file counts as that
    module everywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound: dict[str, str] = {}  # local name -> the rlhf module it names
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _known(alias.name, modules):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node, path.name == "__init__.py")
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif _private(alias.name) and base in modules and base != module:
                    found.append((f"{base}.{alias.name}", node.lineno))
    for node in ast.walk(tree):
        owner = _dotted(node.value) if isinstance(node, ast.Attribute) and _private(node.attr) else None
        if owner is None or owner.split(".")[0] not in bound:
            continue
        head, _, rest = owner.partition(".")
        target = ".".join(p for p in (bound[head], rest) if p)
        if target in modules and target != module:
            found.append((f"{target}.{node.attr}", node.lineno))
    return found


def private_names_used_elsewhere(root: Path) -> list[str]:
    """"rlhf/a.py:3 uses rlhf.b._name" for every use of a module's private name outside it."""
    modules = package_modules(root)
    return [f"{path.relative_to(root)}:{line} uses {name}" for module, path in modules.items()
            for name, line in sorted(private_uses(module, path, modules), key=lambda item: item[1])]


ENTRY_POINTS = ("rlhf.cli", "rlhf.stages", "rlhf.commands")
"""The three kinds of entry point: the CLI, the training stages and the other verbs. The library below them
(data, models, forwards, generation, the maths, the plan, the engine) imports none of them."""


def _is_entry_point(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in ENTRY_POINTS)


def library_imports_of_entry_points(root: Path) -> list[str]:
    """"rlhf/a.py:3 imports rlhf.commands.b" for each library module that imports an entry point."""
    modules = package_modules(root)
    graph = import_graph(modules)
    return [f"{modules[module].relative_to(root)}:{line} imports {target}"
            for module, targets in sorted(graph.items()) if not _is_entry_point(module)
            for target, line in targets.items() if _is_entry_point(target) and target != "rlhf"]


def test_no_import_cycles():
    modules = package_modules(SRC)
    graph = import_graph(modules)
    groups = strongly_connected(graph)
    report = [f"{describe(graph, modules, shortest_cycle(graph, group), SRC)}\n    (all of this group: "
              f"{', '.join(group)})" for group in groups]
    assert not groups, "import cycles between rlhf modules, one shortest cycle per group:\n" + "\n".join(report)


def test_the_library_imports_no_entry_point():
    found = library_imports_of_entry_points(SRC)
    assert not found, "library modules importing the CLI, a stage or a command (move the shared code down):\n" + "\n".join(found)


def test_no_module_uses_another_modules_private_names():
    found = private_names_used_elsewhere(SRC)
    assert not found, "private names used outside their module (make them public or move the code):\n" + "\n".join(found)


# ------------------------------------------------------------------------------ the reader on small trees


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"rlhf/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_a_package_importing_its_submodules_is_no_cycle(tmp_path: Path):
    root = _tree(tmp_path, {"rlhf/pkg/__init__.py": "from rlhf.pkg.b import g\nfrom rlhf.pkg import a\n",
                            "rlhf/pkg/a.py": "X = 1\n",
                            "rlhf/pkg/b.py": "from . import a\nfrom rlhf.pkg.a import X\n\ndef g():\n    return X\n",
                            "rlhf/user.py": "from rlhf import pkg\nfrom rlhf.pkg.a import X\n"})
    assert cycles_in(root) == []
    graph = import_graph(package_modules(root))
    assert graph["rlhf.pkg"] == {"rlhf.pkg.b": 1, "rlhf.pkg.a": 2}
    assert graph["rlhf.pkg.b"] == {"rlhf.pkg.a": 1}
    assert graph["rlhf.user"] == {"rlhf.pkg": 1, "rlhf.pkg.a": 2}  # importing pkg.a runs pkg/__init__ too


def test_a_submodule_taking_names_from_its_package_init_is_a_cycle(tmp_path: Path):
    root = _tree(tmp_path, {"rlhf/pkg/__init__.py": "from rlhf.pkg.a import X\nY = 2\n",
                            "rlhf/pkg/a.py": "X = 1\n\ndef f():\n    from rlhf.pkg import Y\n    return Y\n"})
    assert cycles_in(root) == ["rlhf.pkg (rlhf/pkg/__init__.py:1) -> rlhf.pkg.a (rlhf/pkg/a.py:4) -> rlhf.pkg"]


def test_function_level_relative_and_importlib_imports_count(tmp_path: Path):
    root = _tree(tmp_path, {"rlhf/a.py": "def f():\n    from .b import g\n    return g\n",
                            "rlhf/b.py": "import importlib\n\ndef g():\n    return importlib.import_module('rlhf.c')\n",
                            "rlhf/c.py": "import rlhf.a as a\n"})
    assert cycles_in(root) == ["rlhf.a (rlhf/a.py:2) -> rlhf.b (rlhf/b.py:4) -> rlhf.c (rlhf/c.py:1) -> rlhf.a"]


def test_importing_into_a_package_runs_its_init(tmp_path: Path):
    """rlhf.user imports rlhf.pkg.a only, but that runs rlhf/pkg/__init__.py, which imports rlhf.user."""
    root = _tree(tmp_path, {"rlhf/pkg/__init__.py": "def f():\n    import rlhf.user\n",
                            "rlhf/pkg/a.py": "",
                            "rlhf/user.py": "from rlhf.pkg.a import *\n"})
    assert cycles_in(root) == ["rlhf.pkg (rlhf/pkg/__init__.py:2) -> rlhf.user (rlhf/user.py:1) -> rlhf.pkg"]


def test_names_for_importlib_and_type_checking_imports_count(tmp_path: Path):
    root = _tree(tmp_path, {"rlhf/a.py": "JUDGE = 'rlhf.b:score'\nlog_name = 'rlhf'\n",
                            "rlhf/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlhf.a import X\n"
                                         "else:\n    import rlhf.c\n",
                            "rlhf/c.py": ""})
    assert import_graph(package_modules(root)) == {"rlhf": {}, "rlhf.a": {"rlhf.b": 1},
                                                   "rlhf.b": {"rlhf.a": 3, "rlhf.c": 5}, "rlhf.c": {}}
    assert cycles_in(root) == ["rlhf.a (rlhf/a.py:1) -> rlhf.b (rlhf/b.py:3) -> rlhf.a"]


def test_private_names_used_outside_their_module(tmp_path: Path):
    root = _tree(tmp_path, {"rlhf/pkg/__init__.py": "",
                            "rlhf/pkg/a.py": "def _helper():\n    pass\n\n\ndef public():\n    return _helper()\n",
                            "rlhf/pkg/b.py": "from rlhf.pkg import a\n\n\ndef f():\n    return a._helper()\n",
                            "rlhf/c.py": "from rlhf.pkg.a import _helper, public\nimport rlhf.pkg.a\n"
                                         "import rlhf.pkg.a as mod\n\nX = rlhf.pkg.a._helper, mod._helper, mod.__name__\n",
                            "rlhf/d.py": "class T:\n    def _own(self):\n        return self._own\n\n\n"
                                         "def g(t, a):\n    return t._own, a._helper\n"})
    assert private_names_used_elsewhere(root) == [
        "rlhf/c.py:1 uses rlhf.pkg.a._helper", "rlhf/c.py:5 uses rlhf.pkg.a._helper",
        "rlhf/c.py:5 uses rlhf.pkg.a._helper", "rlhf/pkg/b.py:5 uses rlhf.pkg.a._helper"]


def test_a_library_module_importing_a_command_is_reported(tmp_path: Path):
    root = _tree(tmp_path, {"rlhf/commands/__init__.py": "", "rlhf/commands/chat.py": "from rlhf import lib\n",
                            "rlhf/lib.py": "def f():\n    from rlhf.commands.chat import g\n",
                            "rlhf/stages/__init__.py": "from rlhf import lib\nimport rlhf.commands.chat\n"})
    assert library_imports_of_entry_points(root) == ["rlhf/lib.py:2 imports rlhf.commands.chat",
                                                     "rlhf/lib.py:2 imports rlhf.commands"]
