"""Convolution, Deconvolution and Im2col (Caffe's BaseConvolutionLayer family).

Each batch (in chunks when the column matrix would be huge, or cache-sized ones for
narrow layers) is one im2col copy and one GEMM per group; see layers/im2col.py. The data
gradient of a padded unit-stride convolution is itself computed as a convolution of dy. Weight shape (num_output, C/group, *kernel)
for Convolution, (C, num_output/group, *kernel) for Deconvolution, as in Caffe.
"""

import numpy

from brewnet.layers import fillers
from brewnet.layers.base import Layer
from brewnet.layers.kernels import parallel, winograd
from brewnet.layers.kernels.im2col import ConvEngine, conv_out_size, deconv_out_size
from brewnet.layers.kernels.scratch import WORKSPACE
from brewnet.layers.registry import register


def _spatial_values(layer, cp, field, n_spatial, default):
    """One value per spatial axis from a repeated field or its _h/_w pair, Caffe's rules."""
    h, w = field + "_h", field + "_w"
    name = "kernel_size" if field == "kernel" else field
    if cp.HasField(h) or cp.HasField(w):
        if n_spatial != 2:
            raise layer.error(f"{h} & {w} can only be used for 2D convolution")
        if len(getattr(cp, name)):
            raise layer.error(f"give either {name} or {h}/{w}, not both")
        return (getattr(cp, h), getattr(cp, w))
    values = list(getattr(cp, name))
    if not values:
        if default is None:
            raise layer.error("convolution_param needs kernel_size (or kernel_h and kernel_w)")
        return (default,) * n_spatial
    if len(values) not in (1, n_spatial):
        raise layer.error(
            f"{name} must be given once or once per spatial axis "
            f"({len(values)} given, {n_spatial} spatial axes)")
    return tuple(values) * n_spatial if len(values) == 1 else tuple(values)


class _ConvGeometry(Layer):
    """Reads convolution_param's kernel/stride/pad/dilation and the channel axis."""

    def _read_geometry(self, bottom):
        cp = self.param.convolution_param
        self.channel_axis = bottom[0].canonical_axis(cp.axis)
        self.n_spatial = bottom[0].num_axes - self.channel_axis - 1
        if self.n_spatial < 1:
            raise self.error(f"input {bottom[0].shape} has no spatial axis after axis {cp.axis}")
        n = self.n_spatial
        self.kernel = _spatial_values(self, cp, "kernel", n, None)
        self.stride = _spatial_values(self, cp, "stride", n, 1)
        self.pad = _spatial_values(self, cp, "pad", n, 0)
        dil = list(cp.dilation)
        if len(dil) not in (0, 1, n):
            raise self.error("dilation must be given once or once per spatial axis")
        self.dilation = (tuple(dil) * n if len(dil) == 1 else tuple(dil)) if dil else (1,) * n
        for what, vals in (("kernel size", self.kernel), ("stride", self.stride), ("dilation", self.dilation)):
            if any(v <= 0 for v in vals):
                raise self.error(f"{what} must be positive, got {vals}")
        self.channels = bottom[0].shape[self.channel_axis]

    def _split(self, shape):
        """(num, C, spatial) of a blob shape around the channel axis (num = product before it)."""
        a = self.channel_axis
        return int(numpy.prod(shape[:a], dtype=numpy.int64)), shape[a], tuple(shape[a + 1:])


