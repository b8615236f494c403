"""The speed paths: BLAS accumulation helpers, the shared im2col workspace, scatter-based max-pool backward."""

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.layers.kernels import blas
from brewnet.layers.kernels.blas import axpy, matmul_acc
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2

RNG = numpy.random.default_rng(7)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_matmul_acc_adds_in_place(dtype, ta, tb, monkeypatch):
    monkeypatch.setattr(blas, "GEMM_MIN_BYTES", 0)  # take the BLAS path even for tiny arrays
    a = RNG.standard_normal((5, 7) if ta else (7, 5)).astype(dtype)
    b = RNG.standard_normal((9, 5) if tb else (5, 9)).astype(dtype)
    a, b = (a.T if ta else a), (b.T if tb else b)
    out = RNG.standard_normal((7, 9)).astype(dtype)
    want = out + a @ b
    got = matmul_acc(a, b, out)
    assert got is out
    numpy.testing.assert_allclose(out, want, rtol=1e-5)


def test_axpy_blas_path(monkeypatch):
    monkeypatch.setattr(blas, "AXPY_MIN_BYTES", 0)
    for dtype in (numpy.float32, numpy.float64):
        x, y = RNG.standard_normal((3, 4)).astype(dtype), RNG.standard_normal((3, 4)).astype(dtype)
        want = y + 0.25 * x
        assert axpy(0.25, x, y) is y
        numpy.testing.assert_allclose(y, want, rtol=1e-6)


def test_matmul_acc_and_axpy_fallbacks(monkeypatch):
    monkeypatch.setattr(blas, "GEMM_MIN_BYTES", 0)
    monkeypatch.setattr(blas, "AXPY_MIN_BYTES", 0)
    # a non-contiguous result and a dtype BLAS lacks take the plain numpy path
    out = numpy.zeros((4, 3), numpy.float32).T
    matmul_acc(numpy.ones((3, 2), numpy.float32), numpy.ones((2, 4), numpy.float32), out)
    assert (out == 2).all()
    y = numpy.ones(6, numpy.float16)
    axpy(0.5, numpy.full(6, 2, numpy.float16), y)
    assert y.dtype == numpy.float16 and (y == 2).all()
    y32 = numpy.ones((2, 3), numpy.float32)
    axpy(-1.0, numpy.full((2, 3), 3, numpy.float32), y32)
    assert (y32 == -2).all()


