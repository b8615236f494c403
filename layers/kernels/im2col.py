"""Batched im2col / col2im and the GEMMs of (de)convolution, for any number of spatial axes.

A chunk of samples (the plan, layers/kernels/conv_plan.py, picks how many and on which thread)
becomes one column matrix per group, built from a strided window view of the padded input
with a single copy, so a convolution is one GEMM per group instead of one per sample as in Caffe.

Two memory layouts of the column matrix, picked per layer for the longest
contiguous copy runs (the copy costs about as much as the GEMM):
  "B": (C, *kernel, N, *out)  rows (c, k...), columns (n, o...); runs along the last output axis.
  "A": (N, *out, G, *kernel, C/G) from a channels-last copy of the input; runs of kernel_w * C.
Either way the row order within a group matches Caffe's (c, kh, kw) only after the weight is
permuted, which is cheap; the numbers are the same sums in another order.
"""

import itertools

import numpy

from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.layers.kernels.scratch import WORKSPACE, Scratch


def conv_out_size(size, kernel, stride, pad, dilation):
    """Caffe's output size: C integer division (truncates toward zero)."""
    extent = dilation * (kernel - 1) + 1
    return int((size + 2 * pad - extent) / stride) + 1


def deconv_out_size(size, kernel, stride, pad, dilation):
    extent = dilation * (kernel - 1) + 1
    return stride * (size - 1) + extent - 2 * pad


def _as_strided(xp, array, shape, strides):
    return xp.lib.stride_tricks.as_strided(array, shape=tuple(shape), strides=tuple(strides))


