"""The Python layer: a user's class named in the prototxt, as in pycaffe.

    layer { type: "Python" bottom: "x" top: "y"
            python_param { module: "my_layers" layer: "Scale" param_str: "2.5" } }

The module is imported from the current directory or PYTHONPATH; the class
subclasses ``brewnet.Layer`` and defines setup/reshape/forward/backward with
pycaffe's signatures (``bottom[0].data``, ``top[0].diff``...). As in Caffe,
``self.param_str`` is set before ``setup``. Layers packaged elsewhere can
instead register a type of their own through the ``brewnet.layers`` entry
point group (see layers/registry.py).
"""

import importlib
import os
import sys

import numpy

from brewnet.layers.base import Layer, layer_error
from brewnet.layers.registry import register


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
        module = importlib.import_module(pp.module)
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