def test_inner_product_backward_accumulates_param_diffs():
    layer = make_layer('name: "ip" type: "InnerProduct" inner_product_param { num_output: 4 '
                       'weight_filler { type: "gaussian" } }', dtype=numpy.float32)
    x = RNG.standard_normal((3, 5)).astype(numpy.float32)
    bottom, top = setup_layer(layer, [x], dtype=numpy.float32)
    layer.forward(bottom, top)
    dy = RNG.standard_normal(top[0].shape).astype(numpy.float32)
    top[0].diff[...] = dy
    layer.blobs[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    numpy.testing.assert_allclose(layer.blobs[0].diff, 1.0 + dy.T @ x, rtol=1e-5)
    numpy.testing.assert_allclose(bottom[0].diff, dy @ layer.blobs[0].data, rtol=1e-5)


TWO_CONVS = """
name: "two"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
  convolution_param { num_output: 5 kernel_size: 3 stride: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "p" type: "Pooling" bottom: "c2" top: "p" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "target" top: "loss" }
layer { name: "t" type: "Input" top: "target" input_param { shape { dim: 2 dim: 5 dim: 2 dim: 2 } } }
"""


def test_shared_column_workspace_gives_each_layer_its_own_gradient():
    """c2 overwrites the workspace after c1's forward: c1's backward must rebuild its columns."""
    param = text_format.Parse(TWO_CONVS, caffe_pb2.NetParameter())
    # the target's Input must come before the loss: move it to the front
    layers = list(param.layer)
    del param.layer[:]
    param.layer.extend([layers[0], layers[-1]] + layers[1:-1])
    net = Net(param, phase=caffe_pb2.TRAIN, dtype=numpy.float64, rng=0)
    net.blobs["data"].data[...] = RNG.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = RNG.standard_normal(net.blobs["target"].shape)
    net.clear_param_diffs()
    net.forward()
    net.backward()
    for name in ("c1", "c2"):
        i = net.layer_names.index(name)
        lp = net.layers[i].param
        alone = make_layer(text_format.MessageToString(lp), dtype=numpy.float64)
        bottom, top = setup_layer(alone, [net.bottom_vecs[i][0].data.copy()])
        for mine, theirs in zip(alone.blobs, net.layers[i].blobs):
            mine.data[...] = theirs.data
        alone.forward(bottom, top)
        top[0].diff[...] = net.top_vecs[i][0].diff
        alone.backward(top, [True], bottom)
        numpy.testing.assert_allclose(net.layers[i].blobs[0].diff, alone.blobs[0].diff, rtol=1e-10)
        numpy.testing.assert_allclose(net.layers[i].blobs[1].diff, alone.blobs[1].diff, rtol=1e-10)


@pytest.mark.parametrize("params,hw", [("kernel_size: 3 stride: 2", (7, 8)), ("kernel_size: 2 stride: 2", (6, 6)),
                                       ("kernel_size: 3 stride: 2 pad: 1", (6, 7)),
                                       ("kernel_size: 3 stride: 1", (5, 5))])
def test_max_pool_backward_routes_each_gradient_to_the_window_maximum(params, hw, cpu_impl):
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {params} }}')
    x = RNG.permutation(2 * 3 * hw[0] * hw[1]).reshape((2, 3) + hw).astype(numpy.float64)
    bottom, top = setup_layer(layer, [x], n_tops=2)
    layer.forward(bottom, top)
    dy = RNG.standard_normal(top[0].shape)
    top[0].diff[...] = dy
    layer.backward(top, [True, False], bottom)
    # reference: add each window's gradient at its mask position (Caffe's flat h * W + w)
    want = numpy.zeros_like(x).reshape(2, 3, -1)
    mask = top[1].data.astype(int).reshape(2, 3, -1)
    for n in range(2):
        for c in range(3):
            numpy.add.at(want[n, c], mask[n, c], dy[n, c].ravel())
    numpy.testing.assert_array_equal(bottom[0].diff, want.reshape(x.shape))


@pytest.mark.parametrize("dtype,decay", [(numpy.float32, 5e-4), (numpy.float64, 5e-4), (numpy.float32, 0.0)])
def test_fused_sgd_step_matches_regularize_then_sgd(dtype, decay):
    from brewnet.solver import updates

    n = updates.FUSED_BLOCK * 2 + 123  # several blocks and a ragged tail
    data = RNG.standard_normal(n).astype(dtype)
    diff = RNG.standard_normal(n).astype(dtype)
    v = RNG.standard_normal(n).astype(dtype)
    param = caffe_pb2.SolverParameter(momentum=0.9)
    want_diff, want_v = diff.copy(), v.copy()
    updates.regularize(want_diff, data, decay, "L2", numpy)
    updates.sgd(want_diff, [want_v], 0.01, param, 0, numpy)
    scratch = numpy.empty(updates.FUSED_BLOCK, numpy.float32)  # a float32 scratch must not be used for float64
    assert updates.sgd_l2_fused(diff, data, v, decay, 0.01, param.momentum, scratch)
    numpy.testing.assert_array_equal(v, want_v)
    numpy.testing.assert_array_equal(diff, want_diff)


@pytest.mark.parametrize("dtype,decay", [(numpy.float32, 5e-4), (numpy.float64, 5e-4), (numpy.float32, 0.0)])
def test_fused_sgd_step_with_apply_is_bit_identical(dtype, decay, cpu_impl):
    # the compiled sweep and the block-wise array code both reproduce regularize + sgd + data -= diff
    from brewnet.solver import updates

    n = updates.PARALLEL_MIN_ELEMENTS + 77  # split across the CPU threads too
    data = RNG.standard_normal(n).astype(dtype)
    diff = RNG.standard_normal(n).astype(dtype)
    v = RNG.standard_normal(n).astype(dtype)
    param = caffe_pb2.SolverParameter(momentum=0.9)
    want_data, want_diff, want_v = data.copy(), diff.copy(), v.copy()
    updates.regularize(want_diff, want_data, decay, "L2", numpy)
    updates.sgd(want_diff, [want_v], 0.01, param, 0, numpy)
    want_data -= want_diff
    assert updates.sgd_l2_fused(diff, data, v, decay, 0.01, param.momentum, apply=True)
    numpy.testing.assert_array_equal(v, want_v)
    numpy.testing.assert_array_equal(diff, want_diff)
    numpy.testing.assert_array_equal(data, want_data)


