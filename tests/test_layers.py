"""mom_dist's imports keep the house of docs/architecture.md: no import runs up a floor or across
one, no modules import each other in a circle, and ``convert/hf_remote`` imports nothing of ours.

Every import counts: at the top of a file, inside functions (the lazy imports that used to hide
the climbs), relative ones and ``importlib.import_module("mom_dist...")`` with a literal name.
The floors are read from the table in docs/architecture.md, the one place they are written.
"""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mom_dist"
STANDALONE = ("mom_dist.convert.hf_remote",)  # travels in to-hf directories: imports nothing of ours


def read_floors(doc: str) -> dict[str, int]:
    """room -> floor, from the rows ``| N | `room`, `room` | ... |`` of the doc's floor table."""
    floors = {}
    with open(doc) as f:
        for line in f:
            m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
            if m:
                for room in re.findall(r"`([\w.]+)`", m.group(2)):
                    floors[room] = int(m.group(1))
    return floors


def find_modules(src: str, package: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file of ``package`` under ``src``."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(src, package)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), src)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(dirpath, name)
    return out


def imports_of(module: str, path: str, modules: dict, package: str) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import statement in the file."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read(), path)
    found = []

    def resolve(name: str, attr: str | None) -> str | None:
        if attr and f"{name}.{attr}" in modules:  # from pkg import submodule
            return f"{name}.{attr}"
        while name and name not in modules:  # from pkg.mod import function; import pkg.mod
            name = name.rpartition(".")[0]
        return name or None

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [(a.name, None) for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the file's own package upwards
                    parts = module.split(".") if is_pkg else module.split(".")[:-1]
                    parts = parts[:len(parts) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                targets = [(base, a.name) for a in child.names]
            elif isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", "")) in (
                    "import_module", "__import__") and child.args and isinstance(child.args[0], ast.Constant):
                targets = [(str(child.args[0].value), None)]
            for name, attr in targets:
                if name == package or name.startswith(package + "."):
                    target = resolve(name, attr)
                    if target and target != module and (target, child.lineno, lazy) not in found:
                        found.append((target, child.lineno, lazy))
            visit(child, lazy)

    visit(tree, False)
    return found


def room(module: str, package: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a circle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def violations(src: str, doc: str, package: str = PACKAGE, standalone: tuple = STANDALONE) -> list[str]:
    """One line per import that breaks the floors, the circles, or a standalone folder."""
    floors = read_floors(doc)
    modules = find_modules(src, package)
    problems, graph = [], {}
    for module, path in sorted(modules.items()):
        where = os.path.relpath(path, src)
        mine = room(module, package)
        if mine not in floors:
            problems.append(f"{where}: room '{mine}' stands on no floor: add it to the table of {doc}")
            continue
        for target, line, lazy in imports_of(module, path, modules, package):
            graph.setdefault(module, set()).add(target)
            how = " (inside a function)" if lazy else ""
            theirs = room(target, package)
            if module.startswith(standalone):
                if not target.startswith(standalone):
                    problems.append(f"{where}:{line} imports {target}{how}: {module} must stand alone "
                                    "(it runs where mom_dist is not installed)")
                continue
            if theirs == mine or theirs not in floors:
                continue
            if floors[theirs] > floors[mine]:
                problems.append(f"{where}:{line} imports {target}{how}: '{mine}' (floor {floors[mine]}) may not "
                                f"import '{theirs}' (floor {floors[theirs]}, higher); move the code down or the "
                                "import up")
            elif floors[theirs] == floors[mine]:
                problems.append(f"{where}:{line} imports {target}{how}: '{mine}' and '{theirs}' stand on the same "
                                f"floor ({floors[mine]}) and may not import each other")
    for circle in cycles(graph):
        problems.append("import circle: " + " -> ".join(circle + circle[:1]))
    return problems


def test_mom_dist_keeps_its_floors_and_has_no_circles():
    problems = violations(ROOT, os.path.join(ROOT, "docs", "architecture.md"))
    assert not problems, "\n".join(problems)


def test_every_floor_room_exists():
    floors = read_floors(os.path.join(ROOT, "docs", "architecture.md"))
    rooms = {room(m, PACKAGE) for m in find_modules(ROOT, PACKAGE)}
    assert set(floors) == rooms, f"rooms in the table but not in mom_dist: {sorted(set(floors) - rooms)}"


def test_the_check_sees_lazy_climbs_circles_and_standalone_breaches(tmp_path):
    """The checker on a made-up package: each kind of breach is reported, naming file and line."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import os\n\ndef f():\n    from pkg.high import b\n",  # a climb hidden in a function
        "low/c.py": "from pkg.low import d\n",
        "low/d.py": "from pkg.low.c import x\n",  # c <-> d: a circle inside one room
        "low/alone/__init__.py": "from . import e\n",
        "low/alone/e.py": "from pkg.low import c\n",  # a standalone folder importing outside itself
        "high/__init__.py": "",
        "high/b.py": "import importlib\nimportlib.import_module('pkg.side')\n",  # same floor
        "side.py": "from .low import c\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    doc = tmp_path / "floors.md"
    doc.write_text("| floor | rooms |\n|---|---|\n| 1 | `__init__`, `low` | x |\n| 2 | `high`, `side` | y |\n")
    problems = violations(str(tmp_path), str(doc), "pkg", standalone=("pkg.low.alone",))
    text = "\n".join(problems)
    assert "pkg/low/a.py:4 imports pkg.high.b (inside a function): 'low' (floor 1) may not import 'high'" in text
    assert "pkg/high/b.py:2 imports pkg.side: 'high' and 'side' stand on the same floor (2)" in text
    assert "import circle: pkg.low.c -> pkg.low.d -> pkg.low.c" in text
    assert "pkg/low/alone/e.py:1 imports pkg.low.c: pkg.low.alone.e must stand alone" in text
    assert len(problems) == 4, text  # side -> low (relative, downward) and alone -> alone.e are fine
