"""oneDNN's convolution kernels for 2-D float32 convolutions on the CPU (the ``onednn`` extra).

Why: on AVX-512 CPUs oneDNN's direct convolution kernels (brgconv) run 3x3 and 5x5 layers at
200-240 GFLOP/s a core where im2col + OpenBLAS's GEMM reaches 110-190 (ResNet-50's 256-channel
3x3 at 14x14, batch 8, one thread: 9 ms forward against 13). It is the library PyTorch's CPU
convolutions use; brewnet calls its C API through ctypes (the ``onednn-cpu-gomp`` wheel ships
the shared library, with no Python bindings of its own).

How it fits brewnet's threads: each job (a chunk of samples) runs oneDNN primitives made for
that chunk size, one OpenMP thread each (``omp_set_num_threads(1)`` in every thread that calls
it), so the work is still handed out by ``parallel.run`` as threads come free, and a busy core
never stalls an OpenMP barrier. The kernels want channels-last data: per chunk, oneDNN's own
reorders turn x (and dy) from Caffe's NCHW into NHWC buffers of the thread, and the results
back. Weights go into the layout each primitive asked for, once per call.

``BREWNET_ONEDNN=0`` turns it off; ``BREWNET_ONEDNN_LIB`` names the library file when it is not
in the environment's ``lib`` folder. Without the library everything runs as before.
"""

import ctypes
import os
import sys
import threading

import numpy

from brewnet.layers.kernels.scratch import WORKSPACE

# the C API's enum values (oneDNN 3.x, dnnl_types.h / dnnl_common_types.h)
_F32 = 3
_TAG_ANY, _TAG_NCHW, _TAG_NHWC = 1, 5, 22
_CPU = 1
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_SCRATCHPAD_USER = 1
_QUERY_IMPL = 8
_QUERY_WEIGHTS, _QUERY_DIFF_WEIGHTS, _QUERY_SCRATCHPAD = 131, 132, 136
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_SCRATCHPAD = 1, 17, 33, 80
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_LIBRARY_NAMES = ("libdnnl.so.3", "libdnnl.so")
# implementations not worth calling: the reference loops, and im2col + oneDNN's own GEMM (what
# brewnet does already)
SLOW = ("ref", "gemm", "x64:gemm")

_P = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


class OneDNNError(RuntimeError):
    pass


def _candidates():
    path = os.environ.get("BREWNET_ONEDNN_LIB", "").strip()
    if path:
        return [path]
    folders = [os.path.join(p, "lib") for p in dict.fromkeys((sys.prefix, sys.base_prefix))]
    return [os.path.join(d, name) for d in folders for name in _LIBRARY_NAMES if os.path.exists(os.path.join(d, name))]


