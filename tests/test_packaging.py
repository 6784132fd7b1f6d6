"""Packaging and structure: what the code imports is what ``pyproject.toml`` declares, the
project's own modules import each other without cycles and only downwards
(``cli -> pipelines -> trainers``, ``pipelines -> actstore``), and library files stay readable.

- Every module imports in a fresh interpreter that sees only the runtime dependencies and what
  they need in turn (``pip install actstore`` and nothing else): a module that imports a test or
  dev tool (pytest, moto, sae_lens) at import time fails there.
- The imports ``ast`` finds anywhere in the code (lazy ones inside functions too) all come from a
  declared runtime dependency, or from an optional extra behind ``except ImportError``.
- The import graph (module-level and lazy imports, relative ones resolved) has no cycle and
  respects the layers.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actstore", "trainers", "pipelines")
SINGLE_MODULES = ("cli",)
OWN = frozenset(PACKAGES + SINGLE_MODULES)
OPTIONAL = {"sae_lens": "saelens", "wandb": "wandb", "triton": "dev"}
"""Top-level modules imported only on request (``--sae saelens:...``, ``--wandb``) -> the extra
that declares them; each import must sit in a ``try`` that catches ImportError."""
LAYERS = {
    "actstore": ("trainers", "pipelines", "cli"),
    "trainers": ("actstore", "pipelines", "cli"),  # trainers take an iterator of tensors, not a store
    "pipelines": ("cli",),
}
"""Top-level package -> the project's top-level names it must not import."""
MAX_LINES = 400
"""Longest file under actstore/ (the library is read more than it is written)."""


# ---- the project's files and their imports ---------------------------------------------------
@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    module: str
    """Absolute dotted name of the module named after ``import`` / ``from`` (relative resolved)."""
    names: tuple[str, ...]
    """What ``from ... import`` takes (empty for ``import x``)."""
    line: int
    guarded: bool
    """Inside a ``try`` whose handlers catch ImportError."""


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES,
                    singles: tuple[str, ...] = SINGLE_MODULES) -> dict[str, Module]:
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            out[".".join(parts)] = Module(".".join(parts), path, is_package)
    for name in singles:
        out[name] = Module(name, root / f"{name}.py", False)
    return out


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(mod: Module) -> Iterator[Import]:
    """Every import statement that can run (module level, in functions, in classes), with
    relative imports resolved; ``if TYPE_CHECKING:`` blocks are skipped (they never run)."""
    tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]

    def visit(node: ast.AST, guarded: bool) -> Iterator[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from visit(child, guarded)
            return
        if isinstance(node, ast.Try):
            inner = guarded or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                yield from visit(child, inner)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                yield from visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), node.lineno, guarded)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield Import(name, tuple(a.name for a in node.names), node.lineno, guarded)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, guarded)

    yield from visit(tree, False)


# ---- declared dependencies --------------------------------------------------------------------
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _marker_holds(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras})


def runtime_closure() -> set[str]:
    """Canonical names of the installed distributions that ``[project].dependencies`` bring,
    through each distribution's own requirements (markers and extras honoured)."""
    todo = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    todo = [r for r in todo if _marker_holds(r, set())]
    done: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), set(req.extras)
        if name in done and extras <= done[name]:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # not installed (an optional platform dependency): nothing of it imports
        done.setdefault(name, set()).update(extras)
        for spec in dist.requires or []:
            child = Requirement(spec)
            if _marker_holds(child, done[name]):
                todo.append(child)
    return set(done)


def distributions_of() -> dict[str, set[str]]:
    """Top-level importable name -> canonical names of the installed distributions holding it."""
    return {m: {canonicalize_name(d) for d in dists} for m, dists in md.packages_distributions().items()}


def third_party(name: str) -> bool:
    top = name.partition(".")[0]
    return bool(top) and top not in sys.stdlib_module_names and top not in OWN and top != "__future__"


