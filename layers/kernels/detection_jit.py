"""Compiled CPU loops (numba) for ROI max pooling, beside its array code in detection.py.

The array code gathers every bin's window, padded to the largest in a group of ROIs, several
passes over numbers that a loop reads once (VGG16's conv5 with 300 ROIs: seconds against tens of
milliseconds). Imported only where ``cpu_kernels.enabled(numpy)`` says compiled kernels run, so
numba loads as it does for the pooling kernels; the array twin runs on cupy and under
``BREWNET_JIT=0``. Kernels are module-level with ``cache=True`` (cpu_jit.py says why).
"""

import numpy
from numba import njit

jit = njit(cache=True, nogil=True, error_model="numpy")


@jit
def roi_pool_forward(x, batch, hs, he, ws, we, out, argmax):
    # Fast R-CNN's scan: row-major over each bin, strict '>' (the first maximum wins); an empty
    # bin gives 0 and index -1. Bins arrive clamped to the map (detection.roi_bins).
    num, pooled_h = hs.shape
    pooled_w = ws.shape[1]
    channels, width = x.shape[1], x.shape[3]
    for r in range(num):
        b = batch[r]
        for c in range(channels):
            plane = x[b, c]
            for i in range(pooled_h):
                for j in range(pooled_w):
                    best = -numpy.inf
                    at = -1
                    for h in range(hs[r, i], he[r, i]):
                        for w in range(ws[r, j], we[r, j]):
                            if plane[h, w] > best:
                                best = plane[h, w]
                                at = h * width + w
                    if at < 0:
                        out[r, c, i, j] = 0
                    else:
                        out[r, c, i, j] = best
                    argmax[r, c, i, j] = at


@jit
def roi_pool_backward(dy, argmax, batch, dx):
    # dx (N, C, H * W) zeroed by the caller; each output adds its diff where its maximum was
    num, channels, pooled_h, pooled_w = dy.shape
    for r in range(num):
        b = batch[r]
        for c in range(channels):
            for i in range(pooled_h):
                for j in range(pooled_w):
                    at = argmax[r, c, i, j]
                    if at >= 0:
                        dx[b, c, at] += dy[r, c, i, j]