class _Library:
    """The loaded libdnnl: one CPU engine, a stream per thread, checked calls."""

    def __init__(self, path):
        self.path = path
        self.lib = lib = ctypes.CDLL(path)
        lib.dnnl_primitive_desc_query_md.restype = _P
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.engine = _P()
        self.check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, 0), "engine")
        try:  # the OpenMP runtime libdnnl was linked with (already loaded by it)
            self.omp = ctypes.CDLL("libgomp.so.1")
        except OSError:  # pragma: no cover - a build on another runtime
            self.omp = None
        self.local = threading.local()
        self.user_scratchpad = _P()
        self.check(lib.dnnl_primitive_attr_create(ctypes.byref(self.user_scratchpad)), "attributes")
        self.check(lib.dnnl_primitive_attr_set_scratchpad_mode(self.user_scratchpad, _SCRATCHPAD_USER), "attributes")

    @staticmethod
    def check(status, what):
        if status != 0:
            raise OneDNNError(f"oneDNN: {what} failed (status {status})")

    def one_thread(self):
        """OpenMP's thread count for the calling thread: 1. oneDNN sizes a primitive's work split
        when it is made and runs it in the calling thread's OpenMP team, so this is set in every
        thread that makes or runs one (OpenMP keeps the setting per thread)."""
        if self.omp is not None and not getattr(self.local, "one_thread", False):
            self.omp.omp_set_num_threads(1)
            self.local.one_thread = True

    def stream(self):
        """This thread's stream, made at its first call."""
        s = getattr(self.local, "stream", None)
        if s is None:
            self.one_thread()
            s = _P()
            self.check(self.lib.dnnl_stream_create(ctypes.byref(s), self.engine, 1), "stream")
            self.local.stream = s
        return s

    def md(self, dims, tag):
        m = _P()
        self.check(self.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(m), len(dims), _Dims(*dims), _F32, tag),
                   "memory descriptor")
        return m

    def queried(self, pd, what):
        return _P(self.lib.dnnl_primitive_desc_query_md(pd, what, 0))

    def nbytes(self, md):
        return int(self.lib.dnnl_memory_desc_get_size(md))

    def impl(self, pd):
        s = ctypes.c_char_p()
        self.check(self.lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL, 0, ctypes.byref(s)), "query")
        return s.value.decode()

    def primitive(self, pd):
        p = _P()
        self.check(self.lib.dnnl_primitive_create(ctypes.byref(p), pd), "primitive")
        return p

    def reorder(self, src_md, dst_md):
        pd = _P()
        self.check(self.lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src_md, self.engine, dst_md,
                                                               self.engine, None), "reorder")
        return self.primitive(pd)

    def memory(self, md):
        m = _P()
        self.check(self.lib.dnnl_memory_create(ctypes.byref(m), md, self.engine, None), "memory")
        return m

    def execute(self, primitive, args):
        """Run ``primitive`` on this thread's stream; args: (DNNL_ARG, memory, numpy array)."""
        lib = self.lib
        for _, mem, array in args:
            lib.dnnl_memory_set_data_handle(mem, _P(array.ctypes.data))
        packed = (_Arg * len(args))(*[_Arg(k, m) for k, m, _ in args])
        stream = self.stream()
        self.check(lib.dnnl_primitive_execute(primitive, stream, len(args), packed), "execute")
        self.check(lib.dnnl_stream_wait(stream), "stream wait")


_state = {"library": None, "tried": False}
_lock = threading.Lock()


def enabled():
    """False under BREWNET_ONEDNN=0."""
    return os.environ.get("BREWNET_ONEDNN", "1") != "0"


def library():
    """The loaded oneDNN library, or None (not installed, turned off, or failing to load)."""
    if not enabled():
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                for path in _candidates():
                    try:
                        _state["library"] = _Library(path)
                        break
                    except (OSError, OneDNNError, AttributeError):
                        continue
                _state["tried"] = True
    return _state["library"]


def available():
    return library() is not None


