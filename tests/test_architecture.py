"""The shape of the code, checked from the source: stages that only import the ones before them, no import
cycles, small files, one source of truth per setting, and a map (docs/architecture.md) that covers the tree."""
import ast
import os
import re

import pytest

from conftest import ROOT
from fragile.core.cli import header_constants, header_names

STAGES = ("core", "watermark", "attacks", "experiments", "report")   # each may import only those before it
SCRIPTS = ("train.py", "generate_samples.py", "eval.py", "verify.py", "plot.py", "bench.py", "serve.py")
MAX_LINES = 350


def python_files(*folders):
    for folder in folders:
        for root, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


MODULES = {module_name(p): p for p in python_files("fragile", "models")}


def package_of(name, path):
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def imports_of(name):
    """The suite's modules that ``name`` imports anywhere in its source (function-level imports included)."""
    path = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = package_of(name, path).split(".")
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:   # `import fragile.core.cli` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def stage(name):
    parts = name.split(".")
    if parts[0] == "models":
        return -1
    return STAGES.index(parts[1]) if len(parts) > 1 else None   # the fragile package itself has no stage


def test_every_module_belongs_to_a_stage():
    loose = [name for name in MODULES if name.startswith("fragile.") and name.split(".")[1] not in STAGES]
    assert loose == [], "modules outside the stage packages"


def test_no_stage_imports_a_later_one():
    wrong = [(a, b) for a, targets in GRAPH.items() for b in targets
             if stage(a) is not None and stage(b) is not None and stage(b) > stage(a)]
    assert wrong == []
    assert GRAPH["fragile"] == set(), "the package's __init__ imports nothing"


def test_there_is_no_import_cycle():
    state, path = {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_checker_sees_imports_a_lower_stage_must_not_make(tmp_path):
    """The graph above is only as good as its import reader: a relative import two levels up is resolved."""
    assert "fragile.core.cli" in GRAPH["fragile.watermark.methods.paper"]
    assert "fragile.watermark.methods.paper" in GRAPH["fragile.watermark.methods.margin"]   # `from . import paper`
    assert {"models", "fragile.core.data"} <= GRAPH["fragile.core.io"]   # function-level imports count


@pytest.mark.parametrize("path", sorted(set(python_files("fragile", "models", "tests")) |
                                        {os.path.join(ROOT, s) for s in SCRIPTS}), ids=os.path.basename)
def test_no_file_is_long(path):
    assert sum(1 for _ in open(path)) <= MAX_LINES


def code_and_scripts():
    yield from python_files("fragile", "models", "tests")
    yield from (os.path.join(ROOT, s) for s in SCRIPTS)
    yield from (os.path.join(ROOT, "scripts", s) for s in sorted(os.listdir(os.path.join(ROOT, "scripts"))))
    yield os.path.join(ROOT, ".ci", "run")


def test_code_names_no_issue_numbers():
    pattern = re.compile(r"\b(issue|task)s?\s*#?\d", re.IGNORECASE)
    hits = [f"{os.path.relpath(p, ROOT)}:{i}" for p in code_and_scripts()
            for i, line in enumerate(open(p), 1) if pattern.search(line)]
    assert hits == []


def test_library_code_never_reads_a_script_constant_by_name():
    """Settings reach the library as parameter dataclasses. (fragile/report reads the config *recorded* in a
    results file, which is data, not a setting of the run.)"""
    pattern = re.compile(r"""config(\.get\(|\[)\s*["'][A-Z][A-Z0-9_]+["']""")
    stages = [os.path.join("fragile", stage) for stage in STAGES if stage != "report"]
    hits = [f"{os.path.relpath(p, ROOT)}:{i}" for p in python_files(*stages)
            for i, line in enumerate(open(p), 1) if pattern.search(line)]
    assert hits == []


# ----------------------------------------------------------------------------- one source of truth per setting

def filled_by(script):
    """The parameter dataclasses a script fills from its header."""
    from fragile.attacks.context import FinetuneParams, PoisonParams
    from fragile.experiments.registry import ATTACKS
    from fragile.watermark.methods import METHODS
    from fragile.watermark.methods.fragility import FragilityParams
    return {"eval.py": [FinetuneParams, PoisonParams, *(a.params for a in ATTACKS.values() if a.params)],
            "generate_samples.py": [FragilityParams, *(m.params for m in METHODS.values() if m.params)]}.get(script, [])


def header_and_body(script):
    path = os.path.join(ROOT, script)
    tree = ast.parse(open(path).read(), path)
    first_import = next(i for i, node in enumerate(tree.body) if isinstance(node, (ast.Import, ast.ImportFrom)))
    namespace = {"__file__": path}
    for node in tree.body[:first_import]:
        if isinstance(node, ast.Assign):   # the header's own constant expressions (0.25 / 255)
            namespace[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, "eval"), {})
    body = set()   # every name the rest of the script uses, as a name or as a string key (bench.py's cfg["ARCH"])
    for node in tree.body[first_import:]:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                body.add(n.id)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                body.add(n.value)
    return header_constants(namespace), body


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_header_constant_is_read_and_every_parameter_has_its_constant(script):
    constants, body = header_and_body(script)
    filled = set().union(*(header_names(cls) for cls in filled_by(script)))
    assert [c for c in constants if c not in body and c not in filled] == [], "dead header constants"
    assert sorted(filled - set(constants)) == [], "parameters without a header constant"


def test_the_architecture_map_covers_every_package():
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    packages = sorted({module_name(p).rpartition(".")[0] if not p.endswith("__init__.py") else module_name(p)
                       for p in python_files("fragile")})
    missing = [p for p in packages if p.replace(".", "/") + "/" not in doc]
    assert missing == []
