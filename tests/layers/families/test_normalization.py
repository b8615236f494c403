"""Normalization layers (layers/families/normalization.py): BatchNorm, Scale, Bias, MVN.

Caffe's semantics (BatchNorm's running statistics, broadcast shapes, in-place use).
Their gradient checks are in tests/layers/gradient_cases.py; Caffe's own numbers are
replayed here too (test_caffe_reference, family_helpers.py).
"""

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.netdef import DefinitionError, caffe_pb2

from family_helpers import check_reference_case, reference_case_names

rng = numpy.random.default_rng(7)


def randn(*shape):
    return rng.standard_normal(shape)


def run(text, arrays, phase=caffe_pb2.TEST, blobs=None):
    layer = make_layer(text, phase=phase)
    if blobs is not None:
        for array in blobs:
            blob = layer.make_blob(numpy.shape(array))
            blob.data[...] = array
            layer.blobs.append(blob)
    bottom, top = setup_layer(layer, arrays)
    layer.forward(bottom, top)
    return layer, bottom, top


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_batchnorm_statistics_never_get_gradients(phase):
    layer, bottom, top = run('name: "bn" type: "BatchNorm"', [randn(4, 3, 2, 2)], phase=phase,
                             blobs=[randn(3), numpy.abs(randn(3)) + 0.5, [2.5]])
    top[0].diff[...] = randn(4, 3, 2, 2)
    layer.backward(top, [True], bottom)
    assert bottom[0].diff.any() and all(not b.diff.any() for b in layer.blobs)


def test_batchnorm_global_forward():
    mean, var, factor = randn(3), numpy.abs(randn(3)) + 0.5, 2.0
    x = randn(2, 3, 4)
    layer, _, top = run('name: "bn" type: "BatchNorm" batch_norm_param { eps: 0.01 }', [x],
                        blobs=[mean, var, [factor]])
    expect = (x - mean[:, None] / factor) / numpy.sqrt(var[:, None] / factor + 0.01)
    numpy.testing.assert_allclose(top[0].data, expect)
    # a zero scale factor means "no statistics": mean 0, variance 0
    layer, _, top = run('name: "bn" type: "BatchNorm"', [x], blobs=[mean, var, [0.0]])
    numpy.testing.assert_allclose(top[0].data, x / numpy.sqrt(1e-5))


def test_batchnorm_running_statistics_follow_caffe():
    text = 'name: "bn" type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }'
    layer = make_layer(text, phase=caffe_pb2.TRAIN)
    assert not layer.param.param  # filled in by setup
    x1, x2 = randn(4, 3, 5) + 2, randn(4, 3, 5) * 3
    bottom, top = setup_layer(layer, [x1])
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    assert layer.param_propagate_down == [False] * 3
    layer.forward(bottom, top)
    bottom[0].data[...] = x2
    layer.forward(bottom, top)
    m = 4 * 5
    mean = lambda x: x.mean(axis=(0, 2))  # noqa: E731
    var = lambda x: x.var(axis=(0, 2)) * m / (m - 1)  # noqa: E731
    numpy.testing.assert_allclose(layer.blobs[2].data, [0.9 * 1 + 1])
    numpy.testing.assert_allclose(layer.blobs[0].data, mean(x2) + 0.9 * mean(x1))
    numpy.testing.assert_allclose(layer.blobs[1].data, var(x2) + 0.9 * var(x1))
    # the output uses the batch statistics (biased variance)
    expect = (x2 - mean(x2)[:, None]) / numpy.sqrt(x2.var(axis=(0, 2))[:, None] + 1e-5)
    numpy.testing.assert_allclose(top[0].data, expect)
    # switching to global statistics reproduces the stored averages
    glob = make_layer('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true }',
                      phase=caffe_pb2.TRAIN)
    glob.blobs = layer.blobs
    b2, t2 = setup_layer(glob, [x1])
    glob.forward(b2, t2)
    s = layer.blobs[2].data[0]
    numpy.testing.assert_allclose(t2[0].data, (x1 - layer.blobs[0].data[:, None] / s)
                                  / numpy.sqrt(layer.blobs[1].data[:, None] / s + 1e-5))


def test_batchnorm_rejects_learnable_statistics():
    layer = make_layer('name: "bn" type: "BatchNorm" param { lr_mult: 1 }')
    with pytest.raises(DefinitionError, match="'bn'"):
        setup_layer(layer, [randn(2, 3)])
    layer = make_layer('name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }')
    setup_layer(layer, [randn(2, 3)])
    assert len(layer.param.param) == 3


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_batchnorm_in_place(phase):
    x, dy = randn(3, 2, 4), randn(3, 2, 4)
    stats = [randn(2), randn(2) ** 2, [1.5]]
    ref, rb, rt = run('name: "bn" type: "BatchNorm"', [x], phase=phase, blobs=stats)
    rt[0].diff[...] = dy
    ref.backward(rt, [True], rb)
    layer, bottom, _ = run('name: "bn" type: "BatchNorm"', [x], phase=phase, blobs=stats)
    layer.forward(bottom, bottom)
    numpy.testing.assert_allclose(bottom[0].data, rt[0].data)
    bottom[0].data[...] = 0  # a later in-place layer clobbering the top must not matter
    bottom[0].diff[...] = dy
    layer.backward(bottom, [True], bottom)
    numpy.testing.assert_allclose(bottom[0].diff, rb[0].diff)