class _ChunkPrimitives:
    """The primitives and layouts for chunks of ``n`` samples."""

    def __init__(self, lib, n, C, S, M, k, stride, pad_l, pad_r, dilation, O):
        self.n = n
        x_nchw, x_nhwc = lib.md([n, C, *S], _TAG_NCHW), lib.md([n, C, *S], _TAG_NHWC)
        y_nchw, y_nhwc = lib.md([n, M, *O], _TAG_NCHW), lib.md([n, M, *O], _TAG_NHWC)
        w_any, w_user = lib.md([M, C, *k], _TAG_ANY), lib.md([M, C, *k], _TAG_NCHW)
        geometry = (_Dims(*stride), _Dims(*[d - 1 for d in dilation]), _Dims(*pad_l), _Dims(*pad_r))
        attr = lib.user_scratchpad
        fwd = _P()
        lib.check(lib.lib.dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(fwd), lib.engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, x_nhwc, w_any, None, y_nhwc,
            *geometry, attr), "convolution")
        bwd = _P()
        lib.check(lib.lib.dnnl_convolution_backward_data_primitive_desc_create(
            ctypes.byref(bwd), lib.engine, _CONVOLUTION_DIRECT, x_nhwc, w_any, y_nhwc, *geometry, fwd, attr),
            "convolution data gradient")
        wgt = _P()
        lib.check(lib.lib.dnnl_convolution_backward_weights_primitive_desc_create(
            ctypes.byref(wgt), lib.engine, _CONVOLUTION_DIRECT, x_nhwc, w_any, None, y_nhwc, *geometry, fwd, attr),
            "convolution weight gradient")
        self.impl = {"forward": lib.impl(fwd), "data": lib.impl(bwd), "weights": lib.impl(wgt)}
        self.forward, self.data, self.weights = lib.primitive(fwd), lib.primitive(bwd), lib.primitive(wgt)
        # the weight layouts each primitive asked for, and the reorders into and out of them
        w_fwd, w_data = lib.queried(fwd, _QUERY_WEIGHTS), lib.queried(bwd, _QUERY_WEIGHTS)
        w_grad = lib.queried(wgt, _QUERY_DIFF_WEIGHTS)
        self.to_w_fwd, self.to_w_data = lib.reorder(w_user, w_fwd), lib.reorder(w_user, w_data)
        self.from_w_grad = lib.reorder(w_grad, w_user)
        self.x_in, self.x_out = lib.reorder(x_nchw, x_nhwc), lib.reorder(x_nhwc, x_nchw)
        self.y_in, self.y_out = lib.reorder(y_nchw, y_nhwc), lib.reorder(y_nhwc, y_nchw)
        # every memory object's layout, by role; and the bytes of those the threads fill
        self.mds = {"x_nchw": x_nchw, "x_nhwc": x_nhwc, "y_nchw": y_nchw, "y_nhwc": y_nhwc,
                    "w_user": w_user, "w_fwd": w_fwd, "w_data": w_data, "w_grad": w_grad,
                    "s_forward": lib.queried(fwd, _QUERY_SCRATCHPAD), "s_data": lib.queried(bwd, _QUERY_SCRATCHPAD),
                    "s_weights": lib.queried(wgt, _QUERY_SCRATCHPAD)}
        self.sizes = {role: lib.nbytes(self.mds[role]) for role in
                      ("x_nhwc", "y_nhwc", "w_fwd", "w_data", "w_grad", "s_forward", "s_data", "s_weights")}


