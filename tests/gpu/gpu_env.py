"""Shared set-up of the GPU tests: skip the whole module cleanly unless cupy
imports and sees a CUDA device; switch brewnet to GPU mode for a test."""

import importlib.util
import pathlib

import pytest

TESTS = pathlib.Path(__file__).resolve().parent.parent


def require_gpu():
    """cupy, or a module-level skip when cupy or a CUDA device is missing."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed (pip install 'brewnet[gpu]')")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy's CUDARuntimeError: no driver or no device
        pytest.skip(f"cupy sees no CUDA device: {exc}", allow_module_level=True)
    if count < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy


@pytest.fixture
def gpu_mode():
    """brewnet in GPU mode on device 0 for one test, CPU mode afterwards."""
    from brewnet.layers.kernels import backend

    backend.set_mode_gpu()
    backend.set_device(0)
    yield backend.get_array_module()
    backend.set_mode_cpu()


def load_test_module(relative, name):
    """Import a CPU test file by path (tests are not a package) to reuse its helpers."""
    spec = importlib.util.spec_from_file_location(name, TESTS / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