# -- convolution data gradient as a convolution of dy, cache-sized chunks ------------------------

@pytest.mark.parametrize("params,shape", [
    ("num_output: 3 kernel_size: 3 pad: 1", (2, 2, 5, 6)),
    ("num_output: 4 kernel_size: 3 group: 2", (3, 4, 5, 5)),  # no pad: a "full" convolution of dy
    ("num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 dilation: 2", (2, 2, 5, 6)),
])
@pytest.mark.parametrize("layout", ["A", "B"])
def test_conv_transposed_data_gradient_matches_direct(params, shape, layout, monkeypatch, cpu_impl):
    from brewnet.layers.kernels import conv_plan, im2col

    monkeypatch.setattr(im2col.ConvEngine, "force_layout", layout)
    monkeypatch.setattr(conv_plan.BaseConvPlan, "max_col_bytes", 1)  # chunks of one sample
    x = RNG.standard_normal(shape)
    grads = {}
    for path in ("direct", "transposed"):
        monkeypatch.setattr(conv_plan.ConvPlan, "force_data_grad", path)
        layer = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {params} '
                           'weight_filler { type: "gaussian" std: 0.5 } }', dtype=numpy.float64)
        bottom, top = setup_layer(layer, [x])
        assert (layer.plan.data_path == "transposed") == (path == "transposed")
        layer.forward(bottom, top)
        top[0].diff[...] = numpy.random.default_rng(4).standard_normal(top[0].shape)
        layer.backward(top, [True], bottom)
        grads[path] = (bottom[0].diff.copy(), layer.blobs[0].diff.copy())
    for a, b in zip(grads["direct"], grads["transposed"]):
        numpy.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_conv_transposed_data_gradient_passes_gradcheck(monkeypatch):
    from brewnet.layers.kernels.conv_plan import ConvPlan

    monkeypatch.setattr(ConvPlan, "force_data_grad", "transposed")
    layer = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 pad: 1 '
                       'group: 2 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }')
    check_gradient(layer, [RNG.standard_normal((2, 4, 4, 5))])


@pytest.mark.parametrize("params,shape", [
    ("num_output: 5 kernel_size: 3 pad: 1", (4, 2, 6, 7)),             # a first layer's few rows
    ("num_output: 3 kernel_size: 2 stride: 2 bias_term: false", (3, 3, 8, 8)),
])
@pytest.mark.parametrize("chunked", [False, True])
def test_conv_per_sample_gemms_match_the_batched_gemm(params, shape, chunked, monkeypatch, cpu_impl):
    from brewnet.layers.kernels import conv_plan, im2col, parallel

    monkeypatch.setattr(im2col.ConvEngine, "force_layout", "B")
    monkeypatch.setattr(conv_plan.ConvPlan, "use_winograd", False)
    if chunked:  # chunks of one sample: backward rebuilds the columns
        monkeypatch.setattr(conv_plan.BaseConvPlan, "max_col_bytes", 1)
    else:  # one thread, one chunk: backward reuses forward's columns (above their row of ones)
        monkeypatch.setattr(parallel, "workers", lambda xp=numpy: 1)
    x = RNG.standard_normal(shape)
    results = {}
    for per_sample in (False, True):
        rows = 10 ** 6 if per_sample else 0
        monkeypatch.setattr(conv_plan.ConvPlan, "per_sample_max_rows", rows)
        layer = make_layer(f'name: "c" type: "Convolution" convolution_param {{ {params} '
                           'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }',
                           dtype=numpy.float64)
        bottom, top = setup_layer(layer, [x])
        for i, blob in enumerate(layer.blobs):  # the same parameters both times
            blob.data[...] = numpy.random.default_rng(i).standard_normal(blob.shape)
        assert layer.plan.per_sample == per_sample
        assert len(layer.plan.chunks) == (shape[0] if chunked else 1)
        layer.forward(bottom, top)
        top[0].diff[...] = numpy.random.default_rng(5).standard_normal(top[0].shape)
        layer.backward(top, [True], bottom)
        results[per_sample] = [top[0].data.copy(), bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs]
    for a, b in zip(results[False], results[True]):
        numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_conv_per_sample_gemms_pass_gradcheck(monkeypatch):
    from brewnet.layers.kernels import conv_plan, im2col

    monkeypatch.setattr(im2col.ConvEngine, "force_layout", "B")
    monkeypatch.setattr(conv_plan.ConvPlan, "use_winograd", False)
    layer = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 pad: 1 '
                       'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }')
    check_gradient(layer, [RNG.standard_normal((2, 2, 4, 5))])


