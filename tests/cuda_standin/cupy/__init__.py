"""A stand-in for cupy that is numpy plus brewnet's CUDA kernels run on the CPU, for dry runs
of tests/gpu where no GPU is (never on the path otherwise):

    PYTHONPATH=tests/cuda_standin BREWNET_CUDA_KERNELS=1 python -m pytest tests/gpu \
        --deselect tests/gpu/test_gpu_device.py

Arrays are plain numpy arrays; ``RawModule`` hands each launch to tests/cuda_harness.py, so the
layers take their BREWNET_CUDA_KERNELS paths and ops.CupyKernels runs as on a device. What it
cannot show: device memory, streams, NVRTC itself, speed (tests/gpu/test_gpu_device.py).
"""

import pathlib
import sys
import types

import numpy

_TESTS = str(pathlib.Path(__file__).resolve().parents[2])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
import cuda_harness  # noqa: E402

__version__ = "0+numpy-standin"
_kernels = cuda_harness.HostKernels()
ndarray = numpy.ndarray


def __getattr__(name):
    return getattr(numpy, name)


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    Device=lambda i=0: types.SimpleNamespace(id=0, use=lambda: None))


class RawModule:
    def __init__(self, code, options=()):
        self.options = tuple(options)

    def get_function(self, name):
        def launch(grid, block, args):
            _kernels(name, int(args[0]), *args[1:])

        return launch
