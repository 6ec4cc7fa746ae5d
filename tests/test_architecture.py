"""The shape of the code, checked from the source: stages that only import the ones before them, no import
cycles, small files, one source of truth per setting, and a map (docs/architecture.md) that covers the tree."""
import ast
import os
import re

import pytest

from conftest import ROOT
from fragile.core.cli import header_constants

STAGES = ("core", "watermark", "deploy", "tamper", "report")   # each may import only those before it
SCRIPTS = ("train.py", "generate_samples.py", "eval.py", "verify.py", "plot.py", "bench.py", "serve.py", "export.py")
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
    assert code_lines(path) <= MAX_LINES


def code_lines(path):
    """A file's lines, a script's config header aside: that block is one constant per setting and grows by design
    with every attack and method (a section each); the code below it is what must stay small."""
    lines = open(path).read().splitlines()
    if os.path.basename(path) in SCRIPTS:
        start = next(i for i, line in enumerate(lines) if line.startswith("# ---") and line.endswith(" config"))
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("# ---"))
        del lines[start:end + 1]
    return len(lines)


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
    """Settings reach the library as parameter objects, and results record them under the objects' field names:
    no stage reads a header name out of a config (the previous schema's reader lifts a few through one table)."""
    pattern = re.compile(r"""config(\.get\(|\[)\s*["'][A-Z][A-Z0-9_]+["']""")
    hits = [f"{os.path.relpath(p, ROOT)}:{i}" for p in python_files(*(os.path.join("fragile", s) for s in STAGES))
            for i, line in enumerate(open(p), 1) if pattern.search(line)]
    assert hits == []
    assert not re.search(r"HEADER_PREFIX|metadata=\{\"header\"", "".join(open(p).read() for p in python_files("fragile")))


# ----------------------------------------------------------------------------- a setting read by its name

def header_and_body(script):
    """(the header's constants with their values, every name the rest of the script reads, and every call
    ``SomethingParams(field=...)`` / ``SomethingRecipe(...)`` with the keywords it passes)."""
    path = os.path.join(ROOT, script)
    tree = ast.parse(open(path).read(), path)
    first_import = next(i for i, node in enumerate(tree.body) if isinstance(node, (ast.Import, ast.ImportFrom)))
    namespace = {"__file__": path}
    for node in tree.body[:first_import]:
        if isinstance(node, ast.Assign):   # the header's own constant expressions (0.25 / 255)
            namespace[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, "eval"), {})
    names, calls = set(), []
    for node in tree.body[first_import:]:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                names.add(n.id)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id.endswith("Params"):
                calls.append((n.func.id, {k.arg for k in n.keywords}, n))
    return {c: namespace[c] for c in header_constants(namespace)}, names, calls


def parameter_classes():
    """Every parameter class the scripts build, by name."""
    import fragile.tamper.context as context
    from fragile.tamper.registry import RUNNABLE
    from fragile.watermark.methods import METHODS
    from fragile.watermark.methods.fragility import FragilityParams
    from fragile.watermark.methods.surrogates import SurrogateParams
    from fragile.watermark.methods.paper import PaperParams
    classes = [context.FinetuneParams, context.PoisonParams, FragilityParams, SurrogateParams, PaperParams,
               *(a.params for a in RUNNABLE.values() if a.params), *(m.params for m in METHODS.values() if m.params)]
    return {cls.__name__: cls for cls in classes}


def test_parameter_objects_are_frozen():
    import dataclasses
    for cls in parameter_classes().values():
        assert cls.__dataclass_params__.frozen, cls.__name__
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), dataclasses.fields(cls)[0].name, None)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_header_constant_is_read_by_its_name(script):
    constants, names, _ = header_and_body(script)
    assert [c for c in constants if c not in names] == [], "header constants nothing reads by name"


@pytest.mark.parametrize("script", ("eval.py", "generate_samples.py"))
def test_every_parameter_object_is_built_field_by_field_from_the_header(script):
    """No field is left to a default the researcher cannot see in the header, and no string builds a name."""
    import dataclasses
    constants, _, calls = header_and_body(script)
    classes = parameter_classes()
    assert calls, "the script builds its parameter objects"
    for name, keywords, node in calls:
        fields = {f.name for f in dataclasses.fields(classes[name])}
        assert keywords == fields, f"{script}: {name} built without {sorted(fields - keywords)}"
        for keyword in node.keywords:   # each field is a header constant or a parameter object built the same way
            value = keyword.value
            assert isinstance(value, (ast.Name, ast.Call)), f"{script}: {name}.{keyword.arg}"
            if isinstance(value, ast.Name):
                assert value.id in constants, f"{script}: {name}.{keyword.arg} = {value.id}, not a header constant"


@pytest.mark.parametrize("script", ("eval.py", "generate_samples.py"))
def test_the_header_holds_the_parameter_objects_defaults(script):
    """Library users (and bench.py) get the same defaults as the scripts: a field's default is its constant's."""
    import dataclasses
    constants, _, calls = header_and_body(script)
    classes = parameter_classes()
    for name, _, node in calls:
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(classes[name])}
        for keyword in node.keywords:
            if isinstance(keyword.value, ast.Name):
                assert constants[keyword.value.id] == defaults[keyword.arg], f"{script}: {keyword.value.id}"


def test_the_architecture_map_covers_every_package():
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    packages = sorted({module_name(p).rpartition(".")[0] if not p.endswith("__init__.py") else module_name(p)
                       for p in python_files("fragile")})
    missing = [p for p in packages if p.replace(".", "/") + "/" not in doc]
    assert missing == []
