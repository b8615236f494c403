"""layers.fillers: Caffe's filler formulas and shape semantics."""

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.fillers import FillerError, fill
from brewnet.netdef import caffe_pb2


def filled(text, shape, seed=0, dtype=numpy.float64):
    param = text_format.Parse(text, caffe_pb2.FillerParameter())
    blob = Blob(shape, xp=numpy, dtype=dtype)
    fill(blob, param, numpy.random.default_rng(seed))
    return blob.data


def test_constant():
    assert numpy.all(filled("type: 'constant' value: 2.5", (3, 4)) == 2.5)
    # an empty FillerParameter is Caffe's default: constant 0
    assert numpy.all(filled("", (2, 2)) == 0)


def test_uniform_bounds():
    v = filled("type: 'uniform' min: -2 max: 3", (200, 100))
    assert v.min() >= -2 and v.max() <= 3
    assert abs(v.mean() - 0.5) < 0.05


def test_gaussian_moments():
    v = filled("type: 'gaussian' mean: 1 std: 0.5", (200, 500))
    assert abs(v.mean() - 1) < 0.01 and abs(v.std() - 0.5) < 0.01


def test_gaussian_sparse_keeps_sparse_over_num_outputs():
    # each weight survives with probability sparse / shape[0]
    v = filled("type: 'gaussian' std: 1 sparse: 3", (10, 5000))
    assert abs(numpy.count_nonzero(v) / v.size - 0.3) < 0.01
    with pytest.raises(FillerError):
        filled("type: 'gaussian' sparse: -2", (3, 3))


def test_positive_unitball_rows_sum_to_one():
    v = filled("type: 'positive_unitball'", (5, 3, 4))
    assert v.min() >= 0 and v.max() <= 1
    numpy.testing.assert_allclose(v.reshape(5, -1).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("norm,n", [("FAN_IN", 75), ("FAN_OUT", 64 * 25), ("AVERAGE", (75 + 64 * 25) / 2)])
def test_xavier_bound(norm, n):
    # fan_in = count / shape[0] = 3*5*5, fan_out = count / shape[1] = 64*5*5
    v = filled(f"type: 'xavier' variance_norm: {norm}", (64, 3, 5, 5))
    bound = numpy.sqrt(3.0 / n)
    assert numpy.abs(v).max() <= bound
    assert numpy.abs(v).max() > 0.99 * bound
    assert abs(v.var() * n - 1) < 0.1  # U(-a, a) has variance a^2 / 3 = 1 / n


@pytest.mark.parametrize("norm,n", [("FAN_IN", 300), ("FAN_OUT", 200)])
def test_msra_std(norm, n):
    v = filled(f"type: 'msra' variance_norm: {norm}", (200, 300))
    assert abs(v.mean()) < 0.02 * numpy.sqrt(2.0 / n)
    assert abs(v.std() / numpy.sqrt(2.0 / n) - 1) < 0.02


def test_bilinear_width4_by_hand():
    # f = ceil(4/2) = 2, c = (4-1)/(2f) = 0.75; weight(x) = 1 - |x/f - c| = .25 .75 .75 .25
    ramp = numpy.array([0.25, 0.75, 0.75, 0.25])
    v = filled("type: 'bilinear'", (2, 3, 4, 4))
    for o in range(2):
        for i in range(3):
            numpy.testing.assert_allclose(v[o, i], numpy.outer(ramp, ramp), rtol=0, atol=1e-15)


def test_bilinear_width3_and_shape_errors():
    # f = 2, c = 0.5: weights .5 1 .5
    v = filled("type: 'bilinear'", (1, 1, 3, 3))
    numpy.testing.assert_allclose(v[0, 0], numpy.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))
    with pytest.raises(FillerError):
        filled("type: 'bilinear'", (1, 1, 3, 4))
    with pytest.raises(FillerError):
        filled("type: 'bilinear'", (3, 3))


@pytest.mark.parametrize("kind", ["constant", "uniform", "positive_unitball", "xavier", "msra", "bilinear"])
def test_sparse_only_for_gaussian(kind):
    with pytest.raises(FillerError):
        filled(f"type: '{kind}' sparse: 2", (1, 1, 4, 4))


def test_errors_and_dtype_and_seed():
    with pytest.raises(FillerError, match="unknown filler type"):
        filled("type: 'glorot'", (2, 2))
    with pytest.raises(FillerError):
        filled("type: 'constant'", (0, 3))
    v = filled("type: 'xavier'", (4, 6), dtype=numpy.float32)
    assert v.dtype == numpy.float32
    # the same seed gives the same weights
    assert numpy.array_equal(filled("type: 'gaussian'", (4, 6), seed=7), filled("type: 'gaussian'", (4, 6), seed=7))
    assert not numpy.array_equal(filled("type: 'gaussian'", (4, 6), seed=7), filled("type: 'gaussian'", (4, 6), seed=8))
