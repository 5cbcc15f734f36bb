"""The package's import graph has no cycle: every module of sort_fast is parsed with ``ast``
(imports inside functions included, since a lazy import closes a circle as surely as a top-level
one) and each cycle found is reported as a path of module names."""
import ast
import pathlib
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = "sort_fast"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: pathlib.Path = ROOT) -> Dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every ``.py`` file under the package ``root``
    (a package is named after its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def extension_modules(root: pathlib.Path = ROOT) -> Set[str]:
    """Dotted names of the compiled extension modules under ``root`` (``_ranking.cpython-311-
    x86_64-linux-gnu.so`` is ``_ranking``): they import nothing of the package, but
    ``from . import _ranking`` must be read as importing them, not the package."""
    found = set()
    for pattern in ("*.so", "*.pyd"):
        for path in root.rglob(pattern):
            parts = list(path.relative_to(root.parent).parts)
            parts[-1] = parts[-1].split(".")[0]
            found.add(".".join(parts))
    return found


def _resolve(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base.pop()  # a module's relative imports start at its package
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imported_modules(module: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that ``module`` (source ``path``) imports anywhere in its
    body. ``from a import b`` counts ``a.b`` where that is a module (``from . import x``
    with ``x`` a submodule) and ``a`` otherwise; ``import a.b.c`` counts ``a.b.c``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != module)
    return found


def import_graph(root: pathlib.Path = ROOT) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (extension modules import none)."""
    files = module_files(root)
    extensions = extension_modules(root)
    known = set(files) | extensions
    graph = {name: imported_modules(name, path, known) for name, path in files.items()}
    graph.update((name, set()) for name in extensions)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component with more than one module (or a module that
    imports itself), as a path ``[a, b, ..., a]``; Tarjan's algorithm, then a shortest
    path back to the component's first module inside it."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, component) for component in sorted(components)]


def _cycle_through(graph: Dict[str, Set[str]], component: List[str]) -> List[str]:
    """A shortest import path from ``component[0]`` back to itself within ``component``."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


# ----------------------------------------------------------------------------- the checker
def _package(tmp_path: pathlib.Path, files: Dict[str, str]) -> pathlib.Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_cycles_through_every_import_form(tmp_path):
    """Relative imports at two levels, ``from . import submodule``, an absolute import and an
    import inside a function each close one cycle; a module importing a name of its package's
    ``__init__`` depends on the package, one importing an extension module does not."""
    root = _package(tmp_path, {
        "__init__.py": "def helper():\n    pass\n",
        "a.py": "from .sub.b import thing\n",
        "sub/__init__.py": "",
        "sub/b.py": "def thing():\n    from ..a import x\n",
        "c.py": "from . import d\n",
        "d.py": "import pkg.c\n",
        "e.py": "from . import helper\n",
        "f.py": "from . import _native\n",
        "_native.cpython-311-x86_64-linux-gnu.so": "",
    })
    graph = import_graph(root)
    assert graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.e"] == {"pkg"}
    assert graph["pkg.f"] == {"pkg._native"}  # the extension module, not the package
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"]]


def test_checker_reports_the_known_circles_of_the_original_code(tmp_path):
    """The two circles the package had (the loss op and its kernels, the evaluation and its
    plots), rebuilt as they were written: both are found."""
    root = _package(tmp_path, {
        "sort_fast/__init__.py": "",
        "sort_fast/ops/__init__.py": "",
        "sort_fast/ops/contrastive_loss.py":
            "def _backend_module(name):\n    from . import contrastive_loss_kernels\n",
        "sort_fast/ops/contrastive_loss_kernels.py":
            "from .contrastive_loss import accumulation_dtype\n",
        "sort_fast/training/__init__.py": "",
        "sort_fast/training/evaluation.py": "from .plots import plot_run\n",
        "sort_fast/training/plots.py":
            "def plot_run():\n    from .evaluation import QUADRANTS\n",
    })
    assert cycles(import_graph(root / "sort_fast")) == [
        ["sort_fast.ops.contrastive_loss", "sort_fast.ops.contrastive_loss_kernels",
         "sort_fast.ops.contrastive_loss"],
        ["sort_fast.training.evaluation", "sort_fast.training.plots",
         "sort_fast.training.evaluation"],
    ]


@pytest.mark.parametrize("module, level, target, want", [
    ("p.a.b", 1, None, "p.a"), ("p.a.b", 2, "c", "p.c"), ("p.a", 1, "x", "p.x"),
    ("p.a", 0, "os", "os"),
])
def test_relative_imports_resolve_from_the_module_package(module, level, target, want):
    assert _resolve(module, False, level, target) == want
    assert _resolve("p", True, 1, "x") == "p.x"
