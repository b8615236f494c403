"""Depthwise convolution (layers/kernels/depthwise.py): the kernel (compiled and array code)
against grouped im2col, through the Convolution layer and on its own, float64 gradient checks,
and the 1x1 path's strided and column-split jobs."""

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.layers.kernels import depthwise, parallel
from brewnet.layers.kernels.conv_plan import ConvPlan

RNG = numpy.random.default_rng(19)

# (convolution_param, bottom shape): multipliers 1 and 2, strides, padding, dilation, 1xk kernels
CASES = [
    ("num_output: 3 group: 3 kernel_size: 3 pad: 1", (2, 3, 6, 7)),
    ("num_output: 4 group: 4 kernel_size: 3 pad: 1 stride: 2", (2, 4, 7, 6)),
    ("num_output: 6 group: 3 kernel_size: 3 pad: 2 dilation: 2 bias_term: false", (1, 3, 6, 6)),
    ("num_output: 4 group: 2 kernel_h: 1 kernel_w: 3 pad_h: 0 pad_w: 1 stride_h: 1 stride_w: 2", (2, 2, 5, 6)),
    ("num_output: 2 group: 2 kernel_size: 5 stride: 3", (1, 2, 9, 8)),
    # an asymmetric kernel and padding; a plane whose wide rows span several blocks of the
    # weight gradient's lanes (70 rows x 62 padded columns > depthwise_jit.LANE_BLOCK)
    ("num_output: 4 group: 2 kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 2", (2, 2, 5, 6)),
    ("num_output: 2 group: 2 kernel_h: 3 kernel_w: 1 pad_h: 1", (1, 2, 70, 62)),
    # stride 1: a channel multiplier with a kernel taller than the plane, and a 1x5 kernel
    # wider than a 2-column plane (every tap reaches into the zero border)
    ("num_output: 6 group: 3 kernel_size: 5 pad: 2", (2, 3, 4, 9)),
    ("num_output: 2 group: 2 kernel_h: 1 kernel_w: 5 pad_h: 0 pad_w: 2", (1, 2, 3, 2)),
]


def _layer(params, dtype=numpy.float64):
    return make_layer(f'name: "dw" type: "Convolution" convolution_param {{ {params} '
                      'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } }',
                      dtype=dtype)


def _run(params, x, dy, use_depthwise, monkeypatch, dtype=numpy.float64):
    monkeypatch.setattr(ConvPlan, "use_depthwise", use_depthwise)
    layer = _layer(params, dtype)
    bottom, top = setup_layer(layer, [x.astype(dtype)])
    assert (layer.plan.path == "depthwise") == use_depthwise
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    diffs = [b.diff.copy() for b in layer.blobs]
    return [top[0].data.copy(), bottom[0].diff.copy()] + diffs


@pytest.mark.parametrize("params,shape", CASES)
def test_depthwise_matches_grouped_im2col(params, shape, monkeypatch, cpu_impl):
    x = RNG.standard_normal(shape)
    probe = _layer(params)
    _, top = setup_layer(probe, [x])
    dy = RNG.standard_normal(top[0].shape)
    want = _run(params, x, dy, False, monkeypatch)
    got = _run(params, x, dy, True, monkeypatch)
    for a, b in zip(got, want):
        numpy.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
    # float32: the same to float tolerance
    got32 = _run(params, x, dy, True, monkeypatch, numpy.float32)
    for a, b in zip(got32, want):
        numpy.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * numpy.abs(b).max())


@pytest.mark.parametrize("params,shape", CASES[:4] + CASES[-2:])
def test_depthwise_layer_passes_gradcheck(params, shape, monkeypatch, cpu_impl):
    layer = _layer(params)
    setup_layer(layer, [numpy.zeros(shape)])
    assert layer.plan.path == "depthwise"
    check_gradient(_layer(params), [RNG.standard_normal(shape)])


def test_functions_on_their_own_and_split_over_threads(monkeypatch, cpu_impl):
    # the public functions (DepthwiseConvolution layers may call them directly), channels in many jobs
    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: 3)
    x = RNG.standard_normal((2, 5, 7, 7))
    w = RNG.standard_normal((10, 1, 3, 3))
    b = RNG.standard_normal(10)
    y = depthwise.depthwise_forward(x, w, b, (2, 1), 1, 1)
    assert y.shape == depthwise.output_shape(x.shape, w.shape, (2, 1), 1, 1) == (2, 10, 4, 7)
    plan_layer = _layer("num_output: 10 group: 5 kernel_size: 3 pad: 1 stride_h: 2 stride_w: 1")
    bottom, top = setup_layer(plan_layer, [x])
    plan_layer.blobs[0].data[...], plan_layer.blobs[1].data[...] = w, b
    monkeypatch.setattr(ConvPlan, "use_depthwise", False)
    reference = _layer("num_output: 10 group: 5 kernel_size: 3 pad: 1 stride_h: 2 stride_w: 1")
    rb, rt = setup_layer(reference, [x])
    reference.blobs[0].data[...], reference.blobs[1].data[...] = w, b
    reference.forward(rb, rt)
    numpy.testing.assert_allclose(y, rt[0].data, rtol=1e-11, atol=1e-11)
    dy = RNG.standard_normal(y.shape)
    rt[0].diff[...] = dy
    reference.backward(rt, [True], rb)
    dx = numpy.empty_like(x)
    dW = depthwise.depthwise_backward(x, w, dy, (2, 1), 1, 1, dx=dx)
    numpy.testing.assert_allclose(dx, rb[0].diff, rtol=1e-11, atol=1e-11)
    numpy.testing.assert_allclose(dW, reference.blobs[0].diff, rtol=1e-11, atol=1e-11)
    assert depthwise.depthwise_backward(x, w, dy, (2, 1), 1, 1, dx=None, need_dw=False) is None