class _BaseConv(_ConvGeometry):
    min_bottoms = 1
    min_tops = 1
    reverse = False  # True for Deconvolution

    def setup(self, bottom, top):
        if len(bottom) != len(top):
            raise self.error("needs as many tops as bottoms")
        self._read_geometry(bottom)
        cp = self.param.convolution_param
        self.num_output = cp.num_output
        self.group = cp.group
        self.bias_term = cp.bias_term
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.channels % self.group or self.num_output % self.group:
            raise self.error(
                f"channels ({self.channels}) and num_output "
                f"({self.num_output}) must both be multiples of group ({self.group})")
        if self.reverse:
            wshape = (self.channels, self.num_output // self.group) + self.kernel
        else:
            wshape = (self.num_output, self.channels // self.group) + self.kernel
        if self.blobs:
            want = [wshape] + ([(self.num_output,)] if self.bias_term else [])
            got = [tuple(b.shape) for b in self.blobs]
            if got != want:
                raise self.error(f"parameter shapes {got} do not match expected {want}")
        else:
            self.blobs.append(self.make_blob(wshape))
            fillers.fill(self.blobs[0], cp.weight_filler, self.rng)
            if self.bias_term:
                self.blobs.append(self.make_blob((self.num_output,)))
                fillers.fill(self.blobs[1], cp.bias_filler, self.rng)
        self._engine = None
        self._cols = {}
        self._fresh = set()

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.channel_axis + 1 + self.n_spatial:
            raise self.error(f"bottom number of axes may not change ({shape})")
        num, C, S = self._split(shape)
        if C != self.channels:
            raise self.error(f"input has {C} channels, the weights expect {self.channels}")
        for b in bottom[1:]:
            if b.shape != shape:
                raise self.error(f"all bottoms must have shape {shape}, got {b.shape}")
        size = deconv_out_size if self.reverse else conv_out_size
        out = tuple(size(*a) for a in zip(S, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in out):
            raise self.error(f"output size {out} from input {shape} is not positive")
        self.num, self.in_spatial, self.out_spatial = num, S, out
        # the engine's image side is the conv input (or the deconv output)
        img_S, col_S = (out, S) if self.reverse else (S, out)
        img_C, col_M = (self.num_output, self.channels) if self.reverse else (self.channels, self.num_output)
        key = (img_C, img_S, col_M, col_S)
        if self._engine is None or self._engine_key != key:
            self._engine = ConvEngine(self.xp, bottom[0].dtype, img_C, img_S, col_M, self.group,
                                      self.kernel, self.stride, self.pad, self.dilation, col_S,
                                      cache_chunks=not self.reverse)
            self._engine_key = key
            self._cols = {}
            self._wino = self._plan_winograd(bottom[0].dtype, img_C, img_S, col_M, col_S)
        if not self._engine.is_1x1:
            if self._wino[0] is None:
                engines = (self._engine, self._data_engine())
            else:  # Winograd builds no columns; im2col may still compute the data gradient
                engines = (self._data_engine(),) if self._wino[1] is None else ()
            for eng in engines:
                if eng is not None:
                    size = max(b - a for a, b in eng.chunks(num))
                    for worker in range(parallel.workers(self.xp)):
                        WORKSPACE.reserve(self.xp, bottom[0].dtype, int(numpy.prod(eng.col_shape(size))), worker)
        top_shape = shape[:self.channel_axis] + (self.num_output,) + out
        for t in top:
            t.reshape(top_shape)

    def _data_engine(self):
        """Convolution only: the engine of the data gradient as a convolution of dy, if it applies."""
        return None

    def _plan_winograd(self, dtype, C, S, M, O):
        """Convolution only: (forward, data gradient) Winograd engines where they apply."""
        return None, None

    # (num, C, *spatial) views of blobs around the channel axis
    def _nd(self, array, C, spatial):
        return array.reshape((self.num, C) + spatial)

    def _add_bias(self, y):
        b = self.blobs[1].data.reshape((1, self.num_output) + (1,) * self.n_spatial)
        y += b

    def _bias_grad(self, dy):
        # Caffe's way, a GEMV with a vector of ones per sample: 3x faster than numpy's sum over
        # the spatial and sample axes
        n = dy.shape[0]
        dy3 = dy.reshape(n, self.num_output, -1)
        ones = getattr(self, "_ones", None)
        if ones is None or ones.shape[0] != dy3.shape[2] or ones.dtype != dy.dtype:
            ones = self._ones = self.xp.ones(dy3.shape[2], dtype=dy.dtype)
        return (dy3 @ ones).sum(axis=0)

    def _backward_operands(self, top, propagate_down, bottom, need_w):
        """Per top/bottom pair: add the bias gradient, then yield (i, x, dy, dx) where
        the weight or data gradient is wanted (dx is None when the data's is not)."""
        for i, (t, b) in enumerate(zip(top, bottom)):
            dy = self._nd(t.diff, self.num_output, self.out_spatial)
            if self.bias_term and self.param_needs_grad(1):
                self.blobs[1].diff += self._bias_grad(dy)
            if not (need_w or propagate_down[i]):
                continue
            x = self._nd(b.data, self.channels, self.in_spatial)
            dx = self._nd(b.diff, self.channels, self.in_spatial) if propagate_down[i] else None
            yield i, x, dy, dx


@register("Convolution", v1="CONVOLUTION")
class Convolution(_BaseConv):
    def forward(self, bottom, top):
        eng, W = self._engine, self.blobs[0].data
        self._fresh = set()
        for i, (b, t) in enumerate(zip(bottom, top)):
            x = self._nd(b.data, self.channels, self.in_spatial)
            y = self._nd(t.data, self.num_output, self.out_spatial)
            if eng.is_1x1:
                self._forward_1x1(x, W, y)
                if self.bias_term:
                    self._add_bias(y)
                continue
            if self._wino[0] is not None:
                self._wino[0].forward(x, W, self.blobs[1].data if self.bias_term else None, y)
                continue
            chunks = eng.chunks(self.num)

            def job(j, worker, i=i, x=x, y=y):
                a, z = chunks[j]
                col = self._im2col(i, x[a:z], worker)
                eng.from_colside(eng.gemm_forward(col, W), y[a:z])
                if self.bias_term:
                    self._add_bias(y[a:z])  # while the chunk is still in cache

            parallel.run(job, len(chunks), self.xp)
            # the columns stay valid for backward only when the batch was one chunk
            if len(chunks) == 1:
                self._fresh.add(i)

    # "transposed" or "direct" to override the per-shape choice of data-gradient path (tests)
    force_data_grad = None
    # False: im2col even where Winograd applies (tests compare the two; BREWNET_WINOGRAD=0)
    use_winograd = True

    def _plan_winograd(self, dtype, C, S, M, O):
        if not self.use_winograd or self.force_data_grad is not None:
            return None, None
        return winograd.plan(self.xp, dtype, C, S, M, self.group, self.kernel, self.stride, self.pad,
                             self.dilation, O)

    def _data_engine(self):
        eng = self._engine
        if eng.is_1x1 or self.force_data_grad == "direct":
            return None
        # The direct path is kept (1) for few input channels per group (a first layer's dx): a
        # GEMM that narrow is slow either way, and the direct path makes it once for all kernel
        # offsets; (2) when the input is much larger than the output (no padding): the convolution
        # of dy then costs prod(S)/prod(O) times the direct path's arithmetic; (3) for many output
        # channels (CaffeNet's conv2-4): the per-offset GEMMs are then wide enough to run well;
        # (4) whenever the compiled col2im applies: one GEMM and one pass beat both (1.2-2.7x).
        if self.force_data_grad != "transposed" and (
                eng.Cg < 16 or 4 * numpy.prod(eng.S) > 5 * eng.L or eng.Mg > eng.skinny_max_outputs
                or eng.compiled_data_path()):
            return None
        return eng.transposed()

    def _im2col(self, i, x, worker=0):
        """im2col of bottom i into the thread's column workspace; remembers the token and view."""
        eng = self._engine
        token = object()
        buf = WORKSPACE.take(self.xp, x.dtype, eng.col_shape(x.shape[0]), token, worker)
        if worker == 0:
            self._cols[i] = (token, buf)
        return eng.im2col(x, out=buf, worker=worker)

    def _kept_columns(self, i, n):
        """The columns forward left in the workspace for bottom i, if nobody overwrote them."""
        token, buf = self._cols.pop(i, (None, None))
        if buf is None or i not in self._fresh or not WORKSPACE.holds(self.xp, buf.dtype, token):
            return None
        return self._engine._col_matrix(buf, n)

    def _forward_1x1(self, x, W, y):
        # no im2col: a batched GEMM per sample straight from the input layout
        G, n = self.group, self.num
        Wm = W.reshape(G, self.num_output // G, self.channels // G)
        xg = x.reshape(n, G, self.channels // G, -1)
        y.reshape(n, G, self.num_output // G, -1)[...] = self.xp.matmul(Wm, xg)

    def backward(self, top, propagate_down, bottom):
        eng, W = self._engine, self.blobs[0].data
        need_w = self.param_needs_grad(0)
        for i, x, dy, dx in self._backward_operands(top, propagate_down, bottom, need_w):
            if eng.is_1x1:
                self._backward_1x1(x, W, dy, dx, need_w)
                continue
            wino, wino_data = self._wino
            # this bottom's weight gradient, unless Winograd computes it (every bottom adds its own)
            im2col_w = need_w
            if wino is not None:
                if need_w:
                    self.blobs[0].add_to_diff(wino.weight_grad(x, dy))
                    im2col_w = False
                if dx is None:
                    continue
                if wino_data is not None:
                    wino_data.forward(dy, eng.flipped_weight(W), None, dx)
                    continue
                # else im2col's data gradient below (an unpadded convolution)
            chunks = eng.chunks(self.num)
            teng = self._data_engine() if dx is not None else None
            Wt = eng.flipped_weight(W) if teng is not None else None
            tchunks = teng.chunks(self.num) if teng is not None else None
            # one job per chunk does both gradients when the two engines chunk alike (dy is read
            # once, while in cache)
            fused = teng is not None and tchunks == chunks
            # per chunk, summed in chunk order afterwards: the same floats whichever thread ran it
            dW = [None] * len(chunks)

            def data_part(a, z, worker, dy=dy, dx=dx):
                """dx[a:z] as the convolution of dy with the flipped weights."""
                buf = WORKSPACE.take(self.xp, dy.dtype, teng.col_shape(z - a), object(), worker)
                cols = teng.im2col(dy[a:z], out=buf, worker=worker)
                teng.from_colside(teng.gemm_forward(cols, Wt), dx[a:z])

            def job(j, worker, i=i, x=x, dy=dy, dx=dx):
                a, z = chunks[j]
                rows = eng.colside_rows(dy[a:z]) if im2col_w else None
                if im2col_w:
                    col = self._kept_columns(i, z - a) if len(chunks) == 1 else None
                    if col is None:
                        col = self._im2col(i, x[a:z], worker)
                    dW[j] = eng.gemm_weight(col, rows)
                if dx is not None and teng is None:
                    ym = rows if rows is not None and eng.layout == "B" else eng.to_colside(dy[a:z])
                    eng.data_to_image(ym, W, z - a, dx[a:z], worker)
                elif fused:
                    data_part(a, z, worker)

            if im2col_w or teng is None or fused:
                parallel.run(job, len(chunks), self.xp)
            if im2col_w:
                total = dW[0]
                for g in dW[1:]:
                    total += g
                self.blobs[0].add_to_diff(total)
            if teng is not None and not fused:
                parallel.run(lambda j, worker: data_part(*tchunks[j], worker), len(tchunks), self.xp)

    def _backward_1x1(self, x, W, dy, dx, need_w):
        xp, G, n = self.xp, self.group, self.num
        Mg, Cg = self.num_output // G, self.channels // G
        xg = x.reshape(n, G, Cg, -1)
        dyg = dy.reshape(n, G, Mg, -1)
        if need_w:
            # sum over samples of dy_n x_n^T (per-sample GEMMs, summed)
            dW = xp.matmul(dyg, xg.transpose(0, 1, 3, 2)).sum(axis=0)
            self.blobs[0].diff += dW.reshape(self.blobs[0].shape)
        if dx is not None:
            Wm = W.reshape(G, Mg, Cg)
            dx.reshape(n, G, Cg, -1)[...] = xp.matmul(Wm.transpose(0, 2, 1), dyg)


@register("Deconvolution", v1="DECONVOLUTION")
class Deconvolution(_BaseConv):
    reverse = True

    def forward(self, bottom, top):
        eng, W = self._engine, self.blobs[0].data
        for b, t in zip(bottom, top):
            x = self._nd(b.data, self.channels, self.in_spatial)
            y = self._nd(t.data, self.num_output, self.out_spatial)
            for a, z in eng.chunks(self.num):
                eng.data_to_image(eng.to_colside(x[a:z]), W, z - a, y[a:z])
            if self.bias_term:
                self._add_bias(y)

    def backward(self, top, propagate_down, bottom):
        eng, W = self._engine, self.blobs[0].data
        need_w = self.param_needs_grad(0)
        for _, x, dy, dx in self._backward_operands(top, propagate_down, bottom, need_w):
            dW = None
            for a, z in eng.chunks(self.num):
                col = eng.im2col(dy[a:z], out=WORKSPACE.take(self.xp, dy.dtype, eng.col_shape(z - a), self))
                if need_w:
                    g = eng.gemm_weight(col, eng.colside_rows(x[a:z]))
                    dW = g if dW is None else dW + g
                if dx is not None:
                    eng.from_colside(eng.gemm_forward(col, W), dx[a:z])
            if need_w:
                self.blobs[0].diff += dW


@register("Im2col", v1="IM2COL")
class Im2col(_ConvGeometry):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        self._read_geometry(bottom)
        self._engine = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        num, C, S = self._split(shape)
        out = tuple(conv_out_size(*a) for a in zip(S, self.kernel, self.stride, self.pad, self.dilation))
        key = (C, S)
        if self._engine is None or self._engine_key != key:
            eng = ConvEngine(self.xp, bottom[0].dtype, C, S, 1, 1, self.kernel, self.stride, self.pad,
                             self.dilation, out)
            eng.layout = "B"  # Caffe's per-sample (c, k..., o...) order
            self._engine, self._engine_key = eng, key
        self.num, self.C, self.S, self.O = num, C, S, out
        kk = int(numpy.prod(self.kernel))
        top[0].reshape(shape[:self.channel_axis] + (C * kk,) + out)

    def forward(self, bottom, top):
        eng = self._engine
        x = bottom[0].data.reshape((self.num, self.C) + self.S)
        win = eng._window_view(eng._padded_source(x))  # (n, C, *k, *O)
        self.xp.copyto(top[0].data.reshape(win.shape), win)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        eng = self._engine
        dcol = top[0].diff.reshape((self.num, 1, self.C) + self.kernel + self.O)
        eng.col2im(dcol, bottom[0].diff.reshape((self.num, self.C) + self.S))
