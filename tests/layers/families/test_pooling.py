"""Pooling and SPP (layers/families/pooling.py): shapes, values against naive references,
float64 gradient checks of compiled and array code, and Caffe's own numbers; the plain
gradient cases of these types are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.netdef import DefinitionError, caffe_pb2

from family_helpers import check_vision_case, vision_case_names

RNG = numpy.random.default_rng(7)


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


@pytest.mark.parametrize("k,s,p,hw", [(3, 2, 1, (7, 7)), (3, 2, 0, (6, 6)), (2, 2, 1, (5, 4)), (3, 3, 2, (8, 7)),
                                     (3, 1, 1, (6, 5)), (5, 1, 2, (4, 9))])
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


@pytest.mark.parametrize("name", vision_case_names("pooling"))
def test_vision_case_matches_caffe(fixtures, name):
    check_vision_case(fixtures, name)


def test_a_max_window_wholly_past_the_image_is_minus_flt_max_as_in_caffe(cpu_impl):
    from brewnet.layers.gradcheck import make_layer, setup_layer

    layer = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 1 stride: 3 }')
    x = numpy.arange(25, dtype=numpy.float32).reshape(1, 1, 5, 5)
    bottom, top = setup_layer(layer, [x], n_tops=2)
    layer.forward(bottom, top)
    lowest = -numpy.finfo(numpy.float32).max  # Caffe's -FLT_MAX, not -inf
    assert top[0].data.ravel().tolist() == [0, 3, lowest, 15, 18, lowest, lowest, lowest, lowest]
    assert top[1].data.ravel().tolist()[2] == -1  # and the mask says no element won