@pytest.mark.parametrize("C,M,S,pad,want", [
    (16, 64, 55, 1, "direct"),       # few input channels from many outputs: the direct GEMM's deep sum
    (32, 32, 149, 0, "transposed"),  # as many outputs as inputs
])
def test_conv_data_gradient_path_choice(C, M, S, pad, want, monkeypatch):
    from brewnet.layers.kernels.conv_plan import ConvGeometry, ConvPlan

    monkeypatch.setattr(ConvPlan, "use_winograd", False)
    O = S + 2 * pad - 2
    plan = ConvPlan(numpy, ConvGeometry(numpy.dtype(numpy.float32), 8, C, (S, S), M, (O, O), 1, (3, 3), (1, 1),
                                        (pad, pad), (1, 1)))
    assert plan.data_path == want


def test_conv_engine_chunk_rule():
    from brewnet.layers.kernels.conv_plan import ConvPlan, DeconvPlan
    from brewnet.layers.kernels.im2col import ConvEngine

    def engine(M):
        return ConvEngine(numpy, numpy.float32, 32, (16, 16), M, 1, (5, 5), (1, 1), (2, 2), (1, 1), (16, 16))

    per_sample = 32 * 25 * 256 * 4
    # few output channels: memory-bound GEMMs, cache-sized chunks; many: one big GEMM
    assert ConvPlan.chunk_samples(engine(32)) == ConvPlan.cache_col_bytes // per_sample
    assert ConvPlan.chunk_samples(engine(256)) == ConvPlan.max_col_bytes // per_sample
    assert DeconvPlan.chunk_samples(engine(32)) == ConvPlan.max_col_bytes // per_sample  # Deconvolution's engines
    # the data-gradient engine of a "same" convolution is a convolution of the same geometry
    t = engine(32).transposed()
    assert (t.C, t.M, t.S, t.O, t.p, ConvPlan.chunk_samples(t)) == (32, 32, (16, 16), (16, 16), (2, 2),
                                                                    ConvPlan.chunk_samples(engine(32)))
    strided = ConvEngine(numpy, numpy.float32, 8, (9, 9), 8, 1, (3, 3), (2, 2), (1, 1), (1, 1), (5, 5))
    assert strided.transposed() is None


@pytest.mark.parametrize("threads,n,chunk,want", [
    (1, 100, 3, [3] * 33 + [1]),          # cache-sized chunks, one thread
    (2, 64, 24, [16, 16, 16, 16]),         # 3 chunks rounded up to 2 rounds of 2 threads, equal sizes
    (2, 10, 1000, [5, 5]),                 # at least one chunk per thread
    (2, 1, 1000, [1]),
])
def test_conv_chunks_are_equal_rounds_for_the_threads(threads, n, chunk, want, monkeypatch):
    from brewnet.layers.kernels import parallel
    from brewnet.layers.kernels.conv_plan import ConvGeometry, ConvPlan

    monkeypatch.setattr(parallel, "workers", lambda xp=numpy: threads)
    monkeypatch.setattr(ConvPlan, "chunk_samples", classmethod(lambda cls, engine: chunk))
    plan = ConvPlan(numpy, ConvGeometry(numpy.dtype(numpy.float32), n, 4, (6, 6), 4, (6, 6), 1, (3, 3), (1, 1),
                                        (1, 1), (1, 1)))
    assert plan.path == "im2col"
    chunks = plan.chunks
    assert [b - a for a, b in chunks] == want
    assert chunks[0][0] == 0 and chunks[-1][1] == n and all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))


