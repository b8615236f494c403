"""The array module (numpy on CPU, cupy on GPU) and device selection.

Layers never branch on the device: they compute with ``self.xp``. The
process-wide mode mirrors pycaffe's set_mode_cpu/set_mode_gpu/set_device.
cupy is imported only when GPU mode is asked for, so CPU use never needs it.
"""

import numpy

_state = {"mode": "cpu", "device": 0}

GPU_INSTALL_HINT = "GPU mode needs cupy and a CUDA device: pip install 'brewnet[gpu]'"


class DeviceError(RuntimeError):
    """GPU mode was asked for but cannot be used here."""


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise DeviceError(f"{GPU_INSTALL_HINT} (cupy is not installed: {exc})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises its own CUDARuntimeError here
        raise DeviceError(f"{GPU_INSTALL_HINT} (no usable CUDA device: {exc})") from None
    if count == 0:
        raise DeviceError(f"{GPU_INSTALL_HINT} (no CUDA device found)")
    return cupy


def set_mode_cpu():
    _state["mode"] = "cpu"


def set_mode_gpu():
    _import_cupy()
    _state["mode"] = "gpu"


def set_device(device_id):
    cupy = _import_cupy()
    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= int(device_id) < count:
        raise DeviceError(f"GPU {device_id} does not exist: {count} CUDA device(s) visible")
    _state["device"] = int(device_id)
    cupy.cuda.Device(int(device_id)).use()


def mode():
    return _state["mode"]


def device_id():
    return _state["device"]


def get_array_module(mode_name=None):
    """numpy for CPU, cupy for GPU (the module layers call ``xp``)."""
    if (mode_name or _state["mode"]) == "gpu":
        return _import_cupy()
    return numpy


def array_module_of(array):
    """The module an existing array belongs to."""
    if isinstance(array, numpy.ndarray) or numpy.isscalar(array):
        return numpy
    return get_array_module("gpu")


def to_numpy(array):
    """A numpy copy/view of a numpy or cupy array."""
    if isinstance(array, numpy.ndarray):
        return array
    get = getattr(array, "get", None)
    return get() if get is not None else numpy.asarray(array)