class ConvEngine:
    """Geometry and kernels for one (de)convolution shape, applied to a chunk of samples.

    The "image" side has C channels and spatial size S (a conv's input, a deconv's output);
    the "column" side has M channels and spatial size O (a conv's output, a deconv's input).
    Weight shape is (M, C/G, *kernel) for both, as in Caffe. ``worker`` arguments name the
    calling thread (layers/kernels/parallel.py): each has its own scratch buffers.
    """

    # "A" or "B" to override the per-shape choice (tests exercise both)
    force_layout = None
    # bytes of column diff the compiled data gradient holds at once (per thread)
    dcol_block_bytes = 4 << 20

    def __init__(self, xp, dtype, C, S, M, G, kernel, stride, pad, dilation, O, layout=None):
        self.xp, self.dtype = xp, numpy.dtype(dtype)
        self.C, self.S, self.M, self.G = C, tuple(S), M, G
        self.k, self.s, self.p, self.d = tuple(kernel), tuple(stride), tuple(pad), tuple(dilation)
        self.O = tuple(O)
        self.nsp = len(self.S)
        self.Cg, self.Mg = C // G, M // G
        self.kk = int(numpy.prod(self.k))
        self.Kg = self.Cg * self.kk
        self.L = int(numpy.prod(self.O))
        # padded image extent: room for every window (Caffe zero-fills outside the image)
        self.Sp = tuple(
            max(S_ + 2 * p_, p_ + (o - 1) * s_ + (k_ - 1) * d_ + 1) if o > 0 else S_ + 2 * p_
            for S_, p_, o, s_, k_, d_ in zip(self.S, self.p, self.O, self.s, self.k, self.d))
        self.padded = self.Sp != self.S
        self.is_1x1 = all(k_ == 1 and s_ == 1 and p_ == 0 for k_, s_, p_ in zip(self.k, self.s, self.p))
        run_a = self.k[-1] * C if (self.d[-1] == 1 and G == 1) else self.Cg
        run_b = self.O[-1] if self.s[-1] == 1 else self.O[-1] // 2
        # ``layout``: a caller's fixed order (Im2col's is Caffe's, "B")
        self.layout = layout or self.force_layout or ("A" if run_a > run_b else "B")
        # bytes of one sample's columns (the plan sizes chunks by it)
        self.col_bytes_per_sample = self.Kg * G * self.L * self.dtype.itemsize
        self._bufs = Scratch(xp)
        self._transposed = None

    # -- image -> padded source ------------------------------------------------
    def _padded_source(self, x, worker=0):
        """x (n, C, *S) -> (array, logical (n, C, *Sp) view) used by the window view."""
        xp, n = self.xp, x.shape[0]
        if self.layout == "B" and not self.padded:
            return x
        shape = (n, self.C) + self.Sp if self.layout == "B" else (n,) + self.Sp + (self.C,)
        # borders are zeroed once and never written again
        buf = self._buffer("pad", shape, x.dtype, zero=True, worker=worker)
        inner = tuple(slice(p_, p_ + S_) for p_, S_ in zip(self.p, self.S))
        if self.layout == "B":
            buf[(slice(None), slice(None)) + inner] = x
            return buf
        buf[(slice(None),) + inner + (slice(None),)] = xp.moveaxis(x, 1, -1)
        return xp.moveaxis(buf, -1, 1)

    def _window_view(self, src):
        """Logical (n, C, *kernel, *O) strided view of a padded (n, C, *Sp) array."""
        st = src.strides
        sp_strides = st[2:]
        shape = src.shape[:2] + self.k + self.O
        strides = st[:2] + tuple(d_ * t for d_, t in zip(self.d, sp_strides)) + \
            tuple(s_ * t for s_, t in zip(self.s, sp_strides))
        return _as_strided(self.xp, src, shape, strides)

    def windows(self, x, worker=0):
        """Logical (n, C, *kernel, *O) view of every window of x (n, C, *S), padding zeros included."""
        return self._window_view(self._padded_source(x, worker))

    # -- im2col ------------------------------------------------------------------
    def col_shape(self, n):
        """Shape of the contiguous buffer im2col fills for n samples."""
        if self.layout == "B":
            return (self.C,) + self.k + (n,) + self.O
        return (n,) + self.O + (self.G,) + self.k + (self.Cg,)

    def im2col(self, x, out=None, worker=0):
        """Column matrix of x (n, C, *S): B -> (G, Kg, nL); A -> (G, nL, Kg) (strided over groups)."""
        xp, n, G, nsp = self.xp, x.shape[0], self.G, self.nsp
        win = self.windows(x, worker)  # (n, C, *k, *O)
        ks = tuple(range(2, 2 + nsp))
        os_ = tuple(range(2 + nsp, 2 + 2 * nsp))
        shape = self.col_shape(n)
        if self.layout == "B":
            order = (1,) + ks + (0,) + os_
        else:
            win = win.reshape((n, G, self.Cg) + self.k + self.O)  # split C: a view, no copy
            ks1 = tuple(a + 1 for a in ks)
            os1 = tuple(a + 1 for a in os_)
            order = (0,) + os1 + (1,) + ks1 + (2,)
        if out is None or out.shape != shape:
            out = xp.empty(shape, dtype=x.dtype)
        xp.copyto(out, win.transpose(order))
        return self.column_matrix(out, n)

    def column_matrix(self, buf, n):
        """The column matrix of n samples held in a filled ``col_shape(n)`` buffer."""
        if self.layout == "B":
            return buf.reshape(self.G, self.Kg, n * self.L)
        return buf.reshape(n * self.L, self.G, self.Kg).transpose(1, 0, 2)

    # -- weights in the layout's row order -------------------------------------------
    def weight_matrix(self, W):
        """B: (G, Mg, Kg) rows (c, k...); A: (G, Mg, Kg) rows (k..., c)."""
        W = W.reshape((self.G, self.Mg, self.Cg) + self.k)
        if self.layout == "A":
            W = self.xp.moveaxis(W, 2, -1)
        return W.reshape(self.G, self.Mg, self.Kg)

    def weight_from_matrix(self, Wm):
        """Inverse of weight_matrix: (G, Mg, Kg) -> (M, Cg, *k)."""
        if self.layout == "A":
            Wm = self.xp.moveaxis(Wm.reshape((self.G, self.Mg) + self.k + (self.Cg,)), -1, 2)
        return Wm.reshape((self.M, self.Cg) + self.k)

    # -- column-side tensors (conv output / deconv input) ----------------------------
    def to_colside(self, y):
        """(n, M, *O) -> B: (G, Mg, nL); A: (G, nL, Mg). One transposing copy."""
        xp, n = self.xp, y.shape[0]
        y4 = y.reshape(n, self.G, self.Mg, self.L)
        if self.layout == "B":
            return xp.ascontiguousarray(y4.transpose(1, 2, 0, 3)).reshape(self.G, self.Mg, n * self.L)
        return xp.ascontiguousarray(y4.transpose(1, 0, 3, 2)).reshape(self.G, n * self.L, self.Mg)

    def from_colside(self, ym, out):
        """Write a GEMM result (layout of to_colside) into out (n, M, *O)."""
        n = out.shape[0]
        o4 = out.reshape(n, self.G, self.Mg, self.L)
        if self.layout == "B":
            self.xp.copyto(o4, ym.reshape(self.G, self.Mg, n, self.L).transpose(2, 0, 1, 3))
        else:
            self.xp.copyto(o4, ym.reshape(self.G, n, self.L, self.Mg).transpose(1, 0, 3, 2))

    # -- the three GEMMs ----------------------------------------------------------
    def gemm_forward(self, col, W):
        """y columns = W * col: B -> (G, Mg, nL), A -> (G, nL, Mg)."""
        Wm = self.weight_matrix(W)
        if self.layout == "B":
            return parallel.matmul(Wm, col)
        return parallel.matmul(col, Wm.transpose(0, 2, 1))

    def gemm_weight(self, col, ym_rows):
        """dW (M, Cg, *k) from the columns and the column-side diff as rows (``colside_rows``)."""
        if self.layout == "B":
            # as (Kg, Mg) and transposed back: OpenBLAS runs this reduction over the long columns
            # 15-35% faster that way round (CIFAR-10's and LeNet's conv1)
            Wm = parallel.matmul(col, ym_rows.transpose(0, 2, 1)).transpose(0, 2, 1)
        else:
            Wm = parallel.matmul(ym_rows, col)
        return self.weight_from_matrix(Wm)

    def colside_rows(self, y):
        """(n, M, *O) -> (G, Mg, nL), C-contiguous: the weight GEMM's left operand in both
        layouts. (Layout A's (G, nL, Mg) read transposed runs the GEMM 2-3x slower.)"""
        xp, n = self.xp, y.shape[0]
        if self.layout == "B":
            return self.to_colside(y)
        y4 = y.reshape(n, self.G, self.Mg, self.L)
        return xp.ascontiguousarray(y4.transpose(1, 2, 0, 3)).reshape(self.G, self.Mg, n * self.L)

    # -- conv data gradient as a convolution of the output diff -----------------------
    def transposed(self):
        """The engine computing the data gradient as a forward convolution, or None.

        With unit strides, dx is dy (padded by d*(k-1)-p) convolved with the flipped weights,
        channels in and out swapped: one im2col and one GEMM per chunk, cache-sized like
        forward, instead of a small GEMM and a strided add per kernel offset.
        """
        if self._transposed is None:
            pads = tuple(d_ * (k_ - 1) - p_ for k_, p_, d_ in zip(self.k, self.p, self.d))
            if all(s_ == 1 for s_ in self.s) and min(pads) >= 0:
                self._transposed = ConvEngine(self.xp, self.dtype, self.M, self.O, self.C, self.G, self.k,
                                              self.s, pads, self.d, self.S)
            else:
                self._transposed = False
        return self._transposed or None

    def flipped_weight(self, W):
        """(M, Cg, *k) -> (C, Mg, *k): per group, in and out channels swapped, kernel reversed."""
        nsp = self.nsp
        Wg = W.reshape((self.G, self.Mg, self.Cg) + self.k)
        Wg = Wg[(slice(None),) * 3 + (slice(None, None, -1),) * nsp].swapaxes(1, 2)
        return self.xp.ascontiguousarray(Wg).reshape((self.C, self.Mg) + self.k)

    # -- column-side diff -> image (conv data gradient, deconv forward) -------------
    def compiled_data_path(self):
        """Whether data_to_image sums the column diff back with the compiled loop (2-D, layout A,
        numpy with numba): then one GEMM and one pass, faster than the convolution of dy too."""
        return self.layout == "A" and self.nsp == 2 and cpu_kernels.enabled(self.xp)

    def data_to_image(self, ym, W, n, out, worker=0):
        """out (n, C, *S) = col2im(W^T ym), one GEMM and one strided add per kernel offset.

        Fusing the two keeps every add between contiguous blocks (long runs), which is
        several times faster than summing a full column matrix back with short runs.
        """
        xp, G, Cg, Mg = self.xp, self.G, self.Cg, self.Mg
        if self.compiled_data_path():
            # a GEMM for the column diff of a few samples at a time (at most about
            # dcol_block_bytes), then a compiled loop adds it back onto the image
            acc = self._accumulator(n, ym.dtype, worker)
            Wm = self.weight_matrix(W)
            ym4 = ym.reshape(G, n, self.L, Mg)
            step = max(1, self.dcol_block_bytes // (G * self.L * self.Kg * ym.itemsize))
            for a in range(0, n, step):
                b = min(n, a + step)
                # the thread's shared column workspace: its columns were used up by the weight GEMM
                dcol = WORKSPACE.take(xp, ym.dtype, (G, (b - a) * self.L, self.Kg), object(), worker)
                xp.matmul(ym4[:, a:b].reshape(G, (b - a) * self.L, Mg), Wm, out=dcol)
                cpu_kernels.kernels().col2im_channels_last(
                    dcol.reshape((G, b - a) + self.O + self.k + (Cg,)), acc[a:b], *self.s, *self.d)
            return self._write_image(acc, out)
        if Cg < 16:
            # per-offset GEMMs this narrow are slow: one GEMM, then col2im
            return self.col2im(self._gemm_data(ym, W, n), out, worker)
        acc = self._accumulator(n, ym.dtype, worker)
        # (kk, G, Mg, Cg): the weight slice of each kernel offset
        Wk = xp.ascontiguousarray(xp.moveaxis(W.reshape(G, Mg, Cg, self.kk), -1, 0))
        if self.layout == "A":
            buf = self._scratch((n,) + self.O + (self.C,), ym.dtype, worker)
            gemm_out = buf.reshape(n * self.L, G, Cg).transpose(1, 0, 2)
        else:
            buf = self._scratch((self.C, n) + self.O, ym.dtype, worker)
            gemm_out = buf.reshape(G, Cg, n * self.L)
        for o, win in enumerate(self._window_slices()):
            if self.layout == "A":
                xp.matmul(ym, Wk[o], out=gemm_out)
                acc[(slice(None),) + win + (slice(None),)] += buf
            else:
                xp.matmul(Wk[o].transpose(0, 2, 1), ym, out=gemm_out)
                acc[(slice(None), slice(None)) + win] += buf
        return self._write_image(acc, out)

    def _gemm_data(self, ym, W, n):
        """Full column diff W^T ym as a logical (n, G, Cg, *k, *O) view."""
        xp, nsp = self.xp, self.nsp
        Wm = self.weight_matrix(W)
        if self.layout == "B":
            dcol = xp.matmul(Wm.transpose(0, 2, 1), ym)  # (G, Kg, nL) = (G, Cg, *k, n, *O)
            dcol = dcol.reshape((self.G, self.Cg) + self.k + (n,) + self.O)
            ks = tuple(range(2, 2 + nsp))
            return dcol.transpose((2 + nsp, 0, 1) + ks + tuple(range(3 + nsp, 3 + 2 * nsp)))
        dcol = xp.matmul(ym, Wm)  # (G, nL, Kg) = (G, n, *O, *k, Cg)
        dcol = dcol.reshape((self.G, n) + self.O + self.k + (self.Cg,))
        os_ = tuple(range(2, 2 + nsp))
        ks = tuple(range(2 + nsp, 2 + 2 * nsp))
        return dcol.transpose((1, 0, 2 + 2 * nsp) + ks + os_)

    def _buffer(self, role, shape, dtype, zero=False, worker=0):
        return self._bufs.get(role, shape, dtype, worker, zero)

    def _scratch(self, shape, dtype, worker=0):
        return self._buffer("scratch", shape, dtype, worker=worker)

    def _accumulator(self, n, dtype, worker=0):
        """Zeroed padded image accumulator: B (C, n, *Sp), A (n, *Sp, C)."""
        shape = (self.C, n) + self.Sp if self.layout == "B" else (n,) + self.Sp + (self.C,)
        acc = self._buffer("acc", shape, dtype, worker=worker)
        acc.fill(0)
        return acc

    def _window_slices(self):
        """Per kernel offset (row-major), the spatial slices of the padded image it touches."""
        for offs in itertools.product(*(range(k_) for k_ in self.k)):
            yield tuple(slice(o_ * d_, o_ * d_ + (O_ - 1) * s_ + 1, s_)
                        for o_, d_, O_, s_ in zip(offs, self.d, self.O, self.s))

    def _write_image(self, acc, out):
        accv = acc.swapaxes(0, 1) if self.layout == "B" else self.xp.moveaxis(acc, -1, 1)
        inner = (slice(None), slice(None)) + tuple(slice(p_, p_ + S_) for p_, S_ in zip(self.p, self.S))
        self.xp.copyto(out, accv[inner])
        return out

    # -- col2im ------------------------------------------------------------------
    def col2im(self, dcol, out, worker=0):
        """Sum a logical (n, G, Cg, *k, *O) column diff back onto the image: writes out (n, C, *S)."""
        n = dcol.shape[0]
        acc = self._accumulator(n, dcol.dtype, worker)
        accv = acc.swapaxes(0, 1) if self.layout == "B" else self.xp.moveaxis(acc, -1, 1)
        accg = accv.reshape((n, self.G, self.Cg) + self.Sp)
        offsets = itertools.product(*(range(k_) for k_ in self.k))
        for offs, win in zip(offsets, self._window_slices()):
            accg[(slice(None),) * 3 + win] += dcol[(slice(None),) * 3 + offs]
        return self._write_image(acc, out)
