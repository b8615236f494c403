"""The package graph runs one way, as docs/ARCHITECTURE.md draws it:

    netdef  <-  layers  <-  solver  <-  zoo  <-  brewnet (CLI and public API)

and inside layers: kernels and dataio know nothing of layer definitions. Read
from the source (every import statement, lazy ones inside functions too), so a
wrong-way edge fails here before it becomes a cycle or a heavy import.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# checkout folder -> installed package
FOLDERS = {"brewnet": "brewnet", "netdef": "brewnet.netdef", "layers": "brewnet.layers",
           "solver": "brewnet.solver", "zoo": "brewnet.zoo"}

# part -> the parts it may import (its own included)
ALLOWED = {
    "netdef": {"netdef"},
    "layers.kernels": {"netdef", "layers.kernels"},
    "layers.dataio": {"netdef", "layers.kernels", "layers.dataio"},
    "layers.families": {"netdef", "layers.core", "layers.kernels", "layers.dataio", "layers.families"},
    # the core loads the families on first lookup (registry) and nothing else of theirs
    "layers.core": {"netdef", "layers.core", "layers.kernels", "layers.families"},
    "solver": {"netdef", "layers.core", "layers.kernels", "layers.dataio", "solver"},
    "zoo": {"netdef", "layers.core", "layers.kernels", "layers.dataio", "solver", "zoo"},
    "front": {"netdef", "layers.core", "layers.kernels", "layers.dataio", "layers.families", "solver", "zoo",
              "front"},
}
# third-party modules that belong to the front door only (a library user never needs them)
FRONT_ONLY = {"click"}


def part_of(module):
    """The architectural part a brewnet module belongs to, or None for modules outside brewnet."""
    parts = module.split(".")
    if parts[0] != "brewnet":
        return None
    if len(parts) == 1 or parts[1] not in ("netdef", "layers", "solver", "zoo"):
        return "front"
    if parts[1] == "layers":
        if len(parts) > 2 and parts[2] in ("kernels", "dataio", "families"):
            return f"layers.{parts[2]}"
        return "layers.core"
    return parts[1]


def source_modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            is_package = rel[-1] == "__init__"
            name = ".".join((package, *rel[:-1])) if is_package else ".".join((package, *rel))
            yield path, name, is_package


def imports_of(path, name, is_package):
    """(line, imported module, imported names) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module, [alias.name for alias in node.names]


def all_imports():
    for path, name, is_package in source_modules():
        for line, module, names in imports_of(path, name, is_package):
            yield f"{path.relative_to(ROOT)}:{line}", name, module, names


def test_sources_are_found():
    names = {name for _, name, _ in source_modules()}
    assert {"brewnet.cli", "brewnet.netdef.io", "brewnet.layers.net", "brewnet.solver.solver",
            "brewnet.zoo.registry"} <= names


def test_packages_import_only_to_their_left():
    wrong = []
    for where, importer, module, names in all_imports():
        src = part_of(importer)
        targets = [module] + [f"{module}.{n}" for n in names]
        for target in targets:
            dst = part_of(target)
            # `from brewnet.layers import kernels` names the subpackage, not the core
            if dst and target == module and names and any(part_of(f"{module}.{n}") != dst for n in names):
                continue
            if dst and dst not in ALLOWED[src]:
                wrong.append(f"{where}: {importer} ({src}) imports {target} ({dst})")
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_front_door_dependencies_stay_in_the_front_door():
    wrong = [f"{where}: {importer} imports {module}" for where, importer, module, _ in all_imports()
             if part_of(importer) != "front" and module.split(".")[0] in FRONT_ONLY]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_packages_private_names():
    wrong = []
    for where, importer, module, names in all_imports():
        if part_of(module) is None or part_of(module) == part_of(importer) and module.rsplit(".", 1)[0] == \
                importer.rsplit(".", 1)[0]:
            continue
        wrong += [f"{where}: {importer} imports {module}.{n}" for n in names
                  if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def module_file(module):
    """The checkout file of a brewnet module (None for a function, class or foreign module)."""
    parts = module.split(".")
    if parts[0] != "brewnet":
        return None
    folder, rest = ("brewnet", parts[1:])
    if len(parts) > 1 and parts[1] in ("netdef", "layers", "solver", "zoo"):
        folder, rest = parts[1], parts[2:]
    path = (ROOT / folder).joinpath(*rest)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if rest and candidate.is_file() or not rest and candidate.name == "__init__.py" and candidate.is_file():
            return candidate
    return None


def test_no_module_reaches_into_another_modules_private_members():
    # `from brewnet.layers.kernels import parallel` then `parallel._pool`: a private member used from outside
    wrong = []
    for path, name, is_package in source_modules():
        bound = {}
        for _, module, names in imports_of(path, name, is_package):
            bound.update({n: f"{module}.{n}" for n in names if module_file(f"{module}.{n}")})
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {bound[node.value.id]}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_a_wrong_way_edge():
    # the checker itself: a netdef module importing layers is flagged, the reverse is not
    assert "layers.core" not in ALLOWED[part_of("brewnet.netdef.upgrade")]
    assert "netdef" in ALLOWED[part_of("brewnet.layers.families.conv")]
    assert "layers.families" not in ALLOWED[part_of("brewnet.layers.kernels.im2col")]
    assert part_of("numpy") is None and part_of("brewnet.commands.train") == "front"
    assert module_file("brewnet.layers.kernels.parallel") and module_file("brewnet.solver")
    assert module_file("brewnet.layers.kernels.parallel.run") is None