# ---- a. importing every module with only the runtime dependencies -------------------------------
CHILD = textwrap.dedent('''
    import importlib, json, pkgutil, re, sys, traceback

    allowed, blocked, packages, singles = json.loads(sys.argv[1])
    blocked, allowed = set(blocked), set(allowed)
    refused = set()

    def canonical(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    class OnlyRuntime:
        """Wraps a meta-path finder: modules of undeclared distributions are not found (as if
        not installed: imports raise ModuleNotFoundError, find_spec probes get None) and their
        metadata is not listed."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in blocked:
                refused.add(top)
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def find_distributions(self, *args, **kwargs):
            find = getattr(self.inner, "find_distributions", None)
            for dist in find(*args, **kwargs) if find else ():
                if canonical(dist.metadata["Name"] or "") in allowed:
                    yield dist

        def invalidate_caches(self):
            getattr(self.inner, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [OnlyRuntime(f) for f in sys.meta_path]
    failed = {}

    def load(name):
        try:
            importlib.import_module(name)
        except BaseException:
            failed[name] = traceback.format_exc(limit=-3)

    for name in singles:
        load(name)
    for pkg in packages:
        load(pkg)
        if pkg in failed:
            continue
        root = sys.modules[pkg]
        for info in pkgutil.walk_packages(root.__path__, pkg + ".", onerror=lambda n: failed.setdefault(n, traceback.format_exc(limit=-3))):
            if info.name not in sys.modules:
                load(info.name)
    print(json.dumps({"failed": failed, "refused": sorted(refused), "imported": sorted(n for n in sys.modules if n.partition(".")[0] in set(packages) | set(singles))}))
''')


