"""Per-channel passes of BatchNorm and Scale on the CPU: compiled kernels (layers/kernels/
channel_jit.py) run over the channels split across brewnet's threads.

The array code these replace (in layers/families/normalization.py, which also runs it on cupy,
without numba and under ``BREWNET_JIT=0``) makes a temporary per operation and a pass per
temporary: BatchNorm's training forward took seven passes over the batch, its backward eight.
A kernel takes two or three passes per channel, while the channel's values are in cache, and
writes its results where the layer wants them (in place included), allocating nothing.

``kernels(xp, *arrays)`` is the compiled module when it applies to these arrays (numpy,
C-contiguous, one float dtype), else None; ``over_channels`` runs a kernel's channel ranges.
"""

import numpy

from brewnet.layers.kernels import cpu_kernels, parallel

_state = {"jit": None}

# below this many elements a single job does it (waking a thread costs more)
PARALLEL_MIN_ELEMENTS = 1 << 16


def kernels(xp, *arrays):
    """channel_jit, when its kernels may run on ``arrays``; else None (use the array code)."""
    if not cpu_kernels.enabled(xp):
        return None
    dtype = arrays[0].dtype
    if dtype not in (numpy.float32, numpy.float64):
        return None
    if not all(isinstance(a, numpy.ndarray) and a.dtype == dtype and a.flags.c_contiguous for a in arrays):
        return None
    if _state["jit"] is None:
        from brewnet.layers.kernels import channel_jit

        _state["jit"] = channel_jit
    return _state["jit"]


def over_channels(kernel, channels, size, *args):
    """kernel(*args, c0, c1) for ranges of channels covering 0..channels, spread over the threads
    (several ranges per thread when ``size``, the elements touched, makes it worth it)."""
    ranges = parallel.split(channels, parallel.jobs_for(numpy, size >= PARALLEL_MIN_ELEMENTS))
    parallel.run(lambda j, worker: kernel(*args, *ranges[j]), len(ranges), numpy)


def same_memory(a, b):
    """True when ``a`` and ``b`` are the same elements (an in-place pass); the kernels then
    read and write one array, which vectorizes where two overlapping ones would not."""
    return a.shape == b.shape and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
