"""Names a package exposes without importing their modules until first use."""

import importlib


def lazy_getattr(table, module_name, namespace, submodules=()):
    """A module-level ``__getattr__``: ``table`` maps public names to "module:attribute",
    resolved on first use and then kept in ``namespace`` (the module's globals);
    ``submodules`` are imported when asked for as attributes."""

    def __getattr__(name):
        if name in submodules:
            return importlib.import_module(f"{module_name}.{name}")
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        source, attr = target.split(":")
        value = getattr(importlib.import_module(source), attr)
        namespace[name] = value
        return value

    return __getattr__
