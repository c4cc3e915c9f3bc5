"""The package's import graph: no import cycle between its modules, no private name used across modules.

Every module of the installed package source is parsed with ``ast``; function-level (lazy) imports count like
top-level ones (a lazy import closes a cycle just as well, only later). An edge A -> B is ``import B`` or
``from B import name`` in A, and ``from P import B`` when B is a submodule of P (the compiled extension ``_C``
included). The implicit import of a module's parent package is not an edge (every submodule has it).

A private name has one leading underscore (dunders such as ``__version__`` are not private). Importing one from
another module (``from .hessian import _comm``), or reading one through a module that an import bound
(``hessian._comm(group)``), couples a module to another's implementation detail. Submodules named with an
underscore (``_backend``, ``_argtypes``, ``_C``) are package-internal modules: importing them within the package is
what they are for; the names inside them are checked like every module's.
"""

import ast
import pathlib

import sapsel_kernels


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_modules(root: pathlib.Path, pkg: str) -> dict:
    """{module name: its source path, or None for a compiled extension} of the package at ``root``."""
    mods = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not all((root / pathlib.Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(len(rel.parts))):
            continue  # not inside a (sub)package
        if path.suffix == ".py":
            parts = rel.with_suffix("").parts
            mods[".".join((pkg,) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
        elif path.suffix in (".so", ".pyd"):
            mods[".".join((pkg,) + rel.parent.parts + (path.name.split(".")[0],))] = None
    return mods


def scan(name: str, path: pathlib.Path, mods: dict, pkg: str):
    """One module's ({imported module: first line}, [private names used from other modules, with the line])."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    edges, private, bound = {}, [], {}  # bound: a name this module binds to a module of the package

    def ours(module: str) -> bool:
        return module == pkg or module.startswith(pkg + ".")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if ours(a.name):
                    edges.setdefault(a.name, node.lineno)
                    if a.asname:
                        bound[a.asname] = a.name
                    else:  # ``import pkg.a.b`` binds ``pkg``
                        bound[pkg] = pkg
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not ours(target):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    edges.setdefault(sub, node.lineno)
                    bound[a.asname or a.name] = sub
                else:
                    edges.setdefault(target, node.lineno)
                    if _private(a.name) and target != name:
                        private.append(f"{name}:{node.lineno} imports {a.name} from {target}")

    def module_of(expr):
        """The package module an expression names (``hessian``, ``sk.ops``), or None."""
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = module_of(expr.value)
            if base is not None and f"{base}.{expr.attr}" in mods:
                return f"{base}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            mod = module_of(node.value)
            if mod is not None and mod != name and f"{mod}.{node.attr}" not in mods:
                private.append(f"{name}:{node.lineno} reads {mod}.{node.attr}")
    edges.pop(name, None)
    return edges, private


def import_graph(root: pathlib.Path, pkg: str, extensions=()):
    """({module: {imported module: line}}, [private names used across modules]) of the package at ``root``;
    ``extensions``: compiled modules that may not be built (then no file names them), modules all the same."""
    mods = {**dict.fromkeys(extensions), **package_modules(root, pkg)}
    graph, private = {}, []
    for name, path in mods.items():
        graph[name], priv = scan(name, path, mods, pkg) if path is not None else ({}, [])
        private += priv
    return graph, sorted(set(private))


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each as one shortest cycle through it:
    ``["a:3 -> b:12 -> a"]`` (module:line of the import that makes the next edge), plus the component's other
    modules."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # a shortest way back to the start, inside the component (breadth first)
        start = min(comp)
        prev, todo = {start: None}, [start]
        while todo and start not in [w for v in todo for w in graph[v]]:
            nxt = []
            for v in todo:
                for w in sorted(graph[v]):
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            todo = nxt
        last = next(v for v in todo if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        path.reverse()
        cycle = " -> ".join(f"{v}:{graph[v][w]}" for v, w in zip(path, path[1:] + [start])) + f" -> {start}"
        others = sorted(comp - set(path))
        out.append(cycle + (f" (its strongly connected component also holds {', '.join(others)})" if others else ""))
    return out


ROOT = pathlib.Path(sapsel_kernels.__file__).resolve().parent
# the optional C++ extension (setup.py): ``from . import _C`` imports a module, whether or not this checkout built it
GRAPH, PRIVATE = import_graph(ROOT, sapsel_kernels.__name__, extensions=[sapsel_kernels.__name__ + "._C"])


def test_the_walker_sees_the_package():
    assert len(GRAPH) > 40, sorted(GRAPH)
    assert "sapsel_kernels.curvature.probe_loop" in GRAPH["sapsel_kernels.curvature.hessian"]  # top-level import
    assert "sapsel_kernels.forgetting.measure" in GRAPH["sapsel_kernels.forgetting.forget"]  # function-level import
    assert "sapsel_kernels.selection.selection_core" in GRAPH["sapsel_kernels.selection"]  # a package's own module
    assert "sapsel_kernels.curvature.hessian" in GRAPH["sapsel_kernels.update.unlearn"]  # across subpackages, ``..``
    assert "sapsel_kernels.reference.philox" in GRAPH["sapsel_kernels.reference.probes"]  # subpackage, relative
    assert "sapsel_kernels._C" in GRAPH["sapsel_kernels._ext"]  # the compiled extension, built or not


def test_the_checks_catch_a_cycle_and_private_names(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .b import _g\n\n\ndef f():\n    return _g()\n")
    (pkg / "b.py").write_text("def _g():\n    from .sub import c\n    return c._h()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n\n\ndef _h():\n    return a\n")
    graph, private = import_graph(pkg, "pkg")
    assert cycles(graph) == ["pkg.a:1 -> pkg.b:2 -> pkg.sub.c:1 -> pkg.a"]
    assert private == ["pkg.a:1 imports _g from pkg.b", "pkg.b:3 reads pkg.sub.c._h"]


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles between the package's modules:\n" + "\n".join(found)


def test_the_flat_paths_are_aliases_not_modules():
    """The earlier flat paths (``sapsel_kernels.hessian``) are names the package registers for the moved modules
    (``MOVED``), not files: the walker sees each module once, at its one place, so an alias adds no node and no edge.
    Importing a flat path gives the moved module itself."""
    import importlib

    for old, new in sapsel_kernels.MOVED.items():
        assert f"sapsel_kernels.{old}" not in GRAPH and f"sapsel_kernels.{new}" in GRAPH, (old, new)
        assert importlib.import_module(f"sapsel_kernels.{old}") is importlib.import_module(f"sapsel_kernels.{new}")
    assert callable(sapsel_kernels.forget) and callable(sapsel_kernels.unlearn)  # the functions, not the modules


def test_a_pickle_of_a_flat_path_loads():
    """An object pickled when its class lived at the flat path (``sapsel_kernels.hessian.ProbeConfig``) loads."""
    import pickle

    blob = pickle.dumps(sapsel_kernels.ProbeConfig(per_pass=3), protocol=2)  # protocol 2 names the module in ASCII
    assert b"sapsel_kernels.curvature.hessian\nProbeConfig" in blob
    old = blob.replace(b"sapsel_kernels.curvature.hessian\n", b"sapsel_kernels.hessian\n")
    assert pickle.loads(old) == sapsel_kernels.ProbeConfig(per_pass=3)


def test_no_private_names_across_modules():
    assert not PRIVATE, "private names used across modules:\n" + "\n".join(PRIVATE)