# ---------------------------------------------------------------------------
# Scale / Bias
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("params, shape, blob_shape", [
    ('filler { type: "gaussian" } bias_term: true bias_filler { type: "gaussian" }', (2, 3, 4), (3,)),
    ('axis: 1 num_axes: 2 filler { type: "gaussian" }', (2, 3, 4, 2), (3, 4)),
    ('axis: 0 num_axes: -1 filler { type: "gaussian" } bias_term: true', (2, 3), (2, 3)),
    ('num_axes: 0 filler { type: "gaussian" }', (2, 3), ()),
    ('axis: -1 filler { type: "gaussian" }', (2, 3, 4), (4,)),
])
def test_scale_one_bottom_blob_shapes(params, shape, blob_shape):
    layer, _, _ = run(f'name: "s" type: "Scale" scale_param {{ {params} }}', [randn(*shape)])
    assert all(b.shape == blob_shape for b in layer.blobs)


def test_scale_default_filler_is_one():
    layer, bottom, top = run('name: "s" type: "Scale" scale_param { bias_term: true }', [randn(2, 3)])
    assert (layer.blobs[0].data == 1).all() and not layer.blobs[1].data.any()
    numpy.testing.assert_array_equal(top[0].data, bottom[0].data)


@pytest.mark.parametrize("params, shape, scale_shape", [
    ("axis: 0", (2, 3, 4), (2, 3)),
    ("", (2, 3, 4), (3,)),
    ("axis: 0", (2, 3), (2, 3)),  # element-wise
    ('bias_term: true bias_filler { type: "gaussian" }', (2, 3, 4), (3, 4)),
    ("", (2, 3), ()),
])
def test_scale_two_bottoms_learn_only_the_bias(params, shape, scale_shape):
    layer, _, _ = run(f'name: "s" type: "Scale" scale_param {{ {params} }}', [randn(*shape), randn(*scale_shape)])
    assert len(layer.blobs) == (1 if "bias_term" in params else 0)


def test_scale_mismatch_is_an_error():
    with pytest.raises(DefinitionError, match="'s'"):
        run('name: "s" type: "Scale"', [randn(2, 3, 4), randn(4)])


def test_scale_in_place():
    x, s, dy = randn(2, 3, 2), randn(3), randn(2, 3, 2)
    layer, bottom, _ = run('name: "s" type: "Scale" scale_param { bias_term: true }', [x], blobs=[s, randn(3)])
    layer.forward(bottom, bottom)  # bottom now holds x*s + b; the input was saved
    bottom[0].diff[...] = dy
    layer.backward(bottom, [True], bottom)
    numpy.testing.assert_allclose(layer.blobs[0].diff, (dy * x).sum(axis=(0, 2)))
    numpy.testing.assert_allclose(bottom[0].diff, dy * s[:, None])


@pytest.mark.parametrize("params, shape, blob_shape", [
    ('filler { type: "gaussian" }', (2, 3, 4), (3,)),
    ('axis: 0 num_axes: -1 filler { type: "gaussian" }', (2, 3), (2, 3)),
    ('axis: 2 num_axes: 0', (2, 3, 4), ()),
])
def test_bias_one_bottom_blob_shape(params, shape, blob_shape):
    layer, _, _ = run(f'name: "b" type: "Bias" bias_param {{ {params} }}', [randn(*shape)])
    assert layer.blobs[0].shape == blob_shape


@pytest.mark.parametrize("params, shape, bias_shape", [("", (2, 3, 4), (3, 4)), ("axis: 0", (2, 3), (2,)),
                                                       ("", (2, 3), ())])
def test_bias_two_bottoms_learn_nothing(params, shape, bias_shape):
    layer, _, _ = run(f'name: "b" type: "Bias" bias_param {{ {params} }}', [randn(*shape), randn(*bias_shape)])
    assert not layer.blobs


# ---------------------------------------------------------------------------
# MVN
# ---------------------------------------------------------------------------
def test_mvn_forward():
    x = randn(2, 3, 4, 5)
    _, _, top = run('name: "m" type: "MVN"', [x])
    rows = x.reshape(6, -1)
    expect = (rows - rows.mean(1, keepdims=True)) / (rows.std(1, keepdims=True) + 1e-9)
    numpy.testing.assert_allclose(top[0].data.reshape(6, -1), expect, atol=1e-12)
    _, _, top = run('name: "m" type: "MVN" mvn_param { across_channels: true normalize_variance: false }', [x])
    rows = x.reshape(2, -1)
    numpy.testing.assert_allclose(top[0].data.reshape(2, -1), rows - rows.mean(1, keepdims=True), atol=1e-12)


@pytest.mark.parametrize("case", reference_case_names("normalization"))
def test_caffe_reference(fixtures, case):
    check_reference_case(fixtures, case)
