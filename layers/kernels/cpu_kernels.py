"""Compiled CPU loops (numba) for the few places whose array code is bound by passes and gathers.

Max pooling in array code needs one pass per kernel offset for the maximum, several more for
the argmax, and a scattered add for the gradient; a loop visits each input once. A
convolution's data gradient sums its column matrix back onto the image in one loop instead of
a small GEMM and a strided add per kernel offset. The SGD step reads and writes each parameter
once instead of once per operation. Each of these has an array-code twin in its layer: the
twin runs on cupy, where numba is missing, and under ``BREWNET_JIT=0``. The Winograd tile
transforms have none: where they cannot run, convolutions use im2col (layers/kernels/winograd.py).
``enabled(xp)`` is the one place that chooses.

The kernels themselves live in layers/kernels/cpu_jit.py, which imports numba: ``kernels()``
imports it the first time a caller asks, so ``import brewnet`` and ``BREWNET_JIT=0`` runs never
load numba. Each kernel compiles on its first call and is kept in numba's disk cache: later
processes load it from there (cpu_jit.py tells what keeps that cache valid).

Pooling kernels work on (planes, H, W) arrays, planes = num x channels, C-contiguous; callers
split the planes (or elements) across brewnet's CPU threads (layers/kernels/parallel.py), and
every kernel releases the GIL.
"""

import contextlib
import logging
import os

import numpy

logger = logging.getLogger("brewnet")

_state = {"on": os.environ.get("BREWNET_JIT", "1") != "0", "kernels": None, "failed": False}


def enabled(xp):
    """True when the compiled kernels should run for arrays of module ``xp``."""
    return xp is numpy and _state["on"] and kernels() is not None


@contextlib.contextmanager
def _switched(on):
    before = _state["on"]
    _state["on"] = on
    try:
        yield
    finally:
        _state["on"] = before


def disabled():
    """Run the array-code twins inside this block (tests compare both)."""
    return _switched(False)


def enabled_for_test():
    """Run the compiled kernels inside this block, whatever BREWNET_JIT says."""
    return _switched(True)


def kernels():
    """The compiled kernels, or None when numba cannot be imported (then array code runs)."""
    if _state["kernels"] is None and not _state["failed"]:
        try:
            _state["kernels"] = _build()
        except ImportError as exc:
            _state["failed"] = True
            logger.debug("numba unavailable (%s): the array code runs", exc)
        except Exception as exc:  # e.g. numba finds no writable cache folder (set NUMBA_CACHE_DIR)
            _state["failed"] = True
            logger.warning("compiled CPU kernels unavailable, using array code: %s", exc)
    return _state["kernels"]


def _build():
    # the one place brewnet imports numba (0.2 s and 60 MB; its first kernel call adds as much)
    from brewnet.layers.kernels import cpu_jit

    return cpu_jit
