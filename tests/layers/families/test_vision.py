"""Vision layers: shapes, values against naive references, and float64 gradient checks of
every implementation variant (column layouts, compiled and array code); the plain
gradient cases of these types are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.layers.kernels import im2col as im2col_mod
from brewnet.layers.kernels.conv_plan import BaseConvPlan
from brewnet.netdef import DefinitionError, caffe_pb2

RNG = numpy.random.default_rng(7)


def _conv(params, type_="Convolution"):
    return make_layer(
        f'name: "c" type: "{type_}" convolution_param {{ {params} '
        'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } }')


def _naive_conv(x, W, b, stride, pad, dil, group):
    """Direct loops over kernel offsets (reference only)."""
    n, C, H, Wd = x.shape
    M, Cg, kh, kw = W.shape
    xp_ = numpy.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    Ho = (H + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (Wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = numpy.zeros((n, M, Ho, Wo))
    Mg = M // group
    for m in range(M):
        g = m // Mg
        for i in range(kh):
            for j in range(kw):
                patch = xp_[:, g * Cg:(g + 1) * Cg, i * dil[0]:i * dil[0] + stride[0] * (Ho - 1) + 1:stride[0],
                            j * dil[1]:j * dil[1] + stride[1] * (Wo - 1) + 1:stride[1]]
                y[:, m] += numpy.einsum("nchw,c->nhw", patch, W[m, :, i, j])
        if b is not None:
            y[:, m] += b[m]
    return y


CONV_CASES = [
    ("num_output: 3 kernel_size: 3", (2, 2, 5, 5)),
    ("num_output: 4 kernel_size: 3 group: 2 pad: 1 stride: 2", (2, 4, 5, 5)),
    ("num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2 stride_h: 2 stride_w: 1 bias_term: false", (1, 2, 5, 6)),
    ("num_output: 2 kernel_size: 2 dilation: 2 pad: 1", (2, 2, 5, 5)),
    ("num_output: 4 kernel_size: 1 group: 2", (2, 4, 3, 3)),
    ("num_output: 3 kernel_size: 1 stride: 2", (2, 2, 4, 4)),
]


@pytest.fixture(params=["A", "B"])
def layout(request, monkeypatch):
    """Run conv tests under both column layouts, with chunking over the batch forced."""
    monkeypatch.setattr(im2col_mod.ConvEngine, "force_layout", request.param)
    monkeypatch.setattr(BaseConvPlan, "max_col_bytes", 1)
    return request.param


@pytest.mark.parametrize("params,shape", CONV_CASES)
def test_conv_matches_naive_and_gradient(params, shape, layout, cpu_impl):
    layer = _conv(params)
    x = RNG.standard_normal(shape)
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    W = layer.blobs[0].data
    b = layer.blobs[1].data if layer.bias_term else None
    ref = _naive_conv(x, W, b, layer.stride, layer.pad, layer.dilation, layer.group)
    numpy.testing.assert_allclose(top[0].data, ref, rtol=1e-10, atol=1e-10)
    check_gradient(_conv(params), [x])


def test_conv_param_count_and_shapes():
    layer = _conv("num_output: 6 kernel_size: 3 group: 3 bias_term: false")
    bottom, top = setup_layer(layer, [numpy.zeros((2, 3, 7, 9))])
    assert [b.shape for b in layer.blobs] == [(6, 1, 3, 3)]
    assert top[0].shape == (2, 6, 5, 7)


def test_conv_two_bottoms_share_weights():
    layer = _conv("num_output: 2 kernel_size: 2")
    a, b = RNG.standard_normal((2, 2, 3, 3)), RNG.standard_normal((2, 2, 3, 3))
    check_gradient(layer, [a, b], n_tops=2)


def test_conv_3d_and_axis():
    # N-d: two spatial axes after axis 2 of a 5-axis blob, and three spatial axes after axis 1
    layer = _conv("num_output: 2 kernel_size: 2 axis: 2")
    check_gradient(layer, [RNG.standard_normal((2, 1, 2, 3, 3))])
    layer = _conv("num_output: 2 kernel_size: 2 stride: 1 pad: 1 dilation: 1")
    bottom, top = setup_layer(layer, [RNG.standard_normal((1, 2, 3, 3, 2))])
    assert top[0].shape == (1, 2, 4, 4, 3)
    check_gradient(_conv("num_output: 2 kernel_size: 2 kernel_size: 1 kernel_size: 2 pad: 1"),
                   [RNG.standard_normal((1, 2, 2, 3, 2))])


def test_conv_float32_stays_float32():
    layer = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 '
                       'weight_filler { type: "xavier" } }', dtype=numpy.float32)
    bottom, top = setup_layer(layer, [numpy.ones((2, 3, 6, 6), numpy.float32)], dtype=numpy.float32)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    assert top[0].data.dtype == bottom[0].diff.dtype == layer.blobs[0].diff.dtype == numpy.float32


def test_conv_bad_group_is_definition_error():
    with pytest.raises(DefinitionError, match="group"):
        setup_layer(_conv("num_output: 3 kernel_size: 1 group: 2"), [numpy.zeros((1, 4, 3, 3))])


DECONV_CASES = [
    ("num_output: 2 kernel_size: 3", (2, 3, 3, 3)),
    ("num_output: 2 kernel_size: 4 stride: 2 pad: 1", (1, 2, 3, 3)),
    ("num_output: 4 kernel_size: 3 group: 2 stride: 2 bias_term: false", (1, 4, 2, 3)),
    ("num_output: 2 kernel_h: 2 kernel_w: 3 dilation: 2 stride_h: 1 stride_w: 2", (1, 2, 3, 3)),
]


@pytest.mark.parametrize("params,shape", DECONV_CASES)
def test_deconv_gradient(params, shape, layout):
    check_gradient(_conv(params, "Deconvolution"), [RNG.standard_normal(shape)])


def test_deconv_shape_and_adjoint():
    # deconvolution is the adjoint of convolution with the same weights
    conv = _conv("num_output: 3 kernel_size: 3 stride: 2 pad: 1 bias_term: false")
    x = RNG.standard_normal((2, 2, 7, 7))
    cb, ct = setup_layer(conv, [x])
    conv.forward(cb, ct)
    assert ct[0].shape == (2, 3, 4, 4)
    deconv = _conv("num_output: 2 kernel_size: 3 stride: 2 pad: 1 bias_term: false", "Deconvolution")
    y = RNG.standard_normal((2, 3, 4, 4))
    db, dt = setup_layer(deconv, [y])
    assert deconv.blobs[0].shape == (3, 2, 3, 3)
    deconv.blobs[0].data[...] = conv.blobs[0].data
    deconv.forward(db, dt)
    assert dt[0].shape == (2, 2, 7, 7)
    numpy.testing.assert_allclose((ct[0].data * y).sum(), (x * dt[0].data).sum(), rtol=1e-10)


def test_im2col_values():
    layer = make_layer('name: "i" type: "Im2col" convolution_param { kernel_size: 2 stride: 1 pad: 1 }')
    x = RNG.standard_normal((2, 2, 3, 3))
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    assert top[0].shape == (2, 8, 4, 4)
    xp_ = numpy.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    # row c*4 + i*2 + j holds x[c, h+i-1, w+j-1]
    numpy.testing.assert_array_equal(top[0].data[:, 1 * 4 + 1 * 2 + 0], xp_[:, 1, 1:5, 0:4])


# -- pooling ------------------------------------------------------------------

def _pool(params, phase=caffe_pb2.TEST):
    return make_layer(f'name: "p" type: "Pooling" pooling_param {{ {params} }}', phase=phase)


def _distinct(shape):
    # well separated values: max pooling has no near-ties for the numeric gradient
    return RNG.permutation(numpy.prod(shape)).reshape(shape) * 0.1 + RNG.uniform(0, 0.01, shape)


POOL_CASES = [
    "pool: MAX kernel_size: 2 stride: 2",
    "pool: MAX kernel_size: 3 stride: 2",
    "pool: MAX kernel_size: 3 stride: 2 pad: 1",
    "pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
    "pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR",
    "pool: AVE kernel_size: 2 stride: 2",
    "pool: AVE kernel_size: 3 stride: 2 pad: 1",
    "pool: AVE kernel_size: 3 stride: 2",
    "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 1",
    "pool: AVE global_pooling: true",
    "pool: MAX global_pooling: true",
]


@pytest.mark.parametrize("params", POOL_CASES)
def test_pooling_gradient(params, cpu_impl):
    check_gradient(_pool(params), [_distinct((2, 2, 6, 7))])


def _naive_pool(x, k, s, p, method, ceil=True):
    n, c, H, W = x.shape
    from brewnet.layers.families.pooling import pooled_size
    oh, ow = pooled_size(H, k, s, p, ceil), pooled_size(W, k, s, p, ceil)
    y = numpy.zeros((n, c, oh, ow))
    mask = numpy.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, H + p), min(ws + k, W + p)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
            win = x[:, :, hs:he, ws:we].reshape(n, c, -1)
            if method == "MAX":
                a = win.argmax(-1)
                y[:, :, i, j] = win.max(-1)
                mask[:, :, i, j] = (hs + a // (we - ws)) * W + ws + a % (we - ws)
            else:
                y[:, :, i, j] = win.sum(-1) / size
    return y, mask


@pytest.mark.parametrize("k,s,p,hw", [(3, 2, 1, (7, 7)), (3, 2, 0, (6, 6)), (2, 2, 1, (5, 4)), (3, 3, 2, (8, 7))])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_matches_naive(k, s, p, hw, method, cpu_impl):
    x = RNG.standard_normal((2, 3) + hw)
    layer = _pool(f"pool: {method} kernel_size: {k} stride: {s} pad: {p}")
    n_tops = 2 if method == "MAX" else 1
    bottom, top = setup_layer(layer, [x], n_tops=n_tops)
    layer.forward(bottom, top)
    ref, mask = _naive_pool(x, k, s, p, method)
    numpy.testing.assert_allclose(top[0].data, ref, rtol=1e-12)
    if method == "MAX":
        numpy.testing.assert_array_equal(top[1].data, mask)


def test_pooling_max_ties_pick_first(cpu_impl):
    layer = _pool("pool: MAX kernel_size: 2 stride: 2")
    bottom, top = setup_layer(layer, [numpy.ones((1, 1, 2, 4))], n_tops=2)
    layer.forward(bottom, top)
    numpy.testing.assert_array_equal(top[1].data, [[[[0, 2]]]])


def test_pooling_max_mask_gradient_through_first_top(cpu_impl):
    layer = _pool("pool: MAX kernel_size: 3 stride: 2 pad: 1")
    x = _distinct((1, 2, 5, 5))
    bottom, top = setup_layer(layer, [x], n_tops=2)
    weights = [RNG.standard_normal(top[0].shape), numpy.zeros(top[1].shape)]
    check_gradient(_pool("pool: MAX kernel_size: 3 stride: 2 pad: 1"), [x], n_tops=2, top_weights=weights)


@pytest.mark.parametrize("h,k,s,p,ceil,floor", [
    (6, 3, 2, 0, 3, 2), (7, 3, 2, 1, 4, 4), (6, 2, 2, 1, 4, 4), (5, 3, 3, 2, 3, 3), (13, 3, 2, 0, 6, 6),
    (55, 3, 2, 0, 27, 27), (4, 3, 2, 1, 3, 2), (5, 2, 2, 1, 3, 3)])
def test_pooling_output_size(h, k, s, p, ceil, floor):
    for mode, want in (("CEIL", ceil), ("FLOOR", floor)):
        layer = _pool(f"pool: MAX kernel_size: {k} stride: {s} pad: {p} round_mode: {mode}")
        _, top = setup_layer(layer, [numpy.zeros((1, 1, h, h))])
        assert top[0].shape == (1, 1, want, want), mode


def test_pooling_pad_must_be_below_kernel():
    with pytest.raises(DefinitionError, match="pad"):
        setup_layer(_pool("pool: MAX kernel_size: 2 pad: 2"), [numpy.zeros((1, 1, 4, 4))])


def test_stochastic_pooling_test_value():
    x = RNG.uniform(0.1, 1, (2, 2, 4, 5))
    layer = _pool("pool: STOCHASTIC kernel_size: 2 stride: 2")
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    assert top[0].shape == (2, 2, 2, 3)
    xp_ = numpy.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
    win = xp_.reshape(2, 2, 2, 2, 3, 2)
    numpy.testing.assert_allclose(top[0].data, (win ** 2).sum((3, 5)) / win.sum((3, 5)))


def test_stochastic_pooling_train_samples_window_members():
    x = RNG.uniform(0.1, 1, (2, 3, 4, 4))
    layer = _pool("pool: STOCHASTIC kernel_size: 2 stride: 2", phase=caffe_pb2.TRAIN)
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    win = x.reshape(2, 3, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 2, 4)
    assert (top[0].data[..., None] == win).any(-1).all()
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    # each window routes its gradient to exactly the sampled input
    numpy.testing.assert_allclose(bottom[0].diff.reshape(2, 3, 2, 2, 2, 2).sum((3, 5)), 1)
    numpy.testing.assert_allclose((bottom[0].diff * x).reshape(2, 3, 2, 2, 2, 2).sum((3, 5)), top[0].data)


# -- LRN ---------------------------------------------------------------------

def test_lrn_across_values():
    x = RNG.standard_normal((2, 7, 3, 2))
    layer = make_layer('name: "n" type: "LRN" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }')
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    sq = numpy.pad(x ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    scale = 2 + 0.5 / 5 * sum(sq[:, i:i + 7] for i in range(5))
    numpy.testing.assert_allclose(top[0].data, x * scale ** -0.75, rtol=1e-12)


def test_lrn_within_values():
    # WITHIN_CHANNEL ignores k (Caffe shifts by 1) and divides by size^2 at borders too
    x = RNG.standard_normal((1, 2, 4, 3))
    layer = make_layer('name: "n" type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 7 '
                       'norm_region: WITHIN_CHANNEL }')
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    sq = numpy.pad(x ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = sum(sq[:, :, i:i + 4, j:j + 3] for i in range(3) for j in range(3)) / 9
    numpy.testing.assert_allclose(top[0].data, x * (1 + 0.5 * s) ** -0.75, rtol=1e-12)


def test_lrn_even_size_rejected():
    with pytest.raises(DefinitionError, match="odd"):
        setup_layer(make_layer('name: "n" type: "LRN" lrn_param { local_size: 4 }'), [numpy.zeros((1, 4, 2, 2))])


# -- SPP, Crop ------------------------------------------------------------------

@pytest.mark.parametrize("pool,height,hw", [("MAX", 3, (8, 8)), ("AVE", 2, (5, 7)), ("MAX", 1, (5, 6)),
                                            ("AVE", 3, (9, 6))])
def test_spp_gradient_and_shape(pool, height, hw, cpu_impl):
    layer = make_layer(f'name: "s" type: "SPP" spp_param {{ pyramid_height: {height} pool: {pool} }}')
    x = _distinct((2, 2) + hw)
    bottom, top = setup_layer(layer, [x])
    if height == 1:
        assert top[0].shape == (2, 2, 1, 1)
    else:
        assert top[0].shape == (2, 2 * sum(4 ** i for i in range(height)))
    check_gradient(make_layer(f'name: "s" type: "SPP" spp_param {{ pyramid_height: {height} pool: {pool} }}'), [x])


def test_spp_level_layout():
    # level 0 is the global max, then level 1's 2x2 bins per channel, channel-major
    x = _distinct((1, 2, 4, 4))
    layer = make_layer('name: "s" type: "SPP" spp_param { pyramid_height: 2 pool: MAX }')
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    level1 = x.reshape(1, 2, 2, 2, 2, 2).max((3, 5)).reshape(1, -1)
    numpy.testing.assert_allclose(top[0].data, numpy.concatenate([x.max((2, 3)), level1], axis=1))


def test_crop_values():
    layer = make_layer('name: "c" type: "Crop" crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }')
    x, ref = RNG.standard_normal((2, 3, 5, 6)), numpy.zeros((2, 2, 4, 3))
    bottom, top = setup_layer(layer, [x, ref])
    layer.forward(bottom, top)
    numpy.testing.assert_array_equal(top[0].data, x[:, 1:3, 0:4, 2:5])


def test_crop_out_of_bounds():
    layer = make_layer('name: "c" type: "Crop" crop_param { axis: 2 offset: 3 }')
    with pytest.raises(ValueError, match="out of bounds"):
        setup_layer(layer, [numpy.zeros((1, 1, 5, 5)), numpy.zeros((1, 1, 3, 3))])


def test_max_pooling_gradient_survives_inplace_change_of_top(cpu_impl):
    # CIFAR-10 quick runs ReLU in place on the pooling output: backward must not depend on top data
    layer = _pool("pool: MAX kernel_size: 3 stride: 2")
    x = _distinct((2, 2, 7, 7)) - 5.0
    bottom, top = setup_layer(layer, [x])
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    expected = bottom[0].diff.copy()
    layer.forward(bottom, top)
    numpy.maximum(top[0].data, 0, out=top[0].data)
    layer.backward(top, [True], bottom)
    numpy.testing.assert_array_equal(bottom[0].diff, expected)


@pytest.mark.parametrize("channels", [2, 16])
def test_conv_data_gradient_both_paths(channels, layout, cpu_impl):
    # narrow groups (< 16 channels) sum a full column matrix; wider ones fuse GEMM and col2im;
    # with the compiled kernels, layout A sums the column matrix back in one compiled pass
    check_gradient(_conv("num_output: 2 kernel_size: 2 stride: 1 pad: 1 bias_term: false"),
                   [RNG.standard_normal((1, channels, 3, 3))], check_params=False)
    check_gradient(_conv("num_output: 16 kernel_size: 3 stride: 2", "Deconvolution"),
                   [RNG.standard_normal((1, 2, 2, 2))], check_params=False)
