"""2-D pooling on (N, C, H, W) arrays: MAX / AVE / STOCHASTIC with Caffe's output sizes,
divisors and tie-breaking. Knows nothing of layers: the Pooling layer holds one PoolCore.

Every method loops over the kernel offsets (kh*kw strided slices, each over the
whole batch): no gathers, no per-pixel Python, ties broken like Caffe (the
first maximum in row-major window order wins); compiled loops where numba runs.
"""

import math

import numpy

from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.netdef import caffe_pb2

P = caffe_pb2.PoolingParameter

# MAX and AVE pooling: planes whose rows of column results (output rows x padded width) fit
# this many elements have all their windows done in one pass; larger ones a row at a time
# (cpu_jit._pool_rows). (Tests set it to 1 to cover the row-at-a-time pass on small shapes.)
PLANE_ELEMENTS = 4096


def _stride_kernel(jit, name, sw):
    """The compiled pooling kernel ``name`` for horizontal stride sw (cpu_jit: 1 and 2 each
    have their own, compiled with the stride as a constant)."""
    return getattr(jit, f"{name}_sw{sw}") if sw in (1, 2) else getattr(jit, name)


def pooled_size(size, kernel, stride, pad, ceil_mode):
    """Caffe's pooled extent, including its rule that the last window starts inside image+pad."""
    span = (size + 2 * pad - kernel) / stride
    out = (math.ceil(span) if ceil_mode else math.floor(span)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class PoolCore:
    """One 2-D pooling geometry on (N, C, H, W) arrays; forward keeps what backward needs."""

    def __init__(self, xp, method, kernel, stride, pad, in_hw, out_hw):
        self.xp, self.method = xp, method
        self.k, self.s, self.p = kernel, stride, pad
        self.in_hw, self.out_hw = in_hw, out_hw
        # padded extent holding every (possibly clipped) window
        self.hw_p = tuple(max(n + 2 * p_, p_ + (o - 1) * s_ + k_)
                          for n, p_, o, s_, k_ in zip(in_hw, pad, out_hw, stride, kernel))
        self.trivial = self.hw_p == tuple(in_hw)
        # windows lying wholly past the image (ceil mode with kernel < stride): Caffe gives them
        # -FLT_MAX and mask -1, and they pass no gradient
        per_axis = [numpy.minimum(numpy.arange(o) * s_ - p_ + k_, n) > numpy.maximum(numpy.arange(o) * s_ - p_, 0)
                    for n, k_, s_, p_, o in zip(in_hw, kernel, stride, pad, out_hw)]
        full = numpy.outer(*per_axis)
        self.empty_windows = None if full.all() else xp.asarray(~full)
        self._buf = None  # padded input
        self._acc = None  # padded gradient accumulator
        self._max = None
        # compiled path: flat h*W+w of each window's maximum (what Caffe's mask holds)
        self._flat_buf = self._flat = None
        self.idx = None  # offset index (row-major in the window) of the chosen input

    def _padded(self, x, fill):
        if self.trivial:
            return x
        shape = x.shape[:2] + self.hw_p
        if self._buf is None or self._buf.shape != shape or self._buf.dtype != x.dtype:
            self._buf = self.xp.empty(shape, dtype=x.dtype)
        buf = self._buf
        buf.fill(fill)
        (ph, pw), (h, w) = self.p, self.in_hw
        buf[:, :, ph:ph + h, pw:pw + w] = x
        return buf

    def _offsets(self):
        (kh, kw), (sh, sw), (oh, ow) = self.k, self.s, self.out_hw
        for i in range(kh):
            for j in range(kw):
                yield i * kw + j, (slice(None), slice(None),
                                   slice(i, i + (oh - 1) * sh + 1, sh), slice(j, j + (ow - 1) * sw + 1, sw))

    def divisor(self, dtype):
        """AVE pool size per output position: window clipped to image+pad, before clipping to the image."""
        xp = self.xp
        sizes = []
        for n, k_, s_, p_, o in zip(self.in_hw, self.k, self.s, self.p, self.out_hw):
            start = numpy.arange(o) * s_ - p_
            end = numpy.minimum(start + k_, n + p_)
            sizes.append(end - start)
        return xp.asarray(numpy.outer(*sizes).astype(dtype))

    # -- forward -------------------------------------------------------------
    def _clipped_offsets(self):
        """Per kernel offset: (index, output slice, input slice) over the windows whose element at
        that offset lies inside the image (all of them when the windows tile the image)."""
        if getattr(self, "_clipped", None) is None:
            per_axis = []
            for k_, s_, p_, n, o in zip(self.k, self.s, self.p, self.in_hw, self.out_hw):
                axis = []
                for i in range(k_):
                    a = max(0, -(-(p_ - i) // s_))  # first output whose input row o*s - p + i >= 0
                    b = min(o, (n - 1 + p_ - i) // s_ + 1)  # one past the last with row < n
                    start = a * s_ - p_ + i
                    axis.append((slice(a, b), slice(start, start + (b - a - 1) * s_ + 1, s_)) if b > a else None)
                per_axis.append(axis)
            kw = self.k[1]
            self._clipped = [(i * kw + j, (Ellipsis, ah[0], aw[0]), (Ellipsis, ah[1], aw[1]))
                             for i, ah in enumerate(per_axis[0]) if ah
                             for j, aw in enumerate(per_axis[1]) if aw]
        return self._clipped

    def _max_sources(self, x):
        """(offset index, output slice, input view) per kernel offset, for MAX pooling.

        Strided reads are several times slower than contiguous ones in numpy, and so are
        ufuncs over partial views. Unless the windows tile the image exactly, the input is
        copied once into its stride phases (-inf padded: xpad[..., a::sh, b::sw]), so every
        offset reads one phase with unit stride and covers the whole output.
        """
        xp = self.xp
        (sh, sw), (kh, kw), (ph, pw) = self.s, self.k, self.p
        if self.trivial and kh <= sh and kw <= sw:
            return [(o, osl, x[isl]) for o, osl, isl in self._clipped_offsets()]
        (H, W), (oh, ow) = self.in_hw, self.out_hw
        shape = (sh, sw) + x.shape[:2] + (-(-self.hw_p[0] // sh), -(-self.hw_p[1] // sw))
        if self._buf is None or self._buf.shape != shape or self._buf.dtype != x.dtype:
            # the border (padding, ceil overhang) is never written again: -inf once
            self._buf = xp.full(shape, -numpy.inf, dtype=x.dtype)
        phases = self._buf
        for a in range(sh):
            r0 = (a - ph) % sh  # first input row that lands in phase a
            for b in range(sw):
                c0 = (b - pw) % sw
                src = x[..., r0::sh, c0::sw]
                rows = slice((r0 + ph) // sh, (r0 + ph) // sh + src.shape[-2])
                cols = slice((c0 + pw) // sw, (c0 + pw) // sw + src.shape[-1])
                phases[a, b, :, :, rows, cols] = src
        full = (Ellipsis, slice(None), slice(None))
        return [(i * kw + j, full, phases[i % sh, j % sw, :, :, i // sh:i // sh + oh, j // sw:j // sw + ow])
                for i in range(kh) for j in range(kw)]

    def _planes(self, a, hw):
        return a.reshape((-1,) + tuple(hw))

    # below this many input elements a kernel call is cheaper than handing out jobs
    parallel_min_elements = 1 << 16

    def _by_planes(self, kernel, arrays, *args):
        """Run a compiled kernel over (planes, ...) arrays, the planes split across the CPU threads."""
        parallel.over_ranges(lambda a, b: kernel(*(arr[a:b] for arr in arrays), *args), arrays[0].shape[0],
                             self.xp, arrays[0].size >= self.parallel_min_elements)

    def _jit(self, *arrays):
        """The compiled kernels when they apply (numpy, C-contiguous arrays), else None."""
        if cpu_kernels.enabled(self.xp) and all(a.flags.c_contiguous for a in arrays):
            return cpu_kernels.kernels()
        return None

    def forward_max(self, x, y):
        """Window maxima; the argmax is found later, only if a mask or a gradient is asked for
        (the compiled kernel finds both in one pass)."""
        xp = self.xp
        jit = self._jit(x, y)
        self._flat = None
        if jit is not None:
            if self._flat_buf is None or self._flat_buf.shape != y.shape:
                self._flat_buf = xp.empty(y.shape, dtype=numpy.int32)
            (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
            planes = (self._planes(x, self.in_hw), self._planes(y, self.out_hw),
                      self._planes(self._flat_buf, self.out_hw))
            self._by_planes(_stride_kernel(jit, "max_pool_forward", sw), planes, kh, kw, sh, sw, ph, pw,
                            PLANE_ELEMENTS)
            self._flat, self.idx = self._flat_buf, None
            self._empty_windows_to_lowest(y)
            return
        sources = self._max_sources(x)
        if sources[0][0] != 0 or sources[0][1] != (Ellipsis, slice(None), slice(None)):
            y.fill(-numpy.inf)  # some windows miss some offsets
        for n, (o, osl, src) in enumerate(sources):
            if n == 0 and y[osl].shape == y.shape:
                xp.copyto(y, src)
            else:
                yv = y[osl]
                xp.maximum(yv, src, out=yv)
        # a private copy: an in-place layer after this one (ReLU) may change y before backward
        if self._max is None or self._max.shape != y.shape or self._max.dtype != y.dtype:
            self._max = xp.empty_like(y)
        xp.copyto(self._max, y)
        self._sources, self.idx = sources, None
        self._empty_windows_to_lowest(y)

    def _empty_windows_to_lowest(self, y):
        # Caffe starts each maximum at -FLT_MAX, which a window wholly past the image keeps
        if self.empty_windows is not None:
            y[..., self.empty_windows] = -numpy.finfo(numpy.float32).max

    def argmax(self):
        """Offset of the first maximum of each window in row-major order (Caffe's strict '>')."""
        if self.idx is None and self._flat is not None:
            # from the compiled kernel's flat index: offset = (h - h0) * kw + (w - w0)
            xp, W, kw = self.xp, self.in_hw[1], self.k[1]
            (sh, sw), (ph, pw), (oh, ow) = self.s, self.p, self.out_hw
            h0 = (xp.arange(oh) * sh - ph).reshape(oh, 1)
            w0 = (xp.arange(ow) * sw - pw).reshape(1, ow)
            itype = numpy.uint8 if self.k[0] * kw <= 256 else numpy.int32
            self.idx = ((self._flat // W - h0) * kw + (self._flat % W - w0)).astype(itype)
        if self.idx is None:
            xp, y = self.xp, self._max
            # offsets in reverse, each overwriting where it holds the maximum: the first one wins.
            # Plain arithmetic (idx += (o - idx) * hit) vectorizes; masked copies do not.
            # one byte per index when the window allows: these passes are memory-bound, and the
            # arithmetic below stays exact modulo 256
            itype = numpy.dtype(numpy.uint8 if self.k[0] * self.k[1] <= 256 else numpy.int32)
            idx = xp.zeros(y.shape, dtype=itype)
            hit = xp.empty(y.shape, dtype=bool)
            step = xp.empty(y.shape, dtype=itype)
            for o, osl, src in reversed(self._sources):
                h, iv, st = hit[osl], idx[osl], step[osl]
                xp.equal(src, y[osl], out=h)
                xp.subtract(itype.type(o), iv, out=st)
                st *= h
                iv += st
            self.idx = idx
        return self.idx

    def _flat_index(self, idx):
        """Flat index into the (N, C, H, W) input of the input element chosen by each window."""
        xp = self.xp
        (H, W), (oh, ow), kw = self.in_hw, self.out_hw, self.k[1]
        n, c = idx.shape[:2]
        itype = numpy.int32 if n * c * H * W < 2 ** 31 else numpy.int64
        key = (idx.shape, itype)
        if getattr(self, "_flat_key", None) != key:
            (sh, sw), (ph, pw) = self.s, self.p
            rows = numpy.arange(oh) * sh - ph
            cols = numpy.arange(ow) * sw - pw
            base = (numpy.arange(n * c).reshape(n, c, 1, 1) * (H * W) + (rows[:, None] * W + cols)[None, None])
            self._flat_base = xp.asarray(base.astype(itype))
            offs = [i * W + j for i in range(self.k[0]) for j in range(kw)]
            self._flat_offs = xp.asarray(numpy.array(offs, dtype=itype))
            self._flat_key = key
        flat = xp.take(self._flat_offs, idx)
        flat += self._flat_base
        if any(self.p):
            # a window without any match (NaN input) keeps offset 0, which padding may put outside
            xp.clip(flat, 0, n * c * H * W - 1, out=flat)
        return flat.reshape(-1)

    def mask(self, dtype):
        """Caffe's top mask: flat index h*W+w of each maximum in its input plane."""
        xp = self.xp
        if self._flat is not None:
            return self._flat.astype(dtype)
        kw = self.k[1]
        (sh, sw), (ph, pw), (oh, ow), W = self.s, self.p, self.out_hw, self.in_hw[1]
        hs = (xp.arange(oh) * sh - ph).reshape(oh, 1)
        ws = (xp.arange(ow) * sw - pw).reshape(1, ow)
        idx = self.argmax()
        h = hs + idx // kw
        w = ws + idx % kw
        mask = (h * W + w).astype(dtype)
        if self.empty_windows is not None:
            mask[..., self.empty_windows] = -1
        return mask

    def forward_ave(self, x, y):
        jit = self._jit(x, y)
        if jit is not None:
            (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
            planes = (self._planes(x, self.in_hw), self._planes(y, self.out_hw))
            self._by_planes(_stride_kernel(jit, "ave_pool_forward", sw), planes, kh, kw, sh, sw, ph, pw,
                            PLANE_ELEMENTS)
            return
        src = self._padded(x, 0)
        y.fill(0)
        for _, sl in self._offsets():
            y += src[sl]
        y /= self.divisor(y.dtype)

    def forward_stochastic_train(self, x, y, rng):
        """Sample one input per window with probability proportional to its value (Caffe's GPU rule)."""
        xp = self.xp
        src = self._padded(x, 0)
        total = xp.zeros(y.shape, dtype=x.dtype)
        for _, sl in self._offsets():
            total += src[sl]
        thres = total * xp.asarray(rng.random(size=y.shape).astype(x.dtype))
        cum = xp.zeros_like(total)
        idx = xp.full(y.shape, -1, dtype=numpy.int32)
        y.fill(0)
        hit = xp.empty(y.shape, dtype=bool)
        for o, sl in self._offsets():
            v = src[sl]
            cum += v
            xp.greater_equal(cum, thres, out=hit)
            hit &= idx < 0
            xp.copyto(idx, o, where=hit)
            xp.copyto(y, v, where=hit)
        self.idx = idx

    def forward_stochastic_test(self, x, y):
        """Probability-weighted average: sum(x^2) / sum(x), 0 where the sum is not positive."""
        xp = self.xp
        src = self._padded(x, 0)
        total = xp.zeros(y.shape, dtype=x.dtype)
        sq = xp.zeros(y.shape, dtype=x.dtype)
        for _, sl in self._offsets():
            v = src[sl]
            total += v
            sq += v * v
        pos = total > 0
        y[...] = xp.where(pos, sq / xp.where(pos, total, 1), 0)

    # -- backward ------------------------------------------------------------
    def _scatter(self, dx, contributions):
        """Sum per-offset (N, C, oh, ow) contributions into dx through the padded frame."""
        xp = self.xp
        if self.trivial:
            acc = dx
        else:
            shape = dx.shape[:2] + self.hw_p
            if self._acc is None or self._acc.shape != shape or self._acc.dtype != dx.dtype:
                self._acc = xp.empty(shape, dtype=dx.dtype)
            acc = self._acc
        acc.fill(0)
        for sl, c in contributions:
            acc[sl] += c
        if not self.trivial:
            (ph, pw), (h, w) = self.p, self.in_hw
            dx[...] = acc[:, :, ph:ph + h, pw:pw + w]

    def backward_argmax(self, dy, dx):
        xp = self.xp
        if self.method == P.MAX and self._flat is not None:
            jit = self._jit(dy, dx)
            if jit is not None:
                self._by_planes(jit.max_pool_backward, (self._planes(dy, self.out_hw), self._planes(self._flat, self.out_hw),
                                                        dx.reshape(self._flat.shape[0] * self._flat.shape[1], -1)))
                return
        idx = self.argmax() if self.method == P.MAX else self.idx
        if self.method == P.MAX and dx.flags.c_contiguous and dy.flags.c_contiguous:
            # one scatter of dy onto the flat input index of each window's maximum
            flat = self._flat_index(idx)
            dxf = dx.reshape(-1)
            dxf.fill(0)
            if self.empty_windows is not None:
                keep = ~xp.broadcast_to(self.empty_windows, dy.shape).reshape(-1)
                flat, dy = flat[keep], dy.reshape(-1)[keep]
            if all(k_ <= s_ for k_, s_ in zip(self.k, self.s)):
                dxf[flat] = dy.reshape(-1)  # windows do not overlap: no index repeats
            else:
                xp.add.at(dxf, flat, dy.reshape(-1))
            return
        zero = xp.zeros((), dtype=dy.dtype)
        self._scatter(dx, ((sl, xp.where(idx == o, dy, zero)) for o, sl in self._offsets()))

    def backward_ave(self, dy, dx):
        jit = self._jit(dy, dx)
        if jit is not None:
            (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
            planes = (self._planes(dy, self.out_hw), self._planes(dx, self.in_hw))
            self._by_planes(_stride_kernel(jit, "ave_pool_backward", sw), planes, kh, kw, sh, sw, ph, pw,
                            PLANE_ELEMENTS)
            return
        g = dy / self.divisor(dy.dtype)
        self._scatter(dx, ((sl, g) for _, sl in self._offsets()))
