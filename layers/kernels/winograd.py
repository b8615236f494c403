"""Winograd convolution on the CPU: F(4x4, kxk) for 3x3 and 5x5 kernels with unit stride.

Each 4x4 block of outputs comes from a (k+3)x(k+3) tile of the padded input. The tile and the
kernel are transformed, multiplied element by element and summed over channels (one GEMM per
tile element), and the products transformed back: 64/16 = 4 multiplications per output for a
5x5 kernel instead of 25, 36/16 = 2.25 for 3x3 instead of 9. The transforms are Toom-Cook's on
the points 0, +-1, +-2, +-1/2 and infinity (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2015).

The weight gradient is the same algorithm with the roles swapped, F(kxk, 4x4): input tiles
correlated with 4x4 blocks of the output diff, summed over samples and tiles in the transform
domain (one GEMM per tile element) and transformed back once. The data gradient is a Winograd
convolution of the output diff with the flipped weights.

Rounding in the transforms makes float32 results differ from im2col's by a few 1e-6 relative
to the output's scale (the way cuDNN's and oneDNN's Winograd algorithms do); float64 agrees to
1e-13. ``BREWNET_WINOGRAD=0`` turns it off. CPU only: the transforms are compiled loops
(layers/cpu_kernels.py); cupy keeps im2col. A WinogradConv computes a chunk of samples at a
time; the convolution's plan (layers/kernels/conv_plan.py) chunks the batch and runs the
chunks on brewnet's threads.
"""

import functools
import os
from fractions import Fraction

import numpy

from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.layers.kernels.scratch import WORKSPACE

# output block per tile (per axis); 6 would cut the multiplications further but loses
# another digit of float32 accuracy
TILE_OUT = 4
KERNELS = (3, 5)
# below this many channels per group on either side, the per-tile-element GEMMs are too thin
# to beat im2col's (CIFAR-10's first layer, 3 inputs, stays on im2col)
MIN_CHANNELS = 16
# at least this share of the 4x4 output blocks must fall inside the output: CaffeNet's 13x13
# layers (16x16 computed, 66%) measured no faster than im2col on two threads at batch 10, and
# 14x14 ones (77%) slower at batch 8, forward / backward ms: ResNet-50's res4 3x3 (256
# channels) 8.9 / 19.0 against 7.7 / 14.6, GoogLeNet's 144 -> 288 5.5 / 11.4 against 5.0 / 9.0
MIN_TILE_USE = 0.8
_POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))


def enabled():
    return os.environ.get("BREWNET_WINOGRAD", "1") != "0"


@functools.lru_cache(maxsize=None)
def transform_matrices(m, r):
    """(AT (m, n), G (n, r), BT (n, n)) of F(m, r), n = m + r - 1, as float64 arrays, such that
    y = AT @ ((G @ g) * (BT @ d)) is the correlation y[i] = sum_k g[k] d[i + k] (len(d) = n)."""
    n = m + r - 1
    if n - 1 > len(_POINTS):
        raise ValueError(f"F({m}, {r}) needs {n - 1} points, only {len(_POINTS)} are defined")
    points = [Fraction(p) for p in _POINTS[:n - 1]]
    AT = numpy.zeros((m, n))
    G = numpy.zeros((n, r))
    for j, p in enumerate(points):
        scale = Fraction(1)
        for q in points:
            if q != p:
                scale *= p - q
        AT[:, j] = [float(p ** i) for i in range(m)]
        G[j] = [float(p ** k / scale) for k in range(r)]
    # the point at infinity: the leading coefficients
    AT[m - 1, n - 1] = 1.0
    G[n - 1, r - 1] = 1.0
    # BT is then the one matrix for which the identity holds for every g and d: output i, tap k
    # must see d[i + k] alone, a linear system in BT's columns
    system = numpy.einsum("ij,jk->ikj", AT, G).reshape(m * r, n)
    target = numpy.zeros((m * r, n))
    for i in range(m):
        for k in range(r):
            target[i * r + k, i + k] = 1.0
    BT = numpy.linalg.lstsq(system, target, rcond=None)[0]
    if numpy.abs(system @ BT - target).max() > 1e-9:
        raise ArithmeticError(f"no Winograd input transform for F({m}, {r}) on these points")
    BT[numpy.abs(BT) < 1e-12] = 0.0
    return AT, G, BT