# -- max pooling argmax: one byte per index for small windows -------------------------------------

@pytest.mark.parametrize("params,hw", [("kernel_size: 3 stride: 2", (9, 8)),
                                       ("kernel_size: 3 stride: 1 pad: 1", (5, 6)),
                                       ("global_pooling: true", (17, 17))])  # 289 offsets: int32 indices
def test_max_pool_mask_is_the_first_maximum_with_ties(params, hw, cpu_impl):
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: MAX {params} }}', dtype=numpy.float32)
    x = RNG.integers(-2, 3, size=(2, 3) + hw).astype(numpy.float32)  # many ties
    bottom, top = setup_layer(layer, [x], n_tops=2, dtype=numpy.float32)
    layer.forward(bottom, top)
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel, layer.stride, layer.pad
    want = numpy.empty(top[1].shape, dtype=numpy.int64)
    H, W = hw
    for i in range(want.shape[2]):
        for j in range(want.shape[3]):
            h0, w0 = i * sh - ph, j * sw - pw
            rows = range(max(h0, 0), min(h0 + kh, H))
            cols = range(max(w0, 0), min(w0 + kw, W))
            cand = [(r, c) for r in rows for c in cols]  # row-major: the first maximum wins
            for n in range(2):
                for ch in range(3):
                    vals = [x[n, ch, r, c] for r, c in cand]
                    r, c = cand[int(numpy.argmax(vals))]
                    want[n, ch, i, j] = r * W + c
    numpy.testing.assert_array_equal(top[1].data, want)
    assert layer._core.argmax().dtype == (numpy.int32 if "global" in params else numpy.uint8)


def test_lazily_cleared_diff_reads_as_zeros_and_is_overwritten_once():
    from brewnet.layers.blob import Blob

    b = Blob((3, 4), dtype=numpy.float64)
    b.diff[...] = 5
    b.clear_diff()
    assert (b.diff == 0).all()
    b.diff[...] = 5
    b.clear_diff()
    diff, zero = b.diff_to_overwrite()
    assert zero
    diff[...] = 2  # the caller writes every element
    b.add_to_diff(numpy.ones((3, 4)))  # no longer known zero: adds
    assert (b.diff == 3).all()
    b.clear_diff()
    b.add_to_diff(numpy.full((3, 4), 7.0))
    assert (b.diff == 7).all()
    assert Blob((2,)).diff_to_overwrite()[1]  # a diff never allocated is zeros too


SHARED_IPS = """
name: "shared"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "target" type: "Input" top: "target" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "h"
  param { name: "w" } inner_product_param { num_output: 6 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
  param { name: "w" } inner_product_param { num_output: 6 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }
"""


def test_shared_weight_gradient_after_lazy_clear_sums_both_layers_and_accumulates():
    """ip1 and ip2 share one weight: the first to run backward writes over the cleared diff, the
    second adds; a second backward without clearing adds again (iter_size > 1)."""
    net = Net(text_format.Parse(SHARED_IPS, caffe_pb2.NetParameter()), phase=caffe_pb2.TRAIN,
              dtype=numpy.float64, rng=0)
    net.blobs["data"].data[...] = RNG.standard_normal((4, 6))
    net.blobs["target"].data[...] = RNG.standard_normal((4, 6))
    w = net.layers[net.layer_names.index("ip1")].blobs[0]
    w.diff[...] = 123.0  # stale values the clear must hide
    net.clear_param_diffs()
    net.forward()
    net.backward()
    once = w.diff.copy()
    # the same gradient by hand: d loss / d w through both uses
    x = net.blobs["data"].data
    h = net.blobs["h"].data
    dout = (net.blobs["out"].data - net.blobs["target"].data) / 4
    dh = dout @ w.data
    numpy.testing.assert_allclose(once, dout.T @ h + dh.T @ x, rtol=1e-10)
    net.forward()
    net.backward()
    numpy.testing.assert_allclose(w.diff, 2 * once, rtol=1e-10)
