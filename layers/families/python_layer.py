"""The Python layer: a user's class named in the prototxt, as in pycaffe.

    layer { type: "Python" bottom: "x" top: "y"
            python_param { module: "my_layers" layer: "Scale" param_str: "2.5" } }

The module is imported from the current directory or PYTHONPATH; the class
subclasses ``brewnet.Layer`` and defines setup/reshape/forward/backward with
pycaffe's signatures (``bottom[0].data``, ``top[0].diff``...). As in Caffe,
``self.param_str`` is set before ``setup``. A module written for Caffe
(``import caffe``, ``class X(caffe.Layer)``) works unchanged: when its
``import caffe`` finds no Caffe, the loader installs the provider registered
for "caffe" (brewnet.pycaffe as an alias; see registry.provide_module) and
imports it again; a real Caffe installed beside brewnet is never shadowed.
Layers packaged elsewhere can instead register a type of their own through
the ``brewnet.layers`` entry point group (see layers/registry.py).
"""

import importlib
import os
import sys

import numpy

from brewnet.layers.base import Layer, layer_error
from brewnet.layers.registry import module_provider, register


def load_layer_class(param):
    """The class named by a LayerParameter's python_param, with a clear error."""
    pp = param.python_param

    def error(message):  # no layer exists yet: the factory names it
        return layer_error(param.name, "Python", message)

    if not pp.module or not pp.layer:
        raise error("python_param needs both 'module' and 'layer'")
    # Caffe's python layers are found from the working directory as well
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = _import_user_module(pp.module)
    except ModuleNotFoundError as exc:
        if exc.name and not (pp.module == exc.name or pp.module.startswith(exc.name + ".")):
            raise  # a missing import *inside* the user's module: show it as is
        raise error(f"cannot import python_param module '{pp.module}' (looked in {cwd} and PYTHONPATH)") from None
    cls = getattr(module, pp.layer, None)
    if cls is None:
        raise error(f"module '{pp.module}' ({getattr(module, '__file__', '?')}) has no class '{pp.layer}'")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise error(f"'{pp.module}.{pp.layer}' must be a class deriving from brewnet.Layer")
    return cls


def _import_user_module(name):
    """importlib.import_module, except that a top-level module the user's module imports
    and does not find (``caffe``) is installed from its registered provider, once, and the
    import tried again."""
    tried = set()
    while True:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").partition(".")[0]
            if not missing or missing in tried or name == exc.name or name.startswith(exc.name + "."):
                raise
            install = module_provider(missing)
            if install is None or not install():
                raise
            tried.add(missing)


@register("Python")
class Python(Layer):
    """Factory: constructing it returns an instance of the user's class."""

    def __new__(cls, param, xp=numpy, phase=None, rng=None, dtype=numpy.float32):
        user_cls = load_layer_class(param)
        layer = user_cls.__new__(user_cls)
        layer.__init__(param, xp=xp, phase=phase, rng=rng, dtype=dtype)
        if user_cls.type is None:
            layer.type = "Python"
        layer.param_str = param.python_param.param_str
        return layer  # not a Python instance, so __init__ is not run again
