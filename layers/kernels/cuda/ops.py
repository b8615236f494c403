"""brewnet's CUDA kernels and the array glue around them, for layers running on cupy.

The switch: ``BREWNET_CUDA_KERNELS=1`` (default off until verified on a device). When it is on
and a layer's arrays are cupy arrays, the layer's hook (a few lines at the top of its forward
and backward) calls the functions here instead of its array code, which stays the reference
and is what the CPU always runs.

Every function takes its arrays' module ``xp`` and launches kernels through ``launcher(xp)``:
on cupy the .cu sources compiled by NVRTC (``CupyKernels``); on numpy the CPU harness of the
tests, when a test installs it (``use_host_kernels``). So the glue below (GEMM layouts, chunks,
device-side normalizers) is tested on the CPU with the very kernel sources a GPU runs.

No function here reads a device value back to the host: losses, counts and normalizers stay
device scalars, and a bad label sets a device flag that ``run_deferred_checks`` reads when
the solver next reads its loss (display and test intervals).
"""

import math
import os

import numpy

from brewnet.layers.kernels.cuda import sources

SWITCH = "BREWNET_CUDA_KERNELS"

_i32, _f32 = numpy.int32, numpy.float32
_host = {"kernels": None}
_cupy = {"kernels": None}
_deferred = []  # (device int flag, callable making the exception to raise when it is set)


def switched_on():
    return os.environ.get(SWITCH, "0") == "1"


def active(xp, *arrays):
    """Whether a layer computing with ``xp`` on ``arrays`` should run these kernels now
    (the kernels are float32: float64 layers, as in gradient checks, keep the array code)."""
    if not switched_on():
        return False
    if xp is numpy and _host["kernels"] is None:
        return False
    return all(a.dtype == numpy.float32 and a.flags.c_contiguous for a in arrays)


def use_host_kernels(kernels):
    """Install (or with None remove) a CPU launcher for numpy arrays: tests/cuda_harness.py's."""
    _host["kernels"] = kernels


def launcher(xp):
    if xp is numpy:
        if _host["kernels"] is None:
            raise RuntimeError("the CUDA kernels run on numpy arrays only through the test harness")
        return _host["kernels"]
    if _cupy["kernels"] is None:
        _cupy["kernels"] = CupyKernels()
    return _cupy["kernels"]


