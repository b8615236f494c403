"""pycaffe's ``caffe.pycaffe`` module: the Net and solver classes and their helpers."""

from brewnet.api import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, Net, RMSPropSolver,
                         SGDSolver)
from brewnet.pycaffe import NCCL, Timer

__all__ = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "NCCL", "Timer"]
