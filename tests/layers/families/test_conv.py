"""Convolution, Deconvolution and Im2col (layers/families/conv.py): shapes, values against
naive references, float64 gradient checks of every implementation variant (column layouts,
compiled and array code), and Caffe's own numbers; the plain gradient cases of these types
are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.layers.kernels import im2col as im2col_mod
from brewnet.layers.kernels.conv_plan import BaseConvPlan
from brewnet.netdef import DefinitionError

from family_helpers import check_vision_case, vision_case_names

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


@pytest.mark.parametrize("channels", [2, 16])
def test_conv_data_gradient_both_paths(channels, layout, cpu_impl):
    # narrow groups (< 16 channels) sum a full column matrix; wider ones fuse GEMM and col2im;
    # with the compiled kernels, layout A sums the column matrix back in one compiled pass
    check_gradient(_conv("num_output: 2 kernel_size: 2 stride: 1 pad: 1 bias_term: false"),
                   [RNG.standard_normal((1, channels, 3, 3))], check_params=False)
    check_gradient(_conv("num_output: 16 kernel_size: 3 stride: 2", "Deconvolution"),
                   [RNG.standard_normal((1, 2, 2, 2))], check_params=False)


@pytest.mark.parametrize("name", vision_case_names("conv"))
def test_vision_case_matches_caffe(fixtures, name):
    check_vision_case(fixtures, name)
