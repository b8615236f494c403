"""Winograd convolution (layers/kernels/winograd.py): the transforms, and the Convolution layer's
results and gradients with it against im2col's."""

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.layers.kernels import cpu_kernels, parallel, winograd
from brewnet.layers.kernels.conv_plan import ConvGeometry, ConvPlan

RNG = numpy.random.default_rng(11)


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    if cpu_kernels.kernels() is None:
        pytest.skip("numba is not installed: Winograd needs the compiled transforms")
    # the small shapes here have few tiles for their channels: Winograd all the same
    monkeypatch.setattr(ConvPlan, "winograd_max_filters_per_tile", None)
    with cpu_kernels.enabled_for_test():
        yield


@pytest.mark.parametrize("batch,path", [(1, "im2col"), (4, "winograd")])
def test_few_tiles_for_many_filters_take_im2col(batch, path, monkeypatch):
    # 8x8 outputs are 4 tiles a sample: 64 filters want 16 tiles of the batch (as ResNet's res5's
    # 7x7 at batch 8)
    monkeypatch.setattr(ConvPlan, "winograd_max_filters_per_tile", 4)
    layer = make_layer(_conv_prototxt(64, 3, 1))
    setup_layer(layer, [numpy.zeros((batch, 16, 8, 8), numpy.float32)])
    assert layer.plan.path == path


@pytest.mark.parametrize("m,r", [(4, 3), (4, 5), (3, 4), (5, 4), (2, 3)])
def test_transform_matrices_compute_a_correlation(m, r):
    AT, G, BT = winograd.transform_matrices(m, r)
    assert AT.shape == (m, m + r - 1) and G.shape == (m + r - 1, r) and BT.shape == (m + r - 1,) * 2
    for _ in range(5):
        g, d = RNG.standard_normal(r), RNG.standard_normal(m + r - 1)
        want = [sum(g[k] * d[i + k] for k in range(r)) for i in range(m)]
        numpy.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), want, rtol=1e-12, atol=1e-12)


def _conv_prototxt(num_output, kernel, pad, group=1, bias=True):
    pads = f"pad: {pad}" if isinstance(pad, int) else f"pad_h: {pad[0]} pad_w: {pad[1]}"
    return (f'name: "c" type: "Convolution" convolution_param {{ num_output: {num_output} '
            f'kernel_size: {kernel} {pads} group: {group} bias_term: {str(bias).lower()} '
            'weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 1 } }')


def _run(prototxt, x, dy, dtype, winograd_on, monkeypatch):
    """Forward and backward of a fresh layer (same seed: same weights): (y, dx, dW, db, layer)."""
    monkeypatch.setattr(ConvPlan, "use_winograd", winograd_on)
    layer = make_layer(prototxt, dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    layer.forward(bottom, top)
    for p in layer.blobs:
        p.diff[...] = 0
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    grads = [p.diff.copy() for p in layer.blobs]
    return top[0].data.copy(), bottom[0].diff.copy(), grads, layer


CASES = [
    # (batch, channels, spatial, num_output, kernel, pad, group): CIFAR-10-quick's conv2 and conv3,
    # a grouped 3x3, LeNet's unpadded conv2, odd and non-square sizes and pads
    (7, 32, (16, 16), 32, 5, 2, 1),
    (3, 32, (8, 8), 64, 5, 2, 1),
    (2, 64, (16, 16), 64, 3, 1, 2),
    (5, 20, (12, 12), 50, 5, 0, 1),
    (2, 16, (10, 14), 16, 5, (1, 3), 1),
    (3, 16, (10, 11), 24, 3, (0, 1), 1),
]


@pytest.mark.parametrize("dtype,rtol", [(numpy.float64, 1e-11), (numpy.float32, 1e-4)])
@pytest.mark.parametrize("n,C,S,M,k,pad,group", CASES)
def test_winograd_matches_im2col(n, C, S, M, k, pad, group, dtype, rtol, monkeypatch):
    x = RNG.standard_normal((n, C) + S).astype(dtype)
    pads = (pad, pad) if isinstance(pad, int) else pad
    O = tuple(s + 2 * p - k + 1 for s, p in zip(S, pads))
    dy = RNG.standard_normal((n, M) + O).astype(dtype)
    proto = _conv_prototxt(M, k, pad, group)
    *wino, layer = _run(proto, x, dy, dtype, True, monkeypatch)
    assert layer.plan.path == "winograd", "Winograd should apply to this shape"
    assert (layer.plan.data_path != "winograd") == any(k - 1 - p > p for p in pads)
    *ref, ref_layer = _run(proto, x, dy, dtype, False, monkeypatch)
    assert ref_layer.plan.path != "winograd"
    y, dx, (dW, db) = wino
    y_ref, dx_ref, (dW_ref, db_ref) = ref
    for got, want in ((y, y_ref), (dx, dx_ref), (dW, dW_ref), (db, db_ref)):
        assert got.dtype == dtype
        # float32: the transforms' rounding, relative to the result's scale
        numpy.testing.assert_allclose(got, want, rtol=0, atol=rtol * numpy.abs(want).max())


@pytest.mark.parametrize("pad", [2, 0])  # the unpadded one takes im2col's data gradient
def test_winograd_weight_gradient_sums_over_bottoms(pad, monkeypatch):
    """Two bottoms share the weights: each adds its own weight gradient, as on im2col's path."""
    proto = _conv_prototxt(16, 5, pad)
    x = [RNG.standard_normal((3, 16, 8, 8)) for _ in range(2)]
    O = 8 + 2 * pad - 4
    dy = [RNG.standard_normal((3, 16, O, O)) for _ in range(2)]
    results = []
    for winograd_on in (True, False):
        monkeypatch.setattr(ConvPlan, "use_winograd", winograd_on)
        layer = make_layer(proto)
        bottom, top = setup_layer(layer, x, n_tops=2)
        assert (layer.plan.path == "winograd") == winograd_on
        layer.forward(bottom, top)
        for t, d in zip(top, dy):
            t.diff[...] = d
        layer.backward(top, [True, True], bottom)
        results.append([p.diff.copy() for p in layer.blobs] + [b.diff.copy() for b in bottom])
    for got, want in zip(*results):
        numpy.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * numpy.abs(want).max())

