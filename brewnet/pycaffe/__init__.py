"""brewnet.pycaffe: pycaffe's ``caffe`` module, on brewnet. A drop-in:

    import brewnet.pycaffe as caffe          # the one line that changes
    net = caffe.Net("deploy.prototxt", "weights.caffemodel", caffe.TEST)
    solver = caffe.SGDSolver("solver.prototxt"); solver.step(10)
    from brewnet.pycaffe import layers as L, params as P       # NetSpec
    brewnet.pycaffe.io, .draw, .net_spec, .coord_map, .classifier, .detector, .proto.caffe_pb2

To keep ``import caffe`` itself unchanged, opt in to an alias:
``brewnet.pycaffe.install()`` (then ``import caffe``, ``caffe.io``,
``from caffe.proto import caffe_pb2`` ... are these modules), or run a program
as ``python -m brewnet.pycaffe script.py ARGS`` (or ``-m module ARGS``). The
alias never shadows a real Caffe: when one is importable, install() leaves it
and warns. Python layers written for Caffe (``import caffe``,
``class X(caffe.Layer)``) need none of this: the Python layer loader installs
the alias for them when ``import caffe`` would otherwise fail.

Net and the solvers are brewnet's front-door classes (brewnet.Net ...), so a
solver's ``net`` and ``test_nets`` are the Net users construct. Names load on
first use.
"""

import importlib
import importlib.machinery
import logging
import os
import pkgutil
import sys
import time
import warnings

from brewnet.layers.kernels.backend import set_device, set_mode_cpu, set_mode_gpu
from brewnet.lazy import lazy_getattr
from brewnet.netdef.caffe_pb2 import TEST, TRAIN

# the Caffe release whose Python interface this follows
__version__ = "1.0.0"

# public name -> "module:attribute", resolved on first use
_LAZY = {
    "Net": "brewnet.api:Net",
    "SGDSolver": "brewnet.api:SGDSolver",
    "NesterovSolver": "brewnet.api:NesterovSolver",
    "AdaGradSolver": "brewnet.api:AdaGradSolver",
    "RMSPropSolver": "brewnet.api:RMSPropSolver",
    "AdaDeltaSolver": "brewnet.api:AdaDeltaSolver",
    "AdamSolver": "brewnet.api:AdamSolver",
    "get_solver": "brewnet.api:get_solver",
    "Layer": "brewnet.layers.base:Layer",
    "set_random_seed": "brewnet.layers.net:set_random_seed",
    "Classifier": "brewnet.pycaffe.classifier:Classifier",
    "Detector": "brewnet.pycaffe.detector:Detector",
    "NetSpec": "brewnet.pycaffe.net_spec:NetSpec",
    "layers": "brewnet.pycaffe.net_spec:layers",
    "params": "brewnet.pycaffe.net_spec:params",
    "to_proto": "brewnet.pycaffe.net_spec:to_proto",
}
# pycaffe's submodules (``caffe.io`` works after a plain ``import caffe``)
SUBMODULES = ("classifier", "coord_map", "detector", "draw", "io", "net_spec", "proto", "pycaffe")

__all__ = ["TEST", "TRAIN", "set_mode_cpu", "set_mode_gpu", "set_device", "layer_type_list", "has_nccl",
           "init_log", "log", "Timer", "NCCL", "solver_count", "set_solver_count", "solver_rank",
           "set_solver_rank", "set_multiprocess", "install", *_LAZY, *SUBMODULES]


__getattr__ = lazy_getattr(_LAZY, __name__, globals(), SUBMODULES)


def __dir__():
    return sorted(set(globals()) | set(__all__))


# -- pycaffe's module functions ------------------------------------------------------------

def layer_type_list():
    """Every registered layer type (Caffe's LayerRegistry::LayerTypeList), sorted."""
    from brewnet.layers import registry

    return registry.known_types()


def has_nccl():
    """brewnet trains on one device: no NCCL."""
    return False


class NCCL:
    """pycaffe's multi-GPU helper; brewnet has no NCCL (has_nccl() is False)."""

    def __init__(self, solver=None, uid=None):
        raise RuntimeError("brewnet has no NCCL support (caffe.has_nccl() is False): it trains on one device")


