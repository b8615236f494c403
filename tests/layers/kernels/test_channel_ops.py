"""BatchNorm's training passes and Scale as compiled per-channel kernels (layers/kernels/
channel_ops.py): the same numbers as the array code, in place or not, and split over threads."""

import numpy
import pytest

from brewnet.layers.gradcheck import check_gradient, make_layer, setup_layer
from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.netdef import caffe_pb2

RNG = numpy.random.default_rng(23)


@pytest.fixture(autouse=True)
def many_jobs(monkeypatch):
    # several channel ranges even for these small blobs
    from brewnet.layers.kernels import channel_ops

    monkeypatch.setattr(channel_ops, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: 3 if big else 1)


def _run(proto, x, dy, in_place, dtype, phase=caffe_pb2.TRAIN, iterations=2, blobs=None):
    """Forward and backward (twice: buffers reused) of a fresh layer; returns what came out."""
    layer = make_layer(proto, phase=phase, dtype=dtype)
    bottom, top = setup_layer(layer, [x.astype(dtype)])
    for blob, value in zip(layer.blobs, blobs or []):
        blob.data[...] = value
    if in_place:
        top = bottom
    for _ in range(iterations):
        bottom[0].data[...] = x
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
    return [y, bottom[0].diff.copy()] + [b.data.copy() for b in layer.blobs] + [b.diff.copy() for b in layer.blobs]


BN = 'name: "bn" type: "BatchNorm" batch_norm_param { eps: 0.001 moving_average_fraction: 0.9 }'
SCALE = ('name: "s" type: "Scale" scale_param { bias_term: true filler { type: "gaussian" std: 1 } '
         'bias_filler { type: "gaussian" std: 1 } }')
SCALE_NO_BIAS = 'name: "s" type: "Scale" scale_param { filler { type: "gaussian" std: 1 } }'


BN_GLOBAL = 'name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.001 }'


def _with_statistics(proto, dtype):
    """A TEST BatchNorm's blobs: stored sums and a scale factor, as a trained net has them."""
    blobs = [RNG.standard_normal(5) * 3, RNG.uniform(0.5, 4, 5) * 3, numpy.array([3.0])]
    return [b.astype(dtype) for b in blobs]


@pytest.mark.parametrize("proto", [BN, BN_GLOBAL, SCALE, SCALE_NO_BIAS])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_compiled_matches_array_code(proto, in_place, dtype):
    if cpu_kernels.kernels() is None:
        pytest.skip("numba is not installed")
    x = RNG.standard_normal((3, 5, 4, 6)) * 2 + 1
    dy = RNG.standard_normal(x.shape)
    blobs = _with_statistics(proto, dtype) if proto == BN_GLOBAL else None
    with cpu_kernels.enabled_for_test():
        got = _run(proto, x, dy, in_place, dtype, blobs=blobs)
    with cpu_kernels.disabled():
        want = _run(proto, x, dy, in_place, dtype, blobs=blobs)
    tol = 2e-5 if dtype == numpy.float32 else 1e-12
    for a, b in zip(got, want):
        numpy.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("proto", [BN, SCALE])
def test_compiled_kernels_pass_gradcheck(proto):
    if cpu_kernels.kernels() is None:
        pytest.skip("numba is not installed")
    with cpu_kernels.enabled_for_test():
        check_gradient(make_layer(proto, phase=caffe_pb2.TRAIN), [RNG.standard_normal((2, 4, 3, 3)) + 1],
                       check_params=proto != BN)