@pytest.mark.parametrize("sizes", [((6, 5), (6, 6), (6, 5)), ((5, 6), (6, 6), (5, 6))])
def test_planes_of_nearby_sizes_keep_their_zero_borders(sizes, cpu_impl):
    # at stride 2, widths (or heights) 5 and 6 (pad 1) make phase planes of the same shape: the
    # larger one's last image column (row) must not stay behind as the smaller one's border
    w = RNG.standard_normal((3, 1, 3, 3))
    for hw in sizes:
        x = RNG.standard_normal((2, 3) + hw)
        y = depthwise.depthwise_forward(x, w, None, 2, 1, 1)
        want = depthwise._forward_array(numpy, x, w, None, (2, 2), (1, 1), (1, 1), numpy.empty_like(y))
        numpy.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        dx = numpy.empty_like(x)
        dW = depthwise.depthwise_backward(x, w, y, 2, 1, 1, dx=dx)
        want_dx = numpy.empty_like(x)
        want_dW = depthwise._backward_array(numpy, x, w, y, (2, 2), (1, 1), (1, 1), want_dx, True)
        numpy.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
        numpy.testing.assert_allclose(dW, want_dW, rtol=1e-12, atol=1e-12)


def test_depthwise_rejects_weights_of_another_shape():
    with pytest.raises(ValueError, match="depthwise weights"):
        depthwise.depthwise_forward(numpy.zeros((1, 3, 4, 4)), numpy.zeros((4, 1, 3, 3)), None, 1, 1, 1)


@pytest.mark.parametrize("params,shape", [
    ("num_output: 6 kernel_size: 1 stride: 2", (2, 4, 7, 6)),
    ("num_output: 6 kernel_size: 1 stride_h: 1 stride_w: 3 group: 2", (2, 4, 5, 7)),
    ("num_output: 5 kernel_size: 1", (1, 3, 40, 40)),  # one sample: its columns split into jobs
])
def test_pointwise_paths_match_im2col_and_gradcheck(params, shape, monkeypatch):
    monkeypatch.setattr(ConvPlan, "pointwise_min_columns", 100)
    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: 4 if big else 1)
    x = RNG.standard_normal(shape)
    layer = _layer(params)
    bottom, top = setup_layer(layer, [x])
    assert layer.plan.path == "1x1"
    if shape[0] == 1:
        assert len(layer.plan.pointwise_jobs) > 1
    layer.forward(bottom, top)
    dy = RNG.standard_normal(top[0].shape)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    # the same layer as a 1x1 kernel with an explicit (zero) pad: the im2col path, cropped
    W, b = layer.blobs[0].data, layer.blobs[1].data
    stride = layer.stride
    xs = x[:, :, ::stride[0], ::stride[1]]
    G = layer.group
    xg = xs.reshape(x.shape[0], G, x.shape[1] // G, -1)
    want = numpy.einsum("gmc,ngcl->ngml", W.reshape(G, -1, x.shape[1] // G), xg).reshape(top[0].shape)
    want += b.reshape(1, -1, 1, 1)
    numpy.testing.assert_allclose(top[0].data, want, rtol=1e-11, atol=1e-11)
    dyg = dy.reshape(x.shape[0], G, -1, xg.shape[-1])
    numpy.testing.assert_allclose(layer.blobs[0].diff.reshape(G, -1, x.shape[1] // G),
                                  numpy.einsum("ngml,ngcl->gmc", dyg, xg), rtol=1e-11, atol=1e-11)
    dx_want = numpy.zeros_like(x)
    dx_want[:, :, ::stride[0], ::stride[1]] = numpy.einsum(
        "gmc,ngml->ngcl", W.reshape(G, -1, x.shape[1] // G), dyg).reshape(xs.shape)
    numpy.testing.assert_allclose(bottom[0].diff, dx_want, rtol=1e-11, atol=1e-11)
    check_gradient(_layer(params), [x[:1, :, :8, :8] if shape[0] == 1 else x])


# the whole batch in one GEMM / chunks gathered for one GEMM each / a GEMM per sample
@pytest.mark.parametrize("whole_max,gather_max", [(512, 1024), (0, 1024), (0, 0)])
# (more outputs than inputs per group, and fewer: the per-sample GEMMs then compute dW^T)
@pytest.mark.parametrize("params", ["num_output: 6 kernel_size: 1 stride: 2 group: 2", "num_output: 5 kernel_size: 1",
                                    "num_output: 2 kernel_size: 1 stride: 2 group: 2", "num_output: 3 kernel_size: 1"])
def test_pointwise_weight_gradient_over_chunks_of_samples(params, whole_max, gather_max, monkeypatch):
    monkeypatch.setattr(ConvPlan, "pointwise_whole_batch_columns", whole_max)
    monkeypatch.setattr(ConvPlan, "pointwise_gather_max_columns", gather_max)
    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: 2 if big else 1)
    x = RNG.standard_normal((6, 4, 5, 7))
    layer = _layer(params)
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    top[0].diff[...] = RNG.standard_normal(top[0].shape)
    layer.backward(top, [False], bottom)
    stride, G = layer.stride, layer.group
    xg = x[:, :, ::stride[0], ::stride[1]].reshape(6, G, 4 // G, -1)
    dyg = top[0].diff.reshape(6, G, -1, xg.shape[-1])
    numpy.testing.assert_allclose(layer.blobs[0].diff.reshape(G, -1, 4 // G),
                                  numpy.einsum("ngml,ngcl->gmc", dyg, xg), rtol=1e-11, atol=1e-11)