def test_winograd_gradient_float64():
    layer = make_layer(_conv_prototxt(16, 3, 1))
    x = RNG.standard_normal((2, 16, 8, 7))
    bottom, _ = setup_layer(layer, [x])
    assert layer.plan.path == "winograd"
    check_gradient(layer, [x])


def test_winograd_without_bias_and_repeatable(monkeypatch):
    proto = _conv_prototxt(32, 5, 2, bias=False)
    x = RNG.standard_normal((9, 32, 8, 8)).astype(numpy.float32)
    dy = RNG.standard_normal((9, 32, 8, 8)).astype(numpy.float32)
    first = _run(proto, x, dy, numpy.float32, True, monkeypatch)
    second = _run(proto, x, dy, numpy.float32, True, monkeypatch)
    assert len(first[2]) == 1
    for a, b in zip(first[:2] + tuple(first[2]), second[:2] + tuple(second[2])):
        numpy.testing.assert_array_equal(a, b)  # partial sums in chunk order: the same floats


def test_winograd_same_result_on_one_or_two_threads(monkeypatch):
    proto = _conv_prototxt(32, 5, 2)
    x = RNG.standard_normal((12, 32, 16, 16)).astype(numpy.float32)
    dy = RNG.standard_normal((12, 32, 16, 16)).astype(numpy.float32)
    before = parallel.thread_count()
    try:
        runs = []
        for threads in (1, 2):
            parallel.set_thread_count(threads)
            runs.append(_run(proto, x, dy, numpy.float32, True, monkeypatch))
    finally:
        parallel.set_thread_count(before)
    (y1, dx1, g1, _), (y2, dx2, g2, _) = runs
    numpy.testing.assert_array_equal(y1, y2)  # forward and dx: each output from one chunk
    numpy.testing.assert_array_equal(dx1, dx2)
    # dW: partial sums grouped by chunk, and chunks depend on the thread count
    numpy.testing.assert_allclose(g1[0], g2[0], rtol=0, atol=1e-4 * numpy.abs(g1[0]).max())


def _plan(C=32, M=32, kernel=(5, 5), stride=(1, 1), pad=(2, 2), dilation=(1, 1), S=(16, 16), group=1,
          dtype=numpy.float32):
    O = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(S, pad, dilation, kernel, stride))
    return winograd.plan(numpy, dtype, C, S, M, group, kernel, stride, pad, dilation, O)[0]


