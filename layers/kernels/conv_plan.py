"""How a (de)convolution runs over a batch: which algorithm, in what chunks of samples, on which threads.

Convolution and Deconvolution (layers/families/conv.py) hold Caffe's semantics: parameters,
shapes, fillers. Each makes a plan from its geometry (``ConvGeometry``) at reshape; the plan
chooses once per shape and then runs the steps of Caffe's BaseConvolutionLayer over the batch:

  forward(x, W, b, y)                  forward_cpu_gemm and forward_cpu_bias: y = W * x + b
  backward(x, W, dy, dx, need_dw)      backward_cpu_gemm (dx = W^T * dy, when dx is given) and
                                       weight_cpu_gemm (returns dW = dy * x^T, when need_dw)
  bias_gradient(dy)                    backward_cpu_bias: db
DeconvPlan runs the same steps with the roles of x and y swapped, as Caffe's Deconvolution does.

A ConvPlan's ``path`` is "1x1" (a batched GEMM straight from the input layout, no columns),
"winograd" (F(4x4, kxk), layers/kernels/winograd.py) or "im2col" (column matrices,
layers/kernels/im2col.py). Its ``data_path``, for the data gradient: "1x1"; "winograd" (a
Winograd convolution of dy with the flipped weights); "transposed" (the same as an im2col
convolution); or "direct" (the column diff summed back onto the image, ConvEngine.data_to_image).

The kernels compute a chunk of samples at a time. The plan cuts the batch into chunks sized for
the cache or for memory, runs them as jobs on brewnet's threads (layers/kernels/parallel.py), and
sums the chunks' partial weight gradients in chunk order, so the floats do not depend on which
thread ran what. Column matrices live in the shared WORKSPACE (layers/kernels/scratch.py).
"""

from typing import NamedTuple

import numpy

from brewnet.layers.kernels import onednn, parallel, winograd
from brewnet.layers.kernels.depthwise import depthwise_backward, depthwise_forward
from brewnet.layers.kernels.im2col import ConvEngine
from brewnet.layers.kernels.scratch import WORKSPACE, Scratch


def gemm(xp, a, b, out=None):
    """a @ b (stacked over leading axes) into ``out``: every GEMM of the plans' own paths goes
    through here. parallel.matmul splits a big one over brewnet's threads (the BLAS itself runs
    one thread while they do, so a busy core does not stall it) and is a plain call inside a job."""
    return parallel.matmul(a, b, out=out)


class ConvGeometry(NamedTuple):
    """What a plan is made for: a layer makes a new plan when any of these changes."""
    dtype: numpy.dtype
    batch: int
    channels: int        # the input's
    in_spatial: tuple
    num_output: int
    out_spatial: tuple
    group: int
    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple


def _sum_in_order(parts):
    """parts[0] + parts[1] + ..., added into parts[0] in list order (the same floats every run)."""
    total = parts[0]
    for p in parts[1:]:
        total += p
    return total