def test_every_module_imports_with_only_the_runtime_dependencies(tmp_path):
    closure = runtime_closure()
    own_dist = canonicalize_name(pyproject()["project"]["name"])
    blocked = sorted(
        m for m, dists in distributions_of().items()
        if third_party(m) and not m.startswith("__editable__") and dists.isdisjoint(closure) and own_dist not in dists
    )
    dev_tools = [m for m in ("pytest", "moto", "sae_lens") if m in distributions_of()]
    assert "pytest" in dev_tools and set(dev_tools) <= set(blocked), "the dev tools must be hidden"
    script = tmp_path / "import_all.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    args = json.dumps([sorted(closure | {own_dist}), blocked, list(PACKAGES), list(SINGLE_MODULES)])
    run = subprocess.run([sys.executable, str(script), args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    report = "\n".join(f"--- {name}\n{tb}" for name, tb in sorted(result["failed"].items()))
    assert not result["failed"], (
        f"modules that do not import with only the runtime dependencies (hidden and asked for: "
        f"{result['refused']}):\n{report}")
    expected = set(project_modules())
    assert expected <= set(result["imported"]), f"never imported: {sorted(expected - set(result['imported']))}"


# ---- b. every third-party import is declared ----------------------------------------------------
def test_every_third_party_import_is_a_declared_dependency():
    meta = pyproject()["project"]
    runtime = {canonicalize_name(Requirement(r).name) for r in meta["dependencies"]}
    extras = {extra: {canonicalize_name(Requirement(r).name) for r in reqs}
              for extra, reqs in meta.get("optional-dependencies", {}).items()}
    owners = distributions_of()
    problems = []
    for mod in project_modules().values():
        for imp in imports_of(mod):
            if not third_party(imp.module):
                continue
            top = imp.module.partition(".")[0]
            where = f"{mod.path.relative_to(ROOT)}:{imp.line} imports {imp.module}"
            dists = owners.get(top)
            if not dists:
                problems.append(f"{where}: no installed distribution provides {top!r}")
            elif dists & runtime:
                continue
            elif top in OPTIONAL:
                extra = OPTIONAL[top]
                if not dists & extras.get(extra, set()):
                    problems.append(f"{where}: optional, but extra [{extra}] does not declare {sorted(dists)}")
                elif not imp.guarded:
                    problems.append(f"{where}: optional ([{extra}]) but not inside try/except ImportError")
            else:
                problems.append(f"{where}: {sorted(dists)} missing from [project].dependencies")
    assert not problems, "\n".join(problems)


# ---- c. the import graph -----------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Module] | None = None) -> dict[str, list[Edge]]:
    """Module -> the project modules it makes Python run: the module it names (``from pkg import
    x`` with ``x`` a submodule names ``pkg.x``; ``from . import name`` of anything else names the
    package's ``__init__``), plus the packages around it that the importer is not already inside
    (``import actstore.stream.plan`` from ``pipelines.x`` runs ``actstore`` and
    ``actstore.stream`` first)."""
    modules = project_modules() if modules is None else modules
    tops = {name.partition(".")[0] for name in modules}
    graph: dict[str, list[Edge]] = {name: [] for name in modules}
    for mod in modules.values():
        inside = {mod.name, *_ancestors(mod.name)}
        for imp in imports_of(mod):
            if imp.module.partition(".")[0] not in tops:
                continue
            where = f"{mod.path.relative_to(ROOT) if mod.path.is_relative_to(ROOT) else mod.path}:{imp.line}"
            named = imp.module
            while named and named not in modules:  # a name inside a module: the module holding it
                named = named.rpartition(".")[0]
            if not named:
                continue
            submodules = [f"{named}.{n}" for n in imp.names if named == imp.module and f"{named}.{n}" in modules]
            targets = list(submodules)
            if len(submodules) < len(imp.names) or not imp.names:
                targets.append(named)  # names taken from the module itself (or a plain `import`)
            for target in targets:
                implied = [a for a in _ancestors(target) if a not in inside]
                for t in [*implied, target]:
                    if t != mod.name:
                        graph[mod.name].append(Edge(mod.name, t, where))
    return graph


def cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle (as its edges) through each strongly connected component of more than one
    module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                connect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for comp in components:  # a shortest way back to the start, inside the component
        members, start = set(comp), comp[0]
        paths = {start: []}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for e in graph[v]:
                    if e.target == start:
                        cycle = [*paths[v], e]
                        break
                    if e.target in members and e.target not in paths:
                        paths[e.target] = [*paths[v], e]
                        nxt.append(e.target)
                if cycle:
                    break
            frontier = nxt
        found.append(cycle or [])
    return found


def test_project_imports_have_no_cycle():
    found = cycles(import_graph())
    text = "\n".join(
        " -> ".join([c[0].source, *(e.target for e in c)]) + "\n" + "\n".join(f"    {e.source} imports {e.target} at {e.where}" for e in c)
        for c in found
    )
    assert not found, f"import cycles (module-level and lazy imports):\n{text}"


def test_layers_import_only_downwards():
    bad = [
        f"{e.source} imports {e.target} at {e.where}"
        for edges in import_graph().values() for e in edges
        if e.target.partition(".")[0] in LAYERS.get(e.source.partition(".")[0], ())
    ]
    assert not bad, "layering: actstore and trainers stand alone, pipelines never import cli:\n" + "\n".join(bad)


def test_the_graph_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The graph builder and the cycle finder on a made-up package with each shape of import
    they must resolve, so that a clean graph of the real code means something."""
    files = {
        "pkg/__init__.py": "from .core import run\n",
        "pkg/core.py": "from . import util\nfrom .sub.deep import thing\n\ndef run():\n    from pkg.late import x\n",
        "pkg/util.py": "import json\n",
        "pkg/late.py": "from . import helper_name\n",  # not a submodule: the package's __init__
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..util import y\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.late import z\n",
        "tool.py": "try:\n    import pkg.core\nexcept ImportError:\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = project_modules(tmp_path, ("pkg",), ("tool",))
    targets = {name: sorted({e.target for e in edges}) for name, edges in import_graph(modules).items()}
    assert targets == {
        "pkg": ["pkg.core"],
        "pkg.core": ["pkg.late", "pkg.sub", "pkg.sub.deep", "pkg.util"],  # pkg.late lazily; pkg.sub's __init__ runs first
        "pkg.util": [],
        "pkg.late": ["pkg"],
        "pkg.sub": [],
        "pkg.sub.deep": ["pkg.util"],  # the TYPE_CHECKING import never runs
        "tool": ["pkg", "pkg.core"],
    }
    assert [i.guarded for i in imports_of(modules["tool"])] == [True]
    (cycle,) = cycles(import_graph(modules))  # pkg -> pkg.core -> (lazy) pkg.late -> pkg
    assert {e.source for e in cycle} == {"pkg", "pkg.core", "pkg.late"} and cycle[0].source == cycle[-1].target


# ---- d. file length ----------------------------------------------------------------------------
def test_library_files_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "actstore").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files under actstore/ longer than {MAX_LINES} lines (split them by concern): {long}"