class CupyKernels:
    """The .cu files compiled by cupy (NVRTC), one RawModule per file, launched grid-stride."""

    block = 256
    max_grid = 1 << 16  # grid-stride loops cover the rest

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._modules, self._functions = {}, {}

    def function(self, name):
        fn = self._functions.get(name)
        if fn is None:
            file = sources.kernel_table()[name].file
            module = self._modules.get(file)
            if module is None:
                module = self._modules[file] = self._cupy.RawModule(
                    code=sources.source_text(file), options=sources.COMPILE_OPTIONS)
            fn = self._functions[name] = module.get_function(name)
        return fn

    def __call__(self, name, count, *args):
        if count <= 0:
            return
        grid = min((count + self.block - 1) // self.block, self.max_grid)
        self.function(name)((grid,), (self.block,), (_i32(count),) + args)


def _check_count(count):
    # the kernels index with int: Caffe's limit too
    if count >= 2 ** 31:
        raise ValueError(f"{count} elements is too many for one kernel launch (int indexing)")
    return count


def _launch(xp, name, count, *args):
    launcher(xp)(name, _check_count(int(count)), *args)


# -- deferred checks -----------------------------------------------------------------------------

# checked at the latest after this many flags, for runs whose loss nobody reads (pycaffe loops)
MAX_DEFERRED = 256


def defer_check(flag, make_error):
    """Remember a device flag (int32 array) that a kernel sets on bad input."""
    _deferred.append((flag, make_error))
    if len(_deferred) >= MAX_DEFERRED:
        run_deferred_checks()


def run_deferred_checks():
    """Read every pending flag (one transfer each, at a display/test interval) and raise the first error."""
    pending = list(_deferred)
    _deferred.clear()
    for flag, make_error in pending:
        value = flag.get() if hasattr(flag, "get") else flag
        if int(numpy.asarray(value).reshape(-1)[0]):
            raise make_error()


# -- scratch -------------------------------------------------------------------------------------

_workspaces = {}


def workspace(xp, name, size):
    """A float32 scratch array of ``size`` elements, one per name and device, shared by every layer:
    what is launched on one stream runs in order, so a layer's use ends before the next one's."""
    cuda = getattr(xp, "cuda", None)
    key = (xp.__name__, cuda.Device().id if cuda is not None else None, name)
    buf = _workspaces.get(key)
    if buf is None or buf.size < size:
        buf = _workspaces[key] = None  # let the old one go before the new one is allocated
        buf = _workspaces[key] = xp.empty(size, dtype=numpy.float32)
    return buf[:size]


# -- convolution -----------------------------------------------------------------------------------

def conv_supported(geometry, reverse):
    """The CUDA plans cover 2-D float32 Convolution and Deconvolution (any pad, stride, dilation, group)."""
    return len(geometry.kernel) == 2 and numpy.dtype(geometry.dtype) == numpy.float32


class ConvPlan:
    """Convolution over the whole batch: im2col into a (C*kh*kw, n*oh*ow) matrix per chunk of
    samples, then one batched GEMM over the groups (cupy.matmul on (G, ., .) arrays: cuBLAS's
    strided batched GEMM), and a swap of the (channel, sample) axes into the blob's order with
    the bias added on the way. Backward: dW = dy * col^T with the batch in the GEMM's inner
    dimension (one GEMM per group for the whole chunk, not one per sample) and
    dx = col2im(W^T * dy). The same steps as BaseConvPlan, for layers/families/conv.py."""

    # bytes the column matrix may take; a bigger batch runs in chunks of samples
    max_col_bytes = 1 << 30
    path = data_path = "cuda-im2col"  # what `layer.plan.path` says (the CPU plans: im2col, winograd, onednn, 1x1, depthwise)

    def __init__(self, xp, geometry):
        self.xp, self.geometry = xp, geometry
        g = geometry
        self.N, self.C, self.M, self.G = g.batch, g.channels, g.num_output, g.group
        (self.H, self.W), (self.oh, self.ow) = g.in_spatial, g.out_spatial
        self.kh, self.kw = g.kernel
        self.L = self.oh * self.ow
        self.K = self.C * self.kh * self.kw
        self.Kg, self.Mg = self.K // self.G, self.M // self.G
        self.chunk = max(1, min(self.N, self.max_col_bytes // max(1, self.K * self.L * 4)))
        self._dummy = xp.zeros(1, dtype=numpy.float32)

    def _buf(self, name, size):
        return workspace(self.xp, name, size)

    def _chunks(self):
        return [(a, min(a + self.chunk, self.N)) for a in range(0, self.N, self.chunk)]

    def _geometry_args(self, n):
        g = self.geometry
        return (_i32(n), _i32(self.C), _i32(self.H), _i32(self.W), _i32(self.kh), _i32(self.kw),
                _i32(g.pad[0]), _i32(g.pad[1]), _i32(g.stride[0]), _i32(g.stride[1]),
                _i32(g.dilation[0]), _i32(g.dilation[1]), _i32(self.oh), _i32(self.ow))

    def columns(self, x, a, b):
        """The (K, n*L) column matrix of samples a..b (layout (c, ki, kj, n, oi, oj))."""
        n = b - a
        col = self._buf("col", self.K * n * self.L)
        _launch(self.xp, "im2col", col.size, x[a:b].reshape(-1), *self._geometry_args(n), col)
        return col

    def _swap(self, src, A, B, dst, bias=None):
        _launch(self.xp, "swap_leading_axes", src.size, src, _i32(A), _i32(B), _i32(self.L),
                self._dummy if bias is None else bias, _i32(bias is not None), dst)

    def forward(self, x, weight, bias, y, slot=0):
        xp, G, Mg, Kg = self.xp, self.G, self.Mg, self.Kg
        w3 = weight.reshape(G, Mg, Kg)
        for a, b in self._chunks():
            n = b - a
            col = self.columns(x, a, b).reshape(G, Kg, n * self.L)
            out = self._buf("out", self.M * n * self.L).reshape(G, Mg, n * self.L)
            xp.matmul(w3, col, out=out)
            self._swap(out.reshape(-1), self.M, n, y[a:b].reshape(-1), bias)

    def backward(self, x, weight, dy, dx, need_dw, slot=0):
        xp, G, Mg, Kg = self.xp, self.G, self.Mg, self.Kg
        w3 = weight.reshape(G, Mg, Kg)
        dw = xp.zeros((G, Mg, Kg), dtype=numpy.float32) if need_dw else None
        part = self._buf("dw", G * Mg * Kg).reshape(G, Mg, Kg) if need_dw else None
        for a, b in self._chunks():
            n = b - a
            dyt = self._buf("dyt", self.M * n * self.L)
            self._swap(dy[a:b].reshape(-1), n, self.M, dyt)  # (n, M, L) -> (M, n, L)
            dyt = dyt.reshape(G, Mg, n * self.L)
            if need_dw:
                col = self.columns(x, a, b).reshape(G, Kg, n * self.L)
                xp.matmul(dyt, col.transpose(0, 2, 1), out=part)
                dw += part
            if dx is not None:
                dcol = self._buf("col", self.K * n * self.L).reshape(G, Kg, n * self.L)
                xp.matmul(w3.transpose(0, 2, 1), dyt, out=dcol)
                _launch(xp, "col2im", dx[a:b].size, dcol.reshape(-1), *self._geometry_args(n), dx[a:b].reshape(-1))
        return None if dw is None else dw.reshape(weight.shape)

    def bias_gradient(self, dy):
        # a batched GEMV with ones, then a sum over samples: cheaper than a reduction over axes (0, 2)
        if getattr(self, "_ones", None) is None:
            self._ones = self.xp.ones(self.L, dtype=numpy.float32)
        return (dy.reshape(self.N, self.M, self.L) @ self._ones).sum(axis=0)


class DeconvPlan:
    """Deconvolution: the convolution from its output back to its input, run the other way round
    (Caffe's DeconvolutionLayer): forward is that convolution's data gradient plus the bias,
    backward its forward (data gradient) and its weight gradient with the roles of x and dy swapped."""

    path = data_path = ConvPlan.path

    def __init__(self, xp, geometry):
        g = self.geometry = geometry
        self.xp = xp
        self.conv = ConvPlan(xp, g._replace(channels=g.num_output, in_spatial=g.out_spatial,
                                            num_output=g.channels, out_spatial=g.in_spatial))

    def forward(self, x, weight, bias, y, slot=0):
        self.conv.backward(None, weight, x, y, need_dw=False)
        if bias is not None:
            y += bias.reshape(1, -1, 1, 1)

    def backward(self, x, weight, dy, dx, need_dw, slot=0):
        if dx is not None:
            self.conv.forward(dy, weight, None, dx)
        return self.conv.backward(dy, weight, x, None, need_dw) if need_dw else None

    def bias_gradient(self, dy):
        c = self.conv  # its input is the deconvolution's output
        if getattr(self, "_ones", None) is None:
            self._ones = self.xp.ones(c.H * c.W, dtype=numpy.float32)
        return (dy.reshape(c.N, c.C, -1) @ self._ones).sum(axis=0)


def conv_plan(xp, geometry, reverse):
    """A CUDA plan for this (de)convolution geometry, or None where it does not apply."""
    if not active(xp) or not conv_supported(geometry, reverse):
        return None
    return (DeconvPlan if reverse else ConvPlan)(xp, geometry)


# -- pooling ---------------------------------------------------------------------------------------

class Pool:
    """MAX / AVE pooling of one geometry; MAX keeps its int32 argmax mask (flat h*W+w, -1 for a
    window wholly outside the image) for backward and for the optional mask top."""

    def __init__(self, xp, kernel, stride, pad, in_hw, out_hw):
        self.xp = xp
        (H, W), (oh, ow) = in_hw, out_hw
        self.args = tuple(_i32(v) for v in (H, W, oh, ow, *kernel, *stride, *pad))
        self.mask = None

    def forward_max(self, x, y):
        if self.mask is None or self.mask.shape != y.shape:
            self.mask = self.xp.empty(y.shape, dtype=numpy.int32)
        _launch(self.xp, "max_pool_forward", y.size, x, *self.args, y, self.mask)

    def backward_max(self, dy, dx):
        H, W, oh, ow = self.args[:4]
        _launch(self.xp, "max_pool_backward", dx.size, dy, self.mask, H, W, oh, ow, *self.args[4:], dx)

    def forward_ave(self, x, y):
        _launch(self.xp, "ave_pool_forward", y.size, x, *self.args, y)

    def backward_ave(self, dy, dx):
        _launch(self.xp, "ave_pool_backward", dx.size, dy, *self.args, dx)


def pool_forward(xp, pool, is_max, x, y, mask_top, kernel, stride, pad):
    """Pooling's forward for the layer; returns the Pool to keep (``pool`` when it still fits)."""
    key = (kernel, stride, pad, x.shape[2:], y.shape[2:])
    if pool is None or pool.key != key:
        pool = Pool(xp, kernel, stride, pad, x.shape[2:], y.shape[2:])
        pool.key = key
    if is_max:
        pool.forward_max(x, y)
        if mask_top is not None:
            mask_top[...] = pool.mask
    else:
        pool.forward_ave(x, y)
    return pool


def pool_backward(pool, is_max, dy, dx):
    if is_max:
        pool.backward_max(dy, dx)
    else:
        pool.backward_ave(dy, dx)


# -- LRN -------------------------------------------------------------------------------------------

def lrn_forward(xp, x, y, scale, power, size, alpha, beta, k, within):
    """Fills scale and power (kept for backward) and y; x is (N, C, H, W)."""
    n, c, h, w = x.shape
    if within:
        _launch(xp, "lrn_within_forward", x.size, x, _i32(h), _i32(w), _i32(size), _f32(alpha / (size * size)),
                _f32(-beta), scale, power, y)
    else:
        _launch(xp, "lrn_across_forward", x.size, x, _i32(c), _i32(h * w), _i32(size), _f32(alpha / size),
                _f32(k), _f32(-beta), scale, power, y)


def lrn_backward(xp, x, dy, scale, power, dx, size, alpha, beta, within):
    n, c, h, w = x.shape
    if within:
        _launch(xp, "lrn_within_backward", x.size, x, dy, scale, power, _i32(h), _i32(w), _i32(size),
                _f32(2 * alpha * beta / (size * size)), dx)
    else:
        _launch(xp, "lrn_across_backward", x.size, x, dy, scale, power, _i32(c), _i32(h * w), _i32(size),
                _f32(2 * alpha * beta / size), dx)


# -- softmax, softmax loss, accuracy ----------------------------------------------------------------

def softmax(xp, x, y, outer, channels, inner):
    _launch(xp, "softmax_forward", outer * inner, x, _i32(channels), _i32(inner), y)


def softmax_backward(xp, y, dy, dx, outer, channels, inner):
    _launch(xp, "softmax_backward", outer * inner, y, dy, _i32(channels), _i32(inner), dx)


def _ignore_args(ignore_label):
    return _i32(ignore_label is not None), _i32(0 if ignore_label is None else ignore_label)


def softmax_loss_forward(xp, x, label, outer, channels, inner, ignore_label):
    """(prob, summed loss, valid mask, valid count, bad-label flag), all on the device."""
    prob = xp.empty_like(x)
    softmax(xp, x, prob, outer, channels, inner)
    loss = xp.empty(outer * inner, dtype=numpy.float32)
    valid = xp.empty(outer * inner, dtype=numpy.float32)
    bad = xp.zeros(1, dtype=numpy.int32)
    _launch(xp, "softmax_loss_forward", outer * inner, prob, label, _i32(channels), _i32(inner),
            *_ignore_args(ignore_label), loss, valid, bad)
    return prob, loss.sum(), valid, valid.sum(), bad


def softmax_loss_backward(xp, prob, label, valid, scale, dx, channels, inner):
    """dx = (prob - onehot) * scale * valid; scale a device array of one float."""
    scale = xp.ascontiguousarray(xp.asarray(scale, dtype=numpy.float32).reshape(1))
    _launch(xp, "softmax_loss_backward", prob.size, prob, label, valid, scale, _i32(channels), _i32(inner), dx)


def accuracy(xp, scores, label, outer, channels, inner, top_k, ignore_label):
    """(correct count, valid count, bad-label flag) as device scalars."""
    correct = xp.empty(outer * inner, dtype=numpy.float32)
    valid = xp.empty(outer * inner, dtype=numpy.float32)
    bad = xp.zeros(1, dtype=numpy.int32)
    _launch(xp, "accuracy_forward", outer * inner, scores, label, _i32(channels), _i32(inner), _i32(top_k),
            *_ignore_args(ignore_label), correct, valid, bad)
    return correct.sum(), valid.sum(), bad


# -- neurons ---------------------------------------------------------------------------------------

def relu(xp, x, y, slope):
    _launch(xp, "relu_forward", x.size, x, _f32(slope), y)


def relu_backward(xp, dy, x, dx, slope):
    _launch(xp, "relu_backward", x.size, dy, x, _f32(slope), dx)


def activation(xp, name, x, y):
    """name: "sigmoid" or "tanh"."""
    _launch(xp, f"{name}_forward", x.size, x, y)


def activation_backward(xp, name, dy, y, dx):
    _launch(xp, f"{name}_backward", y.size, dy, y, dx)


def dropout(xp, x, uniform, ratio, scale, y):
    _launch(xp, "dropout_forward", x.size, x, uniform, _f32(ratio), _f32(scale), y)


def dropout_backward(xp, dy, uniform, ratio, scale, dx):
    _launch(xp, "dropout_backward", dy.size, dy, uniform, _f32(ratio), _f32(scale), dx)


# -- BatchNorm and Scale ------------------------------------------------------------------------------

def channel_normalize(xp, x, mean, inv_std, channels, inner, y):
    _launch(xp, "channel_normalize", x.size, x, mean, inv_std, _i32(channels), _i32(inner), y)


def batch_norm_backward(xp, dy, y, mean_dy, mean_dy_y, inv_std, channels, inner, dx):
    _launch(xp, "batch_norm_backward", dy.size, dy, y, mean_dy, mean_dy_y, inv_std, _i32(channels), _i32(inner), dx)


def channel_scale(xp, x, scale, bias, channels, inner, y):
    _launch(xp, "channel_scale", x.size, x, scale, scale if bias is None else bias, _i32(bias is not None),
            _i32(channels), _i32(inner), y)


# -- solver updates ----------------------------------------------------------------------------------

RULES = ("sgd", "nesterov", "adagrad", "rmsprop", "adadelta", "adam")


def update_supported(rule_name, arrays):
    return rule_name in RULES and all(a.dtype == numpy.float32 and a.flags.c_contiguous for a in arrays)


def apply_step(xp, rule_name, data, diff, history, iter_size, decay, regularization, rate, param, iteration):
    """normalize + regularize + the rule + Net.update for one parameter, one kernel launch:
    the same arithmetic as solver/updates.py's functions followed by data -= diff."""
    if regularization not in ("L1", "L2"):
        raise ValueError(f"unknown regularization_type {regularization!r} (one of L2, L1)")
    common = (_f32(1.0 / iter_size), _f32(decay), _i32(regularization == "L1"))
    w, g = data.reshape(-1), diff.reshape(-1)
    h = [a.reshape(-1) for a in history]
    if rule_name in ("sgd", "nesterov"):
        extra = (_f32(rate), _f32(param.momentum))
    elif rule_name == "adagrad":
        extra = (_f32(rate), _f32(param.delta))
    elif rule_name == "rmsprop":
        extra = (_f32(rate), _f32(param.delta), _f32(param.rms_decay))
    elif rule_name == "adadelta":
        extra = (_f32(rate), _f32(param.delta), _f32(param.momentum))
    elif rule_name == "adam":
        t = iteration + 1
        correction = math.sqrt(1.0 - param.momentum2 ** t) / (1.0 - param.momentum ** t)
        extra = (_f32(rate * correction), _f32(param.delta), _f32(param.momentum), _f32(param.momentum2))
    else:
        raise ValueError(f"no CUDA kernel for the {rule_name} rule")
    _launch(xp, f"{rule_name}_step", w.size, w, g, *h, *common, *extra)