class BaseConvPlan:
    """What the Convolution and Deconvolution plans share: geometry, chunk sizes, bias terms."""

    # bytes one column buffer may take; bigger batches are processed in chunks of samples
    max_col_bytes = 256 << 20
    # With few output channels per group the GEMMs do little arithmetic per column element and
    # are bound by memory bandwidth: chunks this small let the im2col copy and the GEMM reading
    # it meet in the CPU cache (CIFAR-10's convolutions run about twice as fast). Wider layers
    # are compute-bound and lose more to smaller GEMMs than they gain. With a chunk per thread
    # at a time, 3 MB beat 8 MB by 10-25% on CIFAR-10-quick (1.5-4 MB measured).
    cache_col_bytes = 3 << 20
    # up to this many outputs per group, chunks are cache-sized (CaffeNet's conv1, 96 outputs
    # from 3 channels, gains 15%; its conv3-5, 128-384 outputs over 1728-2304 inputs, lose 10-25%)
    cache_max_outputs = 96
    # whether narrow layers get cache-sized chunks at all
    cache_chunks = True

    def __init__(self, xp, geometry):
        self.xp = xp
        self.geometry = geometry
        self.dtype = numpy.dtype(geometry.dtype)
        self.batch = geometry.batch
        self.channels, self.num_output, self.group = geometry.channels, geometry.num_output, geometry.group
        self.n_spatial = len(geometry.in_spatial)
        self._ones = None

    @classmethod
    def chunk_samples(cls, engine):
        """How many samples one chunk of ``engine``'s column matrices holds."""
        limit = cls.max_col_bytes
        if cls.cache_chunks and engine.Mg <= cls.cache_max_outputs and engine.xp is numpy:
            limit = min(limit, cls.cache_col_bytes)
        return max(1, limit // max(1, engine.col_bytes_per_sample))

    def _chunks(self, engine):
        """(start, stop) sample ranges: chunk_samples at most, and at least one per CPU thread."""
        return parallel.chunk_ranges(self.batch, self.chunk_samples(engine), self.xp)

    def _reserve_columns(self, engine, chunks, extra_row=False):
        # every thread's column buffer at its full size now, so that forward never reallocates
        # (``extra_row``: room for a row of ones under the columns)
        n = max(b - a for a, b in chunks)
        size = int(numpy.prod(engine.col_shape(n))) + (n * engine.L if extra_row else 0)
        for worker in range(parallel.workers(self.xp)):
            WORKSPACE.reserve(self.xp, self.dtype, size, worker)

    def add_bias(self, y, bias):
        """y (n, M, *spatial) += bias (M,), per output channel."""
        y += bias.reshape((1, self.num_output) + (1,) * self.n_spatial)

    def bias_gradient(self, dy):
        """Sum of dy (n, M, *spatial) over samples and positions: (M,)."""
        # Caffe's way, a GEMV with a vector of ones per sample: 3x faster than numpy's sum over
        # the spatial and sample axes
        n = dy.shape[0]
        dy3 = dy.reshape(n, self.num_output, -1)
        if self._ones is None or self._ones.shape[0] != dy3.shape[2] or self._ones.dtype != dy.dtype:
            self._ones = self.xp.ones(dy3.shape[2], dtype=dy.dtype)
        return (dy3 @ self._ones).sum(axis=0)


class ConvPlan(BaseConvPlan):
    """Convolution: y (n, M, *O) = conv(x (n, C, *S), W (M, C/G, *kernel)) + b, and its gradients."""

    # above this many outputs per group, the data gradient takes the direct path
    skinny_max_outputs = 64
    # False: im2col even where Winograd applies (tests compare the two; users: BREWNET_WINOGRAD=0)
    use_winograd = True
    # "transposed" or "direct" to override the per-shape choice of data-gradient path (tests)
    force_data_grad = None
    # Winograd's chunks: their largest transformed array about winograd_chunk_bytes (in cache),
    # but of at least winograd_min_tiles tiles (up to twice the bytes): the per-tile-element GEMMs
    # of wide layers (256-384 channels) run at 40 GFLOP/s with 32 rows and 70 with 128.
    winograd_chunk_bytes = 2 << 20
    winograd_min_tiles = 128
    # Winograd only while the output channels per group are at most this many times the tiles of
    # the batch (None: whatever the count)
    winograd_max_filters_per_tile = 4
    # 3x3 layers of at most this many input channels per group stay on im2col where it runs
    # per-sample GEMMs (long rows): 9x deeper GEMMs than Winograd's. Batch 8, two threads,
    # forward / backward ms, Winograd against im2col: Inception-v3's 147x147 stem, 32 -> 64
    # channels 97 / 164 against 61 / 162, 32 -> 32 (unpadded) 51 / 92 against 48 / 82;
    # SqueezeNet's fire2 (16 -> 64, 55x55) 4.2 / 7.8 against 2.8 / 8.1. (Where im2col's
    # columns are channels-last, Winograd keeps winning: 32 -> 64 at 56x56 9.5 / 17.8 against
    # 10.9 / 19.3, 16 -> 32 at 28x28 2.6 / 4.6 against 2.8 / 5.1.)
    winograd_thin_channels = 32

    # False: grouped im2col even for depthwise convolutions (tests compare the two)
    use_depthwise = True
    # False: never oneDNN's kernels, even where installed (tests compare; users: BREWNET_ONEDNN=0)
    use_onednn = True
    # oneDNN's chunks: about this many bytes of one chunk's input and output, and at least two
    # jobs per thread (a thread slowed by other load takes fewer)
    onednn_chunk_bytes = 8 << 20
    # columns of one 1x1 job at least (smaller jobs lose more to calls than they gain in balance)
    pointwise_min_columns = 512
    # 1x1 weight gradient: up to this many positions per sample, a chunk's samples are gathered
    # side by side for one GEMM (ResNet's 14x14 and 7x7 stages); longer rows take a GEMM each.
    # One thread, batch 8, GFLOP/s, gathered against per sample: 28x28, 128 -> 512 channels 108
    # / 136, 512 -> 128 97 / 133; 14x14, 1024 -> 256 129 / 141, 256 -> 1024 138 / 136
    pointwise_gather_max_columns = 512
    # ... and up to this many positions in the whole batch, one GEMM over all of it (the
    # forward and data gradient measured slower so: they keep their per-sample GEMMs)
    pointwise_whole_batch_columns = 512

    # im2col forward (layout B, one group) as a GEMM per sample straight into y, the bias a
    # column of W against a row of ones under the columns, for rows this short or samples this
    # large. Batched GEMM + copy + bias against per sample, whole layer, 2 threads, ms, as
    # (M, K, positions x batch): LeNet's conv1 (20, 25, 576 x 64) weighs the same, CIFAR-10's
    # (32, 75, 1024 x 100) 7.7 / 6.7, ResNet-50's (64, 147, 12544 x 8) 13.9 / 12.4, MobileNet's
    # (32, 27, 12544 x 8) 3.1 / 2.3; one thread, one chunk: (32, 800, 256 x 12) 2.0 / 2.1 and
    # (64, 576, 196 x 16) 2.2 / 2.5.
    per_sample_max_rows = 128
    per_sample_min_positions = 1024
    # Their weight gradient is then a sum of per-sample GEMMs x_i dy_i^T too (no transposing
    # copy of dy; that way round OpenBLAS runs the long reductions faster): one thread, ms,
    # batched against per sample: LeNet's conv1 0.54 / 0.24, CIFAR-10's 0.72 / 0.64,
    # SqueezeNet's (64, 27, 12769 x 8) 8.8 / 6.9, ResNet-50's (64, 147, 12544 x 8) 21.7 / 17.6.

    @staticmethod
    def is_depthwise(g):
        """One input channel per group, several groups, 2-D: layers/kernels/depthwise.py's case."""
        return g.group > 1 and g.group == g.channels and len(g.kernel) == 2

    def __init__(self, xp, geometry):
        super().__init__(xp, geometry)
        g = geometry
        # the engine's image side is the input, its column side the output
        self.engine = eng = ConvEngine(xp, self.dtype, g.channels, g.in_spatial, g.num_output, g.group, g.kernel,
                                       g.stride, g.pad, g.dilation, g.out_spatial)
        self.winograd = self.winograd_data = self.data_engine = None
        self._kept = {}  # slot -> (token, buffer, samples, worker) of columns forward left
        self._bufs = Scratch(xp)
        if all(k == 1 for k in g.kernel) and not any(g.pad):
            # 1x1 (any stride): GEMMs straight from the input, no columns
            self.path = self.data_path = "1x1"
            self.strided = any(s != 1 for s in g.stride)
            self.pointwise_jobs = self._pointwise_jobs()
            return
        if self.use_depthwise and self.is_depthwise(g):
            self.path = self.data_path = "depthwise"
            return
        if self.use_winograd and self.force_data_grad is None:
            self.winograd, self.winograd_data = winograd.plan(xp, self.dtype, g.channels, g.in_spatial, g.num_output,
                                                              g.group, g.kernel, g.stride, g.pad, g.dilation,
                                                              g.out_spatial)
            limit = self.winograd_max_filters_per_tile
            if (self.winograd is not None and limit is not None
                    and g.num_output // g.group > limit * g.batch * self.winograd.tiles_per_sample):
                # few tiles for many filters (ResNet's 7x7 stage at batch 8, 14x14 at batch 1): the
                # transformed weights and the weight gradient's transform-domain sums, one per filter
                # pair, cost more than the tiles save (res5's 3x3: 5x slower than im2col backward)
                self.winograd = self.winograd_data = None
            if (self.winograd is not None and g.kernel == (3, 3) and eng.Cg <= self.winograd_thin_channels
                    and self._im2col_per_sample()):
                # thin 3x3 layers whose im2col runs per-sample GEMMs over long rows (see
                # winograd_thin_channels)
                self.winograd = self.winograd_data = None
        if self._onednn_wins() and self._try_onednn():
            self.winograd = self.winograd_data = None
            self.path = self.data_path = "onednn"
            return
        self.path = "im2col" if self.winograd is None else "winograd"
        if self.winograd_data is not None:
            self.data_path = "winograd"
        else:
            self.data_engine = self._transposed_engine()
            self.data_path = "direct" if self.data_engine is None else "transposed"
        # im2col's chunks serve the direct data gradient too
        self.chunks = self._chunks(eng)
        self.data_chunks = self._chunks(self.data_engine) if self.data_engine is not None else None
        if self.winograd is not None:
            self.winograd_chunks = self._winograd_chunks(self.winograd)
        if self.winograd_data is not None:
            self.winograd_data_chunks = self._winograd_chunks(self.winograd_data)
        # im2col's forward and weight gradient per sample (see per_sample_max_rows)
        self.per_sample = self.path == "im2col" and self._im2col_per_sample()
        if self.path == "im2col":
            self._reserve_columns(eng, self.chunks, extra_row=self.per_sample)
        if self.data_path == "transposed":
            self._reserve_columns(self.data_engine, self.data_chunks)

    def _onednn_wins(self):
        """Whether oneDNN's kernels beat the path chosen so far: im2col's always, Winograd's on
        thin layers. One thread, batch 8 unless said, forward + backward ms of the plan, the
        other path against oneDNN (its reorders to and from channels-last included):
        - im2col: Inception-v3's stem 2a / 2b (32 channels at 149x149 / 147x147) 150 / 255
          against 72 / 139, ResNet-50's res4 3x3 (256 at 14x14) 46 against 37 and its 7x7 conv1
          55 against 39, Inception-v3's 288 -> 384 stride-2 3x3 113 against 118.
        - Winograd, up to 32 input channels: CIFAR-10-quick's 5x5 conv2 (batch 100) 29 against 23,
          SqueezeNet's fire4 10.7 against 10.2; wider ones keep it: CaffeNet's 5x5 conv2 (96
          channels) 105 against 151, GoogLeNet's 3b 3x3 (128) 38 against 52, ResNet-50's res3
          (128) 27 against 34."""
        if self.winograd is None:
            return True
        return self.engine.Cg <= self.winograd_thin_channels

    def _try_onednn(self):
        """Set up oneDNN's kernels where they apply (2-D, one group, float32 on the CPU, a
        kernel wider than 1x1, the library installed); returns whether it did."""
        g = self.geometry
        if not (self.use_onednn and self.force_data_grad is None and self.xp is numpy and g.group == 1
                and self.dtype == numpy.float32 and len(g.kernel) == 2 and g.kernel != (1, 1)
                and onednn.available()):
            return False
        per_sample = 4 * (g.channels * int(numpy.prod(g.in_spatial)) + g.num_output * int(numpy.prod(g.out_spatial)))
        size = min(max(1, self.onednn_chunk_bytes // per_sample),
                   max(1, -(-g.batch // parallel.jobs_for(numpy, True, 2))))
        chunks = parallel.chunk_ranges(g.batch, size, numpy)
        try:
            self.onednn = onednn.Conv2d(g.channels, g.in_spatial, g.num_output, g.kernel, g.stride, g.pad,
                                        g.dilation, g.out_spatial, [z - a for a, z in chunks])
        except onednn.OneDNNError:
            return False
        self.onednn_chunks = chunks
        return True

    def _onednn_forward(self, x, W, bias, y, epilogue=None):
        conv, chunks = self.onednn, self.onednn_chunks
        weights = conv.forward_weights(W)
        x = numpy.ascontiguousarray(x)
        out = y if y.flags.c_contiguous else numpy.empty(y.shape, y.dtype)

        def job(j, worker):
            a, z = chunks[j]
            conv.forward(x[a:z], weights, out[a:z], worker)
            if bias is not None:
                self.add_bias(out[a:z], bias)  # while the chunk is still in cache
            if epilogue is not None:
                epilogue(out[a:z])

        parallel.run(job, len(chunks), numpy)
        if out is not y:
            y[...] = out

    def _onednn_backward(self, x, W, dy, dx, need_dw):
        conv, chunks = self.onednn, self.onednn_chunks
        weights = conv.data_weights(W) if dx is not None else None
        x, dy = numpy.ascontiguousarray(x), numpy.ascontiguousarray(dy)
        out = dx if dx is None or dx.flags.c_contiguous else numpy.empty(dx.shape, dx.dtype)
        parts = [None] * len(chunks)

        def job(j, worker):
            a, z = chunks[j]
            parts[j] = conv.backward(x[a:z], dy[a:z], None if out is None else out[a:z], weights, need_dw, worker)

        parallel.run(job, len(chunks), numpy)
        if out is not dx:
            dx[...] = out
        return _sum_in_order(parts) if need_dw else None

    def _im2col_per_sample(self):
        """Whether the im2col path would run its GEMMs per sample (see per_sample_max_rows)."""
        eng = self.engine
        return (self.xp is numpy and eng.layout == "B" and self.group == 1
                and (eng.Kg <= self.per_sample_max_rows or eng.L >= self.per_sample_min_positions))

    def _transposed_engine(self):
        """The engine of the data gradient as a convolution of dy, where that is the faster way."""
        eng = self.engine
        if self.force_data_grad == "direct":
            return None
        # The direct path is kept (1) for few input channels per group (a first layer's dx): a
        # GEMM that narrow is slow either way, and the direct path makes it once for all kernel
        # offsets; (2) when the input is much larger than the output (no padding): the convolution
        # of dy then costs prod(S)/prod(O) times the direct path's arithmetic; (3) for many output
        # channels (CaffeNet's conv2-4): the per-offset GEMMs are then wide enough to run well;
        # (4) whenever the compiled col2im applies: one GEMM and one pass beat both (1.2-2.7x);
        # (5) for few input channels from many outputs: the transposed GEMM has few rows, the
        # direct one a deep sum (batch 8, ms: SqueezeNet's fire2 3x3, 16 -> 64 channels at 55x55,
        # 5.0 against 5.6; Inception-v3's 32 -> 64 at 147x147 57 against 68; but 32 -> 32 at
        # 149x149 41 against 27).
        if self.force_data_grad != "transposed" and (
                eng.Cg < 16 or 4 * numpy.prod(eng.S) > 5 * eng.L or eng.Mg > self.skinny_max_outputs
                or eng.compiled_data_path() or (eng.Cg <= 32 and eng.Mg >= 64)):
            return None
        return eng.transposed()

    def _winograd_chunks(self, conv):
        per_sample = conv.bytes_per_sample
        chunk = max(1, self.winograd_chunk_bytes // per_sample,
                    min(-(-self.winograd_min_tiles // conv.tiles_per_sample),
                        2 * self.winograd_chunk_bytes // per_sample))
        return parallel.chunk_ranges(self.batch, chunk, numpy)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x, W, bias, y, slot=0, epilogue=None):
        """y = conv(x, W) + bias (bias may be None). ``slot`` names which of the layer's inputs x
        is: on the im2col path, its backward may reuse the columns built here. ``epilogue``, if
        given, is applied in place to each block of y the threads finish, while it is in cache
        (a fused activation: layers/fusion.py); returns whether it was (not on the depthwise path)."""
        if self.path == "1x1":
            self._forward_1x1(x, W, bias, y, epilogue)
        elif self.path == "depthwise":
            g = self.geometry
            depthwise_forward(x, W, bias, g.stride, g.pad, g.dilation, out=y)
            return False
        elif self.path == "onednn":
            self._onednn_forward(x, W, bias, y, epilogue)
        elif self.path == "winograd":
            self._winograd_forward(self.winograd, self.winograd_chunks, x, W, bias, y, epilogue)
        else:
            self._im2col_forward(x, W, bias, y, slot, epilogue)
        return True

    # -- 1x1 kernels: per-sample GEMMs on the input itself ------------------------------------
    def _pointwise_jobs(self):
        """(sample, first column, last column) per job: one sample each, its columns cut in
        pieces when there are few samples for the threads (stride 1 only: a strided input is
        gathered per sample)."""
        n, L = self.batch, int(numpy.prod(self.geometry.out_spatial))
        pieces = 1
        if not self.strided and self.xp is numpy:
            wanted = -(-parallel.jobs_for(self.xp, True, 2) // n)
            pieces = max(1, min(wanted, L // self.pointwise_min_columns))
        return [(i, a, b) for i in range(n) for a, b in parallel.split(L, pieces)]

    def _pointwise_input(self, x, i, worker):
        """Sample i of x as (G, C/G, L): a view at stride 1, else gathered into a thread buffer."""
        G, C = self.group, self.channels
        if not self.strided:
            return x[i].reshape(G, C // G, -1)
        picks = (slice(None),) + tuple(slice(None, None, s) for s in self.geometry.stride)
        sub = x[i][picks]
        buf = self._bufs.get("gathered", sub.shape, x.dtype, worker)
        buf[...] = sub
        return buf.reshape(G, C // G, -1)

    def _strided_input(self, x):
        """x at the positions a strided 1x1 kernel reads (all of x at stride 1)."""
        if not self.strided:
            return x
        return x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.geometry.stride)]

    def _forward_1x1(self, x, W, bias, y, epilogue=None):
        G, M = self.group, self.num_output
        Wm = W.reshape(G, M // G, self.channels // G)
        yv = y.reshape(self.batch, G, M // G, -1)
        if self.xp is not numpy:
            # one batched GEMM on the GPU (its jobs would run one after another)
            xs = self.xp.ascontiguousarray(self._strided_input(x)).reshape(self.batch, G, self.channels // G, -1)
            yv[...] = gemm(self.xp, Wm, xs)
            if bias is not None:
                self.add_bias(y, bias)
            if epilogue is not None:
                epilogue(y)
            return
        jobs = self.pointwise_jobs
        b3 = None if bias is None else bias.reshape(G, M // G, 1)

        def job(j, worker):
            i, a, z = jobs[j]
            xi = self._pointwise_input(x, i, worker)
            out = yv[i, :, :, a:z]
            gemm(self.xp, Wm, xi[:, :, a:z], out=out)
            if b3 is not None:
                out += b3  # while the block is in cache
            if epilogue is not None:
                epilogue(out)

        parallel.run(job, len(jobs), self.xp)

    def _winograd_forward(self, conv, chunks, x, W, bias, y, epilogue=None):
        U, b = conv.weight_tiles(W), conv.bias_vector(bias)

        def job(j, worker):
            a, z = chunks[j]
            conv.forward(x[a:z], U, b, y[a:z], worker)
            if epilogue is not None:
                epilogue(y[a:z])

        parallel.run(job, len(chunks), numpy)

    def _im2col_forward(self, x, W, bias, y, slot, epilogue=None):
        eng, chunks = self.engine, self.chunks
        # the columns stay valid for backward only when the batch was one chunk
        keep = slot if len(chunks) == 1 else None
        self._kept.pop(slot, None)
        if self.per_sample:
            self._per_sample_forward(x, W, bias, y, keep, epilogue)
            return

        def job(j, worker):
            a, z = chunks[j]
            col = self._im2col(x[a:z], worker, keep)
            eng.from_colside(eng.gemm_forward(col, W), y[a:z])
            if bias is not None:
                self.add_bias(y[a:z], bias)  # while the chunk is still in cache
            if epilogue is not None:
                epilogue(y[a:z])

        parallel.run(job, len(chunks), self.xp)

    def _per_sample_forward(self, x, W, bias, y, keep, epilogue):
        """y[i] = [W | b] [columns of x[i]; ones], one GEMM per sample into y (layout B, one group)."""
        eng, chunks, L = self.engine, self.chunks, self.engine.L
        Wm = eng.weight_matrix(W)[0]
        if bias is not None:
            Wm = self.xp.concatenate([Wm, bias.reshape(-1, 1)], axis=1)
        yv = y.reshape(self.batch, self.num_output, L)

        def job(j, worker):
            a, z = chunks[j]
            n = z - a
            col = self._im2col(x[a:z], worker, keep, extra_row=bias is not None)
            if bias is None:
                col = col[0]
            for i in range(n):
                gemm(self.xp, Wm, col[:, i * L:(i + 1) * L], out=yv[a + i])
            if epilogue is not None:
                epilogue(y[a:z])

        parallel.run(job, len(chunks), self.xp)

    def _im2col(self, x, worker, keep=None, extra_row=False):
        """Columns of x in the thread's column workspace; remembered for slot ``keep`` if given.
        ``extra_row`` (one group): a row of ones under them, returned as one (Kg + 1, nL) matrix."""
        token, n = object(), x.shape[0]
        shape = self.engine.col_shape(n)
        if extra_row:
            size = int(numpy.prod(shape))
            flat = WORKSPACE.take(self.xp, x.dtype, (size + n * self.engine.L,), token, worker)
            buf = flat[:size].reshape(shape)
        else:
            buf = WORKSPACE.take(self.xp, x.dtype, shape, token, worker)
        if keep is not None:
            self._kept[keep] = (token, buf, n, worker)
        col = self.engine.im2col(x, out=buf, worker=worker)
        if not extra_row:
            return col
        flat[size:] = 1
        return flat.reshape(-1, n * self.engine.L)

    def _kept_columns(self, slot):
        """The columns of ``slot`` still in the workspace (nobody took it since), or None."""
        token, buf, n, worker = self._kept.pop(slot, (None, None, 0, 0))
        if buf is None or not WORKSPACE.holds(self.xp, buf.dtype, token, worker):
            return None
        return self.engine.column_matrix(buf, n)

    # -- backward -----------------------------------------------------------------------
    def backward(self, x, W, dy, dx, need_dw, slot=0):
        """Writes the data gradient into dx (unless dx is None) and returns the weight
        gradient (M, C/G, *kernel) if need_dw, else None. The result may be a shared buffer:
        add it to the weight diff before the plan's next call."""
        if self.path == "1x1":
            return self._backward_1x1(x, W, dy, dx, need_dw)
        if self.path == "depthwise":
            g = self.geometry
            return depthwise_backward(x, W, dy, g.stride, g.pad, g.dilation, dx=dx, need_dw=need_dw)
        if self.path == "onednn":
            return self._onednn_backward(x, W, dy, dx, need_dw)
        if self.path == "im2col":
            return self._im2col_backward(x, W, dy, dx, need_dw, slot)
        if dx is not None:
            if self.data_path == "winograd":
                flipped = self.engine.flipped_weight(W)
                self._winograd_forward(self.winograd_data, self.winograd_data_chunks, dy, flipped, None, dx)
            else:  # an unpadded convolution: im2col's data gradient
                self._im2col_backward(x, W, dy, dx, False, slot)
        # last: Winograd's weight gradient is a view of a shared buffer
        return self._winograd_weight_grad(x, dy) if need_dw else None

    def _backward_1x1(self, x, W, dy, dx, need_dw):
        xp, G, n = self.xp, self.group, self.batch
        Mg, Cg = self.num_output // G, self.channels // G
        dyg = dy.reshape(n, G, Mg, -1)
        Wt = W.reshape(G, Mg, Cg).transpose(0, 2, 1)
        if xp is not numpy:
            # batched GEMMs on the GPU, as in forward
            xg = xp.ascontiguousarray(self._strided_input(x)).reshape(n, G, Cg, -1)
            if dx is not None:
                part = gemm(xp, Wt, dyg).reshape((n, self.channels) + self.geometry.out_spatial)
                if self.strided:
                    dx.fill(0)
                self._strided_input(dx)[...] = part
            return gemm(xp, dyg, xg.transpose(0, 1, 3, 2)).sum(axis=0).reshape(W.shape) if need_dw else None
        L = int(numpy.prod(self.geometry.out_spatial))
        whole_batch = L * n <= self.pointwise_whole_batch_columns and n > 1
        if dx is not None:
            jobs = self.pointwise_jobs
            picks = (slice(None),) + tuple(slice(None, None, s) for s in self.geometry.stride)

            def data_job(j, worker):
                i, a, z = jobs[j]
                if not self.strided:
                    gemm(xp, Wt, dyg[i, :, :, a:z], out=dx[i].reshape(G, Cg, -1)[:, :, a:z])
                    return
                # the 1x1 strided convolution read only every stride-th position: the rest get 0
                part = gemm(xp, Wt, dyg[i])
                dx[i].fill(0)
                dx[i][picks] = part.reshape((self.channels,) + self.geometry.out_spatial)

            parallel.run(data_job, len(jobs), xp)
        if not need_dw:
            return None
        # dW = sum over samples of dy_i x_i^T: per chunk of samples one GEMM over the chunk's
        # positions side by side (gathered into thread buffers), then the chunks' partial sums
        # add up in chunk order. (numpy's matmul lets the threads run at once; scipy's BLAS
        # wrappers hold the GIL.)
        if whole_batch:
            # few positions in all (ResNet's 7x7 stage): the whole batch side by side in one
            # GEMM, which parallel.matmul splits over the threads by output rows: longer inner
            # products than per-chunk GEMMs, and no partial sums to add
            rows = self._bufs.get("dy_rows", (G, Mg, n, L), dy.dtype, 0)
            rows[...] = dyg.transpose(1, 2, 0, 3)
            cols = self._bufs.get("x_rows", (G, Cg, n, L), x.dtype, 0)
            cols[...] = self._strided_input(x).reshape(n, G, Cg, L).transpose(1, 2, 0, 3)
            return gemm(xp, rows.reshape(G, Mg, -1), cols.reshape(G, Cg, -1).transpose(0, 2, 1)).reshape(W.shape)
        chunks = parallel.chunk_ranges(n, max(1, n // parallel.jobs_for(xp, n > 1, 2)), xp)
        parts = [None] * len(chunks)

        def weight_job(j, worker):
            a, z = chunks[j]
            if z - a == 1 or L > self.pointwise_gather_max_columns:
                # long rows: a GEMM per sample runs as well, and its small sum costs less than
                # gathering. The wider side of dW as the GEMM's rows: OpenBLAS runs x_i dy_i^T
                # (Cg, Mg) 10-30% faster than dy_i x_i^T when Cg > Mg (512 -> 128, 256 -> 64)
                if Cg > Mg:
                    acc = gemm(xp, self._pointwise_input(x, a, worker), dyg[a].transpose(0, 2, 1))
                    for i in range(a + 1, z):
                        acc += gemm(xp, self._pointwise_input(x, i, worker), dyg[i].transpose(0, 2, 1))
                    parts[j] = acc.transpose(0, 2, 1)
                    return
                acc = gemm(xp, dyg[a], self._pointwise_input(x, a, worker).transpose(0, 2, 1))
                for i in range(a + 1, z):
                    acc += gemm(xp, dyg[i], self._pointwise_input(x, i, worker).transpose(0, 2, 1))
                parts[j] = acc
                return
            rows = self._bufs.get("dy_rows", (G, Mg, z - a, L), dy.dtype, worker)
            rows[...] = dyg[a:z].transpose(1, 2, 0, 3)
            cols = self._bufs.get("x_rows", (G, Cg, z - a, L), x.dtype, worker)
            xs = self._strided_input(x[a:z]).reshape(z - a, G, Cg, L)
            cols[...] = xs.transpose(1, 2, 0, 3)
            parts[j] = gemm(xp, rows.reshape(G, Mg, -1), cols.reshape(G, Cg, -1).transpose(0, 2, 1))

        parallel.run(weight_job, len(chunks), xp)
        return _sum_in_order(parts).reshape(W.shape)

    def _winograd_weight_grad(self, x, dy):
        conv, chunks = self.winograd, self.winograd_chunks
        parts = [None] * len(chunks)

        def job(j, worker):
            a, z = chunks[j]
            parts[j] = conv.weight_grad_part(x[a:z], dy[a:z], worker)

        parallel.run(job, len(chunks), numpy)
        return conv.weight_grad(_sum_in_order(parts))

    def _per_sample_weight_grad(self, col, dy):
        """The sum over the samples i, in order, of their columns (K, L) times dy[i] (M, L)
        transposed: dW as (K, M), returned as (M, Cg, *kernel)."""
        eng, L = self.engine, self.engine.L
        dy3 = dy.reshape(dy.shape[0], self.num_output, L)
        acc = gemm(self.xp, col[:, :L], dy3[0].T)
        for i in range(1, dy.shape[0]):
            acc += gemm(self.xp, col[:, i * L:(i + 1) * L], dy3[i].T)
        return eng.weight_from_matrix(acc.T[None])

    def _im2col_backward(self, x, W, dy, dx, need_dw, slot):
        eng, chunks = self.engine, self.chunks
        teng = self.data_engine if dx is not None else None
        Wt = eng.flipped_weight(W) if teng is not None else None
        # one job per chunk does both gradients when the two engines chunk alike (dy is read
        # once, while in cache)
        fused = teng is not None and self.data_chunks == chunks
        keep = slot if len(chunks) == 1 else None
        dW = [None] * len(chunks)  # per chunk, summed in chunk order afterwards
        # per-sample weight GEMMs unless the direct data gradient needs dy's rows anyway
        per_sample = self.per_sample and (dx is None or teng is not None)

        def data_part(a, z, worker):
            """dx[a:z] as the convolution of dy with the flipped weights."""
            buf = WORKSPACE.take(self.xp, dy.dtype, teng.col_shape(z - a), object(), worker)
            cols = teng.im2col(dy[a:z], out=buf, worker=worker)
            teng.from_colside(teng.gemm_forward(cols, Wt), dx[a:z])

        def job(j, worker):
            a, z = chunks[j]
            rows = eng.colside_rows(dy[a:z]) if need_dw and not per_sample else None
            if need_dw:
                col = self._kept_columns(keep) if keep is not None else None
                if col is None:
                    col = self._im2col(x[a:z], worker, keep)
                dW[j] = self._per_sample_weight_grad(col[0], dy[a:z]) if per_sample else eng.gemm_weight(col, rows)
            if dx is not None and teng is None:
                ym = rows if rows is not None and eng.layout == "B" else eng.to_colside(dy[a:z])
                eng.data_to_image(ym, W, z - a, dx[a:z], worker)
            elif fused:
                data_part(a, z, worker)

        if need_dw or teng is None or fused:
            parallel.run(job, len(chunks), self.xp)
        if teng is not None and not fused:
            tchunks = self.data_chunks
            parallel.run(lambda j, worker: data_part(*tchunks[j], worker), len(tchunks), self.xp)
        return _sum_in_order(dW) if need_dw else None


class DeconvPlan(BaseConvPlan):
    """Deconvolution: y (n, M, *O) = W^T x + b for x (n, C, *S), W (C, M/G, *kernel): a
    convolution's data gradient as forward, its forward as data gradient (Caffe's roles)."""

    # its per-offset GEMMs only get slower in small chunks
    cache_chunks = False

    def __init__(self, xp, geometry):
        super().__init__(xp, geometry)
        g = geometry
        # the engine's image side is the output, its column side the input
        self.engine = ConvEngine(xp, self.dtype, g.num_output, g.out_spatial, g.channels, g.group, g.kernel,
                                 g.stride, g.pad, g.dilation, g.in_spatial)
        self.chunks = self._chunks(self.engine)
        if not self.engine.is_1x1:
            self._reserve_columns(self.engine, self.chunks)

    def forward(self, x, W, bias, y, slot=0):
        """y = deconv(x, W) + bias (bias may be None); ``slot`` as in ConvPlan (unused)."""
        eng = self.engine
        for a, z in self.chunks:
            eng.data_to_image(eng.to_colside(x[a:z]), W, z - a, y[a:z])
        if bias is not None:
            self.add_bias(y, bias)

    def backward(self, x, W, dy, dx, need_dw, slot=0):
        """As ConvPlan.backward: dx written unless None, dW returned if need_dw."""
        eng, dW = self.engine, None
        for a, z in self.chunks:
            col = eng.im2col(dy[a:z], out=WORKSPACE.take(self.xp, dy.dtype, eng.col_shape(z - a), self))
            if need_dw:
                g = eng.gemm_weight(col, eng.colside_rows(x[a:z]))
                dW = g if dW is None else dW + g
            if dx is not None:
                eng.from_colside(eng.gemm_forward(col, W), dx[a:z])
        return dW
