"""Layer registry: Caffe type strings (and V1 enum names) -> layer classes."""

import difflib

from brewnet.netdef.errors import DefinitionError

_LAYERS = {}
_V1_NAMES = {}
_plugins_loaded = False
_MODULE_PROVIDERS = {}


class UnknownLayerTypeError(DefinitionError):
    """A type string no layer is registered under: a mistake in a net definition."""


def register(type_name, v1=None):
    """Class decorator: ``@register("ReLU", v1="RELU")``."""

    def wrap(cls):
        if type_name in _LAYERS and _LAYERS[type_name] is not cls:
            raise ValueError(f"layer type {type_name!r} registered twice")
        _LAYERS[type_name] = cls
        cls.type = type_name
        if v1:
            _V1_NAMES[v1] = type_name
        return cls

    return wrap


def v1_type_name(enum_name):
    """The current type string for a V1 LayerType enum name (e.g. RELU -> ReLU)."""
    _ensure_loaded()
    return _V1_NAMES.get(enum_name)


def _ensure_loaded():
    # importing the families registers their classes; plugins come from entry points
    global _plugins_loaded
    from brewnet.layers import families as all_layers  # noqa: F401

    if not _plugins_loaded:
        _plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group="brewnet.layers"):
            ep.load()


def known_types():
    _ensure_loaded()
    return sorted(_LAYERS)


def get_layer_class(type_name, layer_name=None):
    _ensure_loaded()
    cls = _LAYERS.get(type_name)
    if cls is not None:
        return cls
    where = f"layer {layer_name!r}: " if layer_name else ""
    close = difflib.get_close_matches(type_name, list(_LAYERS), n=1, cutoff=0.6)
    close += [t for t in _LAYERS if t.lower() == str(type_name).lower() and t not in close]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownLayerTypeError(
        f"{where}unknown layer type {type_name!r}{hint}; known types: {', '.join(sorted(_LAYERS))}"
    )


# -- modules a Python layer's own module may import ----------------------------------------
def provide_module(name, install):
    """Register ``install()`` as the way to make top-level module ``name`` importable when a
    Python layer's module imports it and it is missing (brewnet's front door registers
    "caffe": brewnet.pycaffe as an alias). ``install`` returns True when it made the module
    importable."""
    _MODULE_PROVIDERS[name] = install


def module_provider(name):
    """The ``install`` registered for top-level module ``name``, or None."""
    return _MODULE_PROVIDERS.get(name)
