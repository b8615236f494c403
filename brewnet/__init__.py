"""brewnet: Caffe's workflow in Python. The public API uses pycaffe's names.

    import brewnet
    net = brewnet.Net("deploy.prototxt", weights="model.caffemodel", phase=brewnet.TEST)
    solver = brewnet.get_solver("solver.prototxt")

Heavy modules load on first use, so ``import brewnet`` stays fast.
"""

import importlib

from netdef.caffe_pb2 import TEST, TRAIN
from layers.backend import set_device, set_mode_cpu, set_mode_gpu, to_numpy

__version__ = "0.1.0"

# public name -> "module:attribute", resolved lazily
_LAZY = {
    "Net": "brewnet.api:Net",
    "Layer": "layers.base:Layer",
    "Blob": "layers.blob:Blob",
    "DefinitionError": "netdef.errors:DefinitionError",
    "get_solver": "solver:get_solver",
    "SGDSolver": "solver:SGDSolver",
    "NesterovSolver": "solver:NesterovSolver",
    "AdaGradSolver": "solver:AdaGradSolver",
    "RMSPropSolver": "solver:RMSPropSolver",
    "AdaDeltaSolver": "solver:AdaDeltaSolver",
    "AdamSolver": "solver:AdamSolver",
    "set_random_seed": "layers.net:set_random_seed",
}

__all__ = ["TEST", "TRAIN", "set_mode_cpu", "set_mode_gpu", "set_device", "to_numpy", *_LAZY]


def __getattr__(name):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'brewnet' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