def plan(xp, dtype, C, S, M, G, kernel, stride, pad, dilation, O):
    """(WinogradConv for this 2-D convolution, WinogradConv for its data gradient or None where
    im2col's data gradient is faster), or (None, None) where im2col should run instead."""
    if not (enabled() and cpu_kernels.enabled(xp) and len(S) == 2
            and numpy.dtype(dtype) in (numpy.float32, numpy.float64)
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and kernel[0] == kernel[1] and kernel[0] in KERNELS
            and all(0 <= p_ < kernel[0] for p_ in pad)
            and min(C // G, M // G) >= MIN_CHANNELS
            and numpy.prod(O) >= MIN_TILE_USE * numpy.prod([-(-o // TILE_OUT) * TILE_OUT for o in O])):
        return None, None
    k = kernel[0]
    forward = WinogradConv(dtype, C, S, M, G, k, pad, O)
    # dx = dy, padded by k - 1 - p, convolved with the flipped weights (channels swapped). When
    # that padding is wider than the forward's (an unpadded conv), most of the padded dy is zeros:
    # then im2col's data gradient wins (LeNet's conv2: 3.5 ms against 2.4)
    data_pad = tuple(k - 1 - p_ for p_ in pad)
    wider = any(d_ > p_ for d_, p_ in zip(data_pad, pad))
    data = None if wider else WinogradConv(dtype, M, O, C, G, k, data_pad, S)
    return forward, data


class WinogradConv:
    """y (n, M, *O) = conv(x (n, C, *S), W (M, C/G, k, k), pad) + b, with its weight gradient,
    for a chunk of n samples. ``worker`` arguments name the calling thread (its own buffers)."""

    def __init__(self, dtype, C, S, M, G, k, pad, O):
        self.dtype = numpy.dtype(dtype)
        self.C, self.S, self.M, self.G, self.k = C, tuple(S), M, G, k
        self.pad, self.O = tuple(pad), tuple(O)
        self.Cg, self.Mg = C // G, M // G
        m = self.m = TILE_OUT
        self.t = m + k - 1
        self.tiles = tuple(-(-o // m) for o in self.O)
        # padded input covering every tile (zeros past the image and past Caffe's padding)
        self.Sp = tuple(n_ * m + k - 1 for n_ in self.tiles)
        as_dtype = functools.partial(numpy.asarray, dtype=self.dtype)
        self.AT, self.Gm, self.BT = map(as_dtype, transform_matrices(m, k))
        # weight gradient: outputs are the k x k taps, the 4x4 diff blocks the filter
        self.AT_w, self.G_w, self.BT_w = map(as_dtype, transform_matrices(k, m))
        self.tiles_per_sample = self.tiles[0] * self.tiles[1]
        # bytes of one sample's largest transformed array (the plan sizes chunks by it)
        widest = self.t * max(self.t * self.tiles_per_sample, self.tiles[0] * self.Sp[1]) * max(C, M)
        self.bytes_per_sample = widest * self.dtype.itemsize

    def _buffer(self, role, shape, worker=0):
        # the net's layers run one at a time: every Winograd layer shares these (memory: CaffeNet)
        return WORKSPACE.take(numpy, self.dtype, shape, None, worker, role="winograd-" + role)

    def _pair_scratch(self, role, rows, k, length, worker=0):
        """tile_pairs' scratch for ``length`` columns: it works a block of them at a time."""
        return self._buffer(role, (rows, k, min(length, cpu_kernels.kernels().TRANSFORM_BLOCK)), worker)

    # -- transforms ---------------------------------------------------------------
    def weight_tiles(self, W):
        """(M, Cg, k, k) -> U (t*t, G, Cg, Mg): G W G^T per filter, laid out for the GEMMs."""
        G_, k, t = self.G, self.k, self.t
        src = W.reshape(G_, self.Mg, self.Cg, k, k).transpose(3, 4, 0, 2, 1)
        src = numpy.ascontiguousarray(src, dtype=self.dtype).reshape(k * k, -1)
        # (kept buffers: fresh ones would page-fault on every call, CaffeNet's conv3 1.5 ms)
        out = self._buffer("U", (t * t, src.shape[1]))
        cpu_kernels.kernels().tile_pairs(src, self.Gm, self._pair_scratch("U-rows", t, k, src.shape[1]), out)
        return out.reshape(t * t, G_, self.Cg, self.Mg)

    def _phase_image(self, x, role, shape, offset, worker):
        """x (n, C, H, W) into a zero-bordered channels-last (n, *shape, C) image at ``offset``,
        each row's columns stored by phase (column w = q*m + ph at (ph, q)): tile_cols's layout."""
        n, C = x.shape[:2]
        Q = -(-shape[1] // self.m)
        buf = self._buffer(role, (n, shape[0], self.m, Q, C), worker)
        cpu_kernels.kernels().phase_image(numpy.ascontiguousarray(x), buf, offset[0], offset[1])
        return buf

    def _tiles(self, image, mat, role, worker):
        """Transform of every tile of a phase-stored image (n, H, m, Q, C) from _phase_image: mat on
        both axes, a tile every m pixels -> (ta * ta, T, C), T = (sample, tile row, tile column)."""
        n, H = image.shape[:2]
        C = image.shape[-1]
        width = image[0, 0].size
        ta = mat.shape[0]
        rows = self._buffer(role + "-rows", (n, ta, self.tiles[0], width), worker)
        kern = cpu_kernels.kernels()
        kern.tile_rows(image.reshape(n, H, width), mat, rows, self.m)
        out = self._buffer(role, (ta * ta, n * self.tiles_per_sample * C), worker)
        kern.tile_cols(rows, mat, out, self.m, self.tiles[1], C)
        return out.reshape(ta * ta, n * self.tiles_per_sample, C)

    def _grouped(self, a, channels):
        """(tt, T, G * c) -> (tt, G, T, c) view (the GEMMs run per group)."""
        tt, T = a.shape[:2]
        return a.reshape(tt, T, self.G, channels).transpose(0, 2, 1, 3)

    # -- forward --------------------------------------------------------------------
    def bias_vector(self, bias):
        """The bias as forward takes it: contiguous, of this dtype, zeros for None."""
        return numpy.zeros(self.M, self.dtype) if bias is None else numpy.ascontiguousarray(bias, self.dtype)

    def forward(self, x, U, b, y, worker=0):
        """y (n, M, *O) = conv(x, W) + b, given U = weight_tiles(W) and b = bias_vector(bias)."""
        m, tt = self.m, self.t * self.t
        kern = cpu_kernels.kernels()
        image = self._phase_image(x, "x", self.Sp, self.pad, worker)
        V = self._tiles(image, self.BT, "V", worker)
        T = V.shape[1]
        prod = self._buffer("prod", (tt, T, self.M), worker)
        parallel.matmul(self._grouped(V, self.Cg), U, out=self._grouped(prod, self.Mg))
        out = self._buffer("out", (m * m, T * self.M), worker)
        scratch = self._pair_scratch("P", m, self.t, T * self.M, worker)
        kern.tile_pairs(prod.reshape(tt, T * self.M), self.AT, scratch, out)
        kern.tiles_to_image(out.reshape(m * m, T, self.M), y, m, self.tiles[0], self.tiles[1], b)

    # -- weight gradient ------------------------------------------------------------------
    def weight_grad_part(self, x, dy, worker=0):
        """The weight gradient of a chunk, still in the transform domain: a new array that
        ``weight_grad`` turns into dW once the chunks' parts are summed."""
        m = self.m
        blocks = tuple(n_ * m for n_ in self.tiles)
        image = self._phase_image(x, "x", self.Sp, self.pad, worker)
        X = self._tiles(image, self.BT_w, "V", worker)
        diff = self._phase_image(dy, "dy", blocks, (0, 0), worker)
        D = self._tiles(diff, self.G_w, "D", worker)
        # (tt, G, Mg, T) @ (tt, G, T, Cg): a sum over every tile of the chunk
        return parallel.matmul(self._grouped(D, self.Mg).transpose(0, 1, 3, 2), self._grouped(X, self.Cg))

    def weight_grad(self, total):
        """dW (M, Cg, k, k) of sum(dy * conv(x, W)) from the sum of every chunk's weight_grad_part
        (a view of a buffer every Winograd layer shares: valid until the next weight_grad)."""
        tt, k = self.t * self.t, self.k
        L = total[0].size
        out = self._buffer("dW", (k * k, L))
        scratch = self._pair_scratch("dW-rows", k, self.t, L)
        cpu_kernels.kernels().tile_pairs(total.reshape(tt, L), self.AT_w, scratch, out)
        return out.reshape(k, k, self.M, self.Cg).transpose(2, 3, 0, 1)