class Conv2d:
    """y (n, M, *O) = conv(x (n, C, *S), W (M, C, *k)) without bias, its data and weight
    gradients, over chunks of samples of the given sizes (one group, float32, C-contiguous)."""

    def __init__(self, C, S, M, kernel, stride, pad, dilation, O, chunk_sizes):
        self.lib = lib = library()
        if lib is None:
            raise OneDNNError("oneDNN is not available")
        self.C, self.S, self.M, self.k, self.O = C, tuple(S), M, tuple(kernel), tuple(O)
        # Caffe's output size rounds down; oneDNN wants the right padding that makes it exact
        pad_r = tuple((o - 1) * s + (k - 1) * d + 1 - s_ - p
                      for o, s, k, d, s_, p in zip(O, stride, kernel, dilation, S, pad))
        if min(pad_r) < 0:
            raise OneDNNError("the output leaves input rows unread past the padding")
        lib.one_thread()
        self.prims = {n: _ChunkPrimitives(lib, n, C, S, M, kernel, stride, pad, pad_r, dilation, O)
                      for n in sorted(set(chunk_sizes))}
        slow = sorted({impl for p in self.prims.values() for impl in p.impl.values() if impl.startswith(SLOW)})
        if slow:  # no direct kernel for this CPU or shape: brewnet's own paths do better
            raise OneDNNError(f"oneDNN has only {', '.join(slow)} for this convolution")
        self._memories = {}  # (worker, n, role) -> memory object

    def implementations(self):
        return {n: p.impl for n, p in self.prims.items()}

    def _buffer(self, worker, role, nbytes):
        """Thread ``worker``'s float32 buffer for ``role``, shared with every other layer (a net's
        layers run one at a time: scratch.WORKSPACE)."""
        return WORKSPACE.take(numpy, numpy.float32, (max(1, -(-nbytes // 4)),), self, worker, "onednn " + role)

    def _memory(self, worker, prims, role):
        key = (worker, prims.n, role)
        mem = self._memories.get(key)
        if mem is None:
            mem = self._memories[key] = self.lib.memory(prims.mds[role])
        return mem

    def _run(self, worker, prims, primitive, args):
        """Execute with args (DNNL_ARG, layout role, array) on this worker's memory objects."""
        self.lib.execute(primitive, [(arg, self._memory(worker, prims, role), array) for arg, role, array in args])

    def _scratch_args(self, worker, prims, which):
        role = "s_" + which
        size = prims.sizes[role]
        return [(_ARG_SCRATCHPAD, role, self._buffer(worker, role, size))] if size else []

    def _weights(self, W, role, reorder):
        """W (M, C, *k) in each chunk size's layout ``role``, by its reorder (a _ChunkPrimitives
        attribute); in the calling thread's buffers, for the jobs of this call."""
        out = {}
        W = numpy.ascontiguousarray(W, dtype=numpy.float32)
        for n, prims in self.prims.items():
            buf = out[n] = self._buffer(0, f"{role} {n}", prims.sizes[role])
            self._run(0, prims, getattr(prims, reorder), [(_ARG_SRC, "w_user", W), (_ARG_DST, role, buf)])
        return out

    def forward_weights(self, W):
        return self._weights(W, "w_fwd", "to_w_fwd")

    def data_weights(self, W):
        return self._weights(W, "w_data", "to_w_data")

    def forward(self, x, weights, y, worker):
        """y = conv(x, W) for one chunk (x, y: C-contiguous slices of the batch)."""
        prims = self.prims[x.shape[0]]
        xs = self._buffer(worker, "x", prims.sizes["x_nhwc"])
        ys = self._buffer(worker, "y", prims.sizes["y_nhwc"])
        self._run(worker, prims, prims.x_in, [(_ARG_SRC, "x_nchw", x), (_ARG_DST, "x_nhwc", xs)])
        self._run(worker, prims, prims.forward, [(_ARG_SRC, "x_nhwc", xs), (_ARG_WEIGHTS, "w_fwd", weights[prims.n]),
                                                 (_ARG_DST, "y_nhwc", ys)] + self._scratch_args(worker, prims, "forward"))
        self._run(worker, prims, prims.y_out, [(_ARG_SRC, "y_nhwc", ys), (_ARG_DST, "y_nchw", y)])

    def backward(self, x, dy, dx, data_weights, need_dw, worker):
        """For one chunk: dx = the data gradient (unless dx is None); returns this chunk's
        weight gradient (M, C, *k) when need_dw, else None."""
        prims = self.prims[dy.shape[0]]
        dys = self._buffer(worker, "y", prims.sizes["y_nhwc"])
        self._run(worker, prims, prims.y_in, [(_ARG_SRC, "y_nchw", dy), (_ARG_DST, "y_nhwc", dys)])
        if dx is not None:
            dxs = self._buffer(worker, "x", prims.sizes["x_nhwc"])
            self._run(worker, prims, prims.data, [(_ARG_DIFF_DST, "y_nhwc", dys),
                                                  (_ARG_WEIGHTS, "w_data", data_weights[prims.n]),
                                                  (_ARG_DIFF_SRC, "x_nhwc", dxs)]
                      + self._scratch_args(worker, prims, "data"))
            self._run(worker, prims, prims.x_out, [(_ARG_SRC, "x_nhwc", dxs), (_ARG_DST, "x_nchw", dx)])
        if not need_dw:
            return None
        xs = self._buffer(worker, "x", prims.sizes["x_nhwc"])
        self._run(worker, prims, prims.x_in, [(_ARG_SRC, "x_nchw", x), (_ARG_DST, "x_nhwc", xs)])
        grad = self._buffer(worker, "w_grad", prims.sizes["w_grad"])
        self._run(worker, prims, prims.weights, [(_ARG_SRC, "x_nhwc", xs), (_ARG_DIFF_DST, "y_nhwc", dys),
                                                 (_ARG_DIFF_WEIGHTS, "w_grad", grad)]
                      + self._scratch_args(worker, prims, "weights"))
        dW = numpy.empty((self.M, self.C) + self.k, numpy.float32)
        self._run(worker, prims, prims.from_w_grad, [(_ARG_SRC, "w_grad", grad), (_ARG_DST, "w_user", dW)])
        return dW