_solvers = {"count": 1, "rank": 0, "multiprocess": False}


def solver_count():
    return _solvers["count"]


def set_solver_count(count):
    _solvers["count"] = int(count)


def solver_rank():
    return _solvers["rank"]


def set_solver_rank(rank):
    _solvers["rank"] = int(rank)


def set_multiprocess(multiprocess):
    _solvers["multiprocess"] = bool(multiprocess)


_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


def init_log(level=0, stderr=True):
    """Show brewnet's log (glog format) on stderr from glog level ``level`` up
    (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL), as pycaffe's init_log."""
    from brewnet.solver.log import setup_logging

    setup_logging(level=_GLOG_LEVELS.get(int(level), logging.INFO), stream=sys.stderr)


def log(message):
    """Write ``message`` to brewnet's log at INFO level (pycaffe's caffe.log)."""
    logging.getLogger("brewnet").info("%s", message)


class Timer:
    """pycaffe's Timer: start(), stop(), ms (milliseconds between them; a running
    timer is stopped first, as Caffe's Timer::MilliSeconds does)."""

    def __init__(self):
        self._start = self._stop = None

    def start(self):
        self._start, self._stop = time.perf_counter(), None

    def stop(self):
        if self._start is not None and self._stop is None:
            self._stop = time.perf_counter()

    @property
    def ms(self):
        if self._start is None:
            return 0.0
        self.stop()
        return (self._stop - self._start) * 1000.0


# -- the `import caffe` alias --------------------------------------------------------------

class CaffeAliasWarning(UserWarning):
    """install() left `caffe` alone (a real Caffe, or another module of that name)."""


def _real_caffe():
    """Where an importable `caffe` other than this one lives, or None. A Caffe source
    folder whose _caffe extension was never built cannot be imported and does not count."""
    spec = importlib.machinery.PathFinder.find_spec("caffe")
    if spec is None or spec.origin in (None, "namespace"):
        return None
    folder = spec.submodule_search_locations
    if folder:
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        built = any(name.startswith("_caffe") and name.endswith(suffixes)
                    for location in folder for name in _listdir(location))
        if not built:
            return None
    return spec.origin


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def install(reason=None):
    """Make ``import caffe`` (and ``caffe.io``, ``caffe.proto.caffe_pb2`` ...) give
    brewnet.pycaffe. A `caffe` already imported, or a real Caffe importable from
    sys.path, is left as it is, with a warning saying so. Returns True when
    ``import caffe`` now gives brewnet.pycaffe."""
    this = sys.modules[__name__]
    current = sys.modules.get("caffe")
    if current is this:
        return True
    if current is not None:
        where = getattr(current, "__file__", None) or repr(current)
        warnings.warn(f"a module named caffe is already imported ({where}): `import caffe` stays that one "
                      f"(use `import brewnet.pycaffe as caffe` for brewnet's)", CaffeAliasWarning, stacklevel=2)
        return False
    real = _real_caffe()
    if real is not None:
        warnings.warn(f"a real Caffe is importable ({real}): `import caffe` stays that one, brewnet does not "
                      f"shadow it (use `import brewnet.pycaffe as caffe` for brewnet's)", CaffeAliasWarning,
                      stacklevel=2)
        return False
    sys.modules["caffe"] = this
    for info in pkgutil.iter_modules(__path__):
        if info.name != "__main__":
            sys.modules[f"caffe.{info.name}"] = importlib.import_module(f"{__name__}.{info.name}")
    sys.modules["caffe.proto.caffe_pb2"] = sys.modules[f"{__name__}.proto.caffe_pb2"]
    logging.getLogger("brewnet").info("`import caffe` gives brewnet.pycaffe%s", f" ({reason})" if reason else "")
    return True


def uninstall():
    """Undo install(): `caffe` and its submodules leave sys.modules (when they are ours)."""
    this = sys.modules[__name__]
    if sys.modules.get("caffe") is not this:
        return
    for name in [n for n in sys.modules if n == "caffe" or n.startswith("caffe.")]:
        module = sys.modules[name]
        if module is this or getattr(module, "__name__", "").startswith((f"{__name__}.", "brewnet.netdef.")):
            del sys.modules[name]