@pytest.mark.parametrize("C,M,k,S,want", [
    (32, 64, 3, 147, "im2col"),    # Inception-v3's stem: im2col's per-sample GEMMs over long rows
    (16, 64, 3, 55, "im2col"),     # SqueezeNet's fire2
    (32, 64, 5, 147, "winograd"),  # 5x5: Winograd saves 6x the multiplications
    (80, 192, 3, 73, "winograd"),  # wider
    (32, 64, 3, 56, "winograd"),   # channels-last columns
])
def test_thin_3x3_layers_keep_im2col_where_it_runs_per_sample(C, M, k, S, want):
    p = k // 2
    plan = ConvPlan(numpy, ConvGeometry(numpy.dtype(numpy.float32), 8, C, (S, S), M, (S, S), 1, (k, k), (1, 1),
                                        (p, p), (1, 1)))
    assert plan.path == want


def test_winograd_applies_only_where_it_pays_and_is_exact(monkeypatch):
    assert _plan() is not None and _plan(kernel=(3, 3), pad=(1, 1)) is not None
    # an unpadded 5x5 (LeNet's conv2): Winograd forward and weight gradient, im2col's data gradient
    O = (8, 8)
    forward, data = winograd.plan(numpy, numpy.float32, 20, (12, 12), 50, 1, (5, 5), (1, 1), (0, 0), (1, 1), O)
    assert forward is not None and data is None
    assert _plan(stride=(2, 2)) is None
    assert _plan(dilation=(2, 2)) is None
    assert _plan(kernel=(7, 7), pad=(3, 3)) is None
    assert _plan(kernel=(3, 5), pad=(1, 2)) is None
    assert _plan(pad=(5, 5)) is None  # pad >= kernel: dx would need a negative pad
    assert _plan(C=3) is None and _plan(M=8) is None  # CIFAR-10's first layer stays on im2col
    assert _plan(C=64, M=64, group=8) is None  # 8 channels per group
    assert _plan(dtype=numpy.float16) is None
    # CaffeNet's 13x13 layers: 16x16 outputs computed for 169 (a third thrown away)
    assert _plan(C=256, M=384, kernel=(3, 3), pad=(1, 1), S=(13, 13)) is None
    # ... and 14x14 ones (16x16 computed, 77%: ResNet-50's res4)
    assert _plan(kernel=(3, 3), pad=(1, 1), S=(14, 14)) is None
    assert _plan(kernel=(3, 3), pad=(1, 1), S=(18, 18)) is not None
    with cpu_kernels.disabled():
        assert _plan() is None  # the array-code path (and so cupy) keeps im2col
    monkeypatch.setenv("BREWNET_WINOGRAD", "0")
    assert _plan() is None


@pytest.mark.parametrize("C,H,W,rows,cols,offset", [
    (3, 5, 7, 9, 11, (2, 2)),     # fewer channels than one block of 16
    (20, 6, 6, 8, 10, (1, 3)),    # a block and a remainder, asymmetric offset
    (40, 4, 9, 4, 12, (0, 0)),    # no border rows (the output diff's case), columns to spare
])
def test_phase_image_is_the_zero_bordered_channels_last_image(C, H, W, rows, cols, offset):
    m = winograd.TILE_OUT
    Q = -(-cols // m)
    x = RNG.standard_normal((2, C, H, W)).astype(numpy.float32)
    want = numpy.zeros((2, rows, m * Q, C), numpy.float32)
    want[:, offset[0]:offset[0] + H, offset[1]:offset[1] + W] = x.transpose(0, 2, 3, 1)
    # column v stored at (v % m, v // m)
    want = want.reshape(2, rows, Q, m, C).transpose(0, 1, 3, 2, 4)
    got = numpy.full((2, rows, m, Q, C), numpy.nan, numpy.float32)
    cpu_kernels.kernels().phase_image(x, got, offset[0], offset[1])
    numpy.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("M,H,W", [(20, 7, 9), (16, 8, 8), (3, 5, 4)])
def test_tiles_to_image_crops_transposes_and_adds_the_bias(M, H, W):
    m, n = winograd.TILE_OUT, 2
    th, tw = -(-H // m), -(-W // m)
    tiles = RNG.standard_normal((m * m, n * th * tw, M)).astype(numpy.float32)
    bias = RNG.standard_normal(M).astype(numpy.float32)
    # tile element (i, j) of tile (s, r, t) is output (r * m + i, t * m + j) of sample s
    full = tiles.reshape(m, m, n, th, tw, M).transpose(2, 5, 3, 0, 4, 1).reshape(n, M, th * m, tw * m)
    want = full[:, :, :H, :W] + bias[:, None, None]
    got = numpy.full((n, M, H, W), numpy.nan, numpy.float32)
    cpu_kernels.kernels().tiles_to_image(tiles, got, m, th, tw, bias)
    numpy.testing.assert_array_equal(got, want)
