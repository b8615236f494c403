"""brewnet: Caffe's workflow in Python. The public API uses pycaffe's names.

    import brewnet
    net = brewnet.Net("deploy.prototxt", weights="model.caffemodel", phase=brewnet.TEST)
    solver = brewnet.get_solver("solver.prototxt")

Heavy modules load on first use, so ``import brewnet`` stays fast.
"""

import os

# In a source checkout brewnet's subpackages (netdef/, layers/, solver/, zoo/) sit beside
# this folder rather than in it; an installed brewnet (pip install ., or -e) has them
# inside. Looking beside it too lets the checkout run as it is (python -m pytest, a
# git worktree) whatever brewnet is installed.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "netdef")) and \
        os.path.isfile(os.path.join(_checkout, "netdef", "caffe.proto")):
    __path__.append(_checkout)

# before anything loads numpy: OpenBLAS reads its kernel choice once, when it loads
from brewnet.blas_core import choose_before_numpy  # noqa: E402

choose_before_numpy()

from brewnet.layers.kernels.backend import set_device, set_mode_cpu, set_mode_gpu, to_numpy  # noqa: E402
from brewnet.layers.registry import provide_module  # noqa: E402
from brewnet.lazy import lazy_getattr  # noqa: E402
from brewnet.netdef.caffe_pb2 import TEST, TRAIN  # noqa: E402

__version__ = "0.1.0"

# public name -> "module:attribute", resolved lazily
_LAZY = {
    "Net": "brewnet.api:Net",
    "Layer": "brewnet.layers.base:Layer",
    "Blob": "brewnet.layers.blob:Blob",
    "DefinitionError": "brewnet.netdef.errors:DefinitionError",
    "get_solver": "brewnet.api:get_solver",
    "SGDSolver": "brewnet.api:SGDSolver",
    "NesterovSolver": "brewnet.api:NesterovSolver",
    "AdaGradSolver": "brewnet.api:AdaGradSolver",
    "RMSPropSolver": "brewnet.api:RMSPropSolver",
    "AdaDeltaSolver": "brewnet.api:AdaDeltaSolver",
    "AdamSolver": "brewnet.api:AdamSolver",
    "set_random_seed": "brewnet.layers.net:set_random_seed",
}


def _install_caffe_alias():
    """A Python layer's module imports ``caffe`` and there is none: brewnet.pycaffe stands in."""
    from brewnet import pycaffe

    return pycaffe.install(reason="a Python layer's module imports caffe")


provide_module("caffe", _install_caffe_alias)

__all__ = ["TEST", "TRAIN", "set_mode_cpu", "set_mode_gpu", "set_device", "to_numpy", *_LAZY]


__getattr__ = lazy_getattr(_LAZY, __name__, globals())
