"""In-place BLAS helpers: accumulate without a temporary the size of the result.

``out += a @ b`` and ``y += alpha * x`` in numpy allocate a full-size temporary, and
for the large parameters of fully connected layers (150 MB for CaffeNet's fc6)
that temporary is a fresh mmap every iteration: the page faults cost more than
the arithmetic. On numpy float32/float64 arrays these helpers call BLAS through
scipy (gemm with beta=1, axpy) and write straight into ``out``/``y``. Anywhere
else (cupy, other dtypes, odd strides, no scipy) they fall back to plain array
code, which is what cupy's memory pool makes cheap anyway.
"""

import numpy

try:  # scipy is optional: only a speed-up
    from scipy.linalg import blas as _blas
except ImportError:  # pragma: no cover - depends on the environment
    _blas = None

# below these sizes (bytes of the result) plain numpy wins: its temporaries come from the heap
# without page faults, and a BLAS call (level 1 especially) has a fixed cost of its own
GEMM_MIN_BYTES = 4 << 20
AXPY_MIN_BYTES = 32 << 20

_GEMM = {numpy.dtype(numpy.float32): "sgemm", numpy.dtype(numpy.float64): "dgemm"}
_AXPY = {numpy.dtype(numpy.float32): "saxpy", numpy.dtype(numpy.float64): "daxpy"}


def _fortran_operand(m):
    """(array, trans) so that BLAS sees ``m`` without a copy: F-ordered as is, C-ordered transposed."""
    if m.flags.f_contiguous:
        return m, 0
    if m.flags.c_contiguous:
        return m.T, 1
    return numpy.asfortranarray(m), 0


def _native(*arrays):
    dtype = arrays[0].dtype
    return _blas is not None and all(type(a) is numpy.ndarray and a.dtype == dtype for a in arrays)


def matmul_acc(a, b, out):
    """out += a @ b for 2-D arrays (out C-contiguous on the fast path)."""
    if (_native(a, b, out) and out.ndim == 2 and out.flags.c_contiguous and out.dtype in _GEMM
            and out.nbytes >= GEMM_MIN_BYTES):
        gemm = getattr(_blas, _GEMM[out.dtype])
        # out is C-ordered, so out.T is F-ordered: out.T += b.T @ a.T, written in place
        bt, tb = _fortran_operand(b.T)
        at, ta = _fortran_operand(a.T)
        res = gemm(1.0, bt, at, beta=1.0, c=out.T, trans_a=tb, trans_b=ta, overwrite_c=1)
        if not numpy.shares_memory(res, out):  # scipy had to copy: put the result back
            out.T[...] = res
        return out
    out += a @ b
    return out


def axpy(alpha, x, y):
    """y += alpha * x (same shapes), in place."""
    if (_native(x, y) and y.dtype in _AXPY and x.flags.c_contiguous and y.flags.c_contiguous
            and y.nbytes >= AXPY_MIN_BYTES):
        yf = y.reshape(-1)
        res = getattr(_blas, _AXPY[y.dtype])(x.reshape(-1), yf, a=alpha)
        if not numpy.shares_memory(res, y):
            yf[...] = res
        return y
    y += y.dtype.type(alpha) * x
    return y
