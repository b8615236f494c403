"""oneDNN's convolution kernels (layers/kernels/onednn.py): where the plans pick them, and the
Convolution layer's and a net's results and gradients with them against brewnet's own paths."""

import threading

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.kernels import onednn, parallel
from brewnet.layers.kernels.conv_plan import ConvGeometry, ConvPlan

pytestmark = [pytest.mark.onednn,
              pytest.mark.skipif(not onednn.available(), reason="oneDNN (onednn-cpu-gomp) is not installed")]

RNG = numpy.random.default_rng(5)


def _conv_prototxt(num_output, kernel, stride=1, pad=0, dilation=1, group=1):
    kh, kw = kernel
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    return (f'name: "c" type: "Convolution" convolution_param {{ num_output: {num_output} '
            f'kernel_h: {kh} kernel_w: {kw} pad_h: {ph} pad_w: {pw} stride: {stride} dilation: {dilation} '
            f'group: {group} weight_filler {{ type: "gaussian" std: 0.1 }} '
            'bias_filler { type: "gaussian" std: 1 } }')


def _run(prototxt, x, dy, use_onednn, monkeypatch, propagate_down=True):
    """Forward and backward of a fresh float32 layer (same seed: same weights):
    (y, dx, dW, db, layer)."""
    monkeypatch.setattr(ConvPlan, "use_onednn", use_onednn)
    layer = make_layer(prototxt, dtype=numpy.float32)
    bottom, top = setup_layer(layer, [x], dtype=numpy.float32)
    layer.forward(bottom, top)
    for p in layer.blobs:
        p.diff[...] = 0
    top[0].diff[...] = dy
    layer.backward(top, [propagate_down], bottom)
    return top[0].data.copy(), bottom[0].diff.copy(), layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy(), layer


CASES = [
    # (batch, channels, spatial, num_output, kernel, stride, pad, dilation): CIFAR-10's conv1 (3
    # inputs), a ResNet-style 7x7 stride-2 stem, a 3x3 stage, Inception-v3's 1x7, an unpadded
    # stride 2, a dilated 3x3, odd non-square sizes and kernels
    (5, 3, (32, 32), 32, (5, 5), 1, 2, 1),
    (2, 3, (30, 30), 8, (7, 7), 2, 3, 1),
    (2, 64, (14, 14), 64, (3, 3), 1, 1, 1),
    (3, 16, (17, 17), 24, (1, 7), 1, (0, 3), 1),
    (2, 16, (17, 17), 16, (3, 3), 2, 0, 1),
    (2, 8, (12, 12), 8, (3, 3), 1, 2, 2),
    (3, 5, (9, 13), 7, (3, 5), 1, (1, 2), 1),
]


def _output(S, k, s, p, d):
    pads = (p, p) if isinstance(p, int) else p
    return tuple((s_ + 2 * p_ - d * (k_ - 1) - 1) // s + 1 for s_, p_, k_ in zip(S, pads, k))


@pytest.mark.parametrize("n,C,S,M,k,stride,pad,dilation", CASES)
def test_onednn_matches_brewnets_own_kernels(n, C, S, M, k, stride, pad, dilation, monkeypatch):
    x = RNG.standard_normal((n, C) + S).astype(numpy.float32)
    dy = RNG.standard_normal((n, M) + _output(S, k, stride, pad, dilation)).astype(numpy.float32)
    proto = _conv_prototxt(M, k, stride, pad, dilation)
    *got, layer = _run(proto, x, dy, True, monkeypatch)
    assert layer.plan.path == "onednn"
    for impls in layer.plan.onednn.implementations().values():
        assert not any(name.startswith(onednn.SLOW) for name in impls.values()), impls
    *want, ref_layer = _run(proto, x, dy, False, monkeypatch)
    assert ref_layer.plan.path != "onednn"
    for g, w in zip(got, want):
        assert g.dtype == numpy.float32
        # float32 sums in another order: relative to the result's scale
        numpy.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * numpy.abs(w).max())


def test_onednn_weight_gradient_without_data_gradient(monkeypatch):
    """A first layer (propagate_down false): the weight gradient alone, the bottom's diff untouched."""
    x = RNG.standard_normal((4, 3, 16, 16)).astype(numpy.float32)
    dy = RNG.standard_normal((4, 8, 16, 16)).astype(numpy.float32)
    proto = _conv_prototxt(8, (3, 3), 1, 1)
    _, dx, dW, db, layer = _run(proto, x, dy, True, monkeypatch, propagate_down=False)
    assert layer.plan.path == "onednn"
    assert not dx.any()
    _, _, dW_ref, db_ref, _ = _run(proto, x, dy, False, monkeypatch, propagate_down=False)
    numpy.testing.assert_allclose(dW, dW_ref, rtol=0, atol=2e-6 * numpy.abs(dW_ref).max())
    numpy.testing.assert_allclose(db, db_ref, rtol=0, atol=2e-6 * numpy.abs(db_ref).max())


def test_onednn_repeatable_and_close_on_one_or_two_threads(monkeypatch):
    proto = _conv_prototxt(32, (5, 5), 1, 2)
    x = RNG.standard_normal((12, 32, 16, 16)).astype(numpy.float32)
    dy = RNG.standard_normal((12, 32, 16, 16)).astype(numpy.float32)
    before = parallel.thread_count()
    try:
        runs = []
        for threads in (1, 2, 2):
            parallel.set_thread_count(threads)
            runs.append(_run(proto, x, dy, True, monkeypatch)[:4])
    finally:
        parallel.set_thread_count(before)
    for a, b in zip(runs[1], runs[2]):
        numpy.testing.assert_array_equal(a, b)
    for a, b in zip(runs[0], runs[1]):  # other chunks: the weight gradient's partial sums differ
        numpy.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * numpy.abs(b).max())


def _plan(C, S, M, kernel, stride=(1, 1), pad=(1, 1), group=1, batch=8, dtype=numpy.float32):
    O = tuple((s + 2 * p - k) // st + 1 for s, p, k, st in zip(S, pad, kernel, stride))
    return ConvPlan(numpy, ConvGeometry(numpy.dtype(dtype), batch, C, S, M, O, group, kernel, stride, pad, (1, 1)))


def test_onednn_takes_the_layers_where_it_wins(monkeypatch):
    # ResNet-50's res4 3x3 (im2col otherwise) and a first layer from 3 channels
    assert _plan(256, (14, 14), 256, (3, 3)).path == "onednn"
    assert _plan(3, (64, 64), 16, (7, 7), (2, 2), (3, 3)).path == "onednn"
    # CIFAR-10's 5x5 layers (Winograd otherwise, and slower)
    assert _plan(32, (16, 16), 32, (5, 5), pad=(2, 2), batch=100).path == "onednn"
    # res3's 3x3, 128 channels at 28x28: Winograd stays, it is faster there
    assert _plan(128, (28, 28), 128, (3, 3)).path == "winograd"
    # 1x1 (GEMMs on the input itself), grouped and depthwise layers, float64: brewnet's own
    assert _plan(64, (14, 14), 64, (1, 1), pad=(0, 0)).path == "1x1"
    assert _plan(64, (14, 14), 64, (3, 3), group=2).path != "onednn"
    assert _plan(32, (14, 14), 32, (3, 3), group=32).path == "depthwise"
    assert _plan(64, (14, 14), 64, (3, 3), dtype=numpy.float64).path != "onednn"
    # an output that leaves the last input row unread (oneDNN's right padding would be negative)
    assert _plan(16, (10, 10), 16, (3, 3), (2, 2), (0, 0)).path != "onednn"
    monkeypatch.setenv("BREWNET_ONEDNN", "0")
    assert _plan(256, (14, 14), 256, (3, 3)).path != "onednn"


def test_onednn_runs_one_openmp_thread_in_each_calling_thread():
    """oneDNN's OpenMP team would otherwise take every CPU from inside each of brewnet's jobs."""
    lib = onednn.library()
    if lib.omp is None:
        pytest.skip("libdnnl is not built on GNU OpenMP here")
    counts = {}

    def probe(name, make_stream):
        if make_stream:
            lib.stream()
        counts[name] = lib.omp.omp_get_max_threads()

    for name, make_stream in (("with", True), ("without", False)):
        t = threading.Thread(target=probe, args=(name, make_stream))
        t.start()
        t.join()
    assert counts["with"] == 1
    assert counts["without"] >= 1  # the process default (the CPUs), untouched in other threads


NET = """
name: "small" layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 6 dim: 3 dim: 20 dim: 20 } shape { dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 5 pad: 2 weight_filler { type: "gaussian" std: 0.1 }
  bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 24 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_a_net_trains_the_same_with_onednn(monkeypatch):
    """Forward and backward of a whole net (the convolutions' ReLUs fused on their output blocks)."""
    from google.protobuf import text_format

    from brewnet.layers.net import Net
    from brewnet.netdef import caffe_pb2

    x = RNG.standard_normal((6, 3, 20, 20)).astype(numpy.float32)
    labels = RNG.integers(0, 5, 6).astype(numpy.float32)
    results, weights = {}, None
    for use in (True, False):
        monkeypatch.setattr(ConvPlan, "use_onednn", use)
        net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), phase=caffe_pb2.TRAIN)
        if weights is None:
            weights = [p.data.copy() for p in net.learnable_params]
        for p, w in zip(net.learnable_params, weights):
            p.data[...] = w
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = labels
        loss = numpy.float32(net.forward())
        assert [net.layers[i].plan.path == "onednn" for i in (1, 4)] == [use, use]
        for p in net.learnable_params:
            p.diff[...] = 0
        net.backward()
        results[use] = [loss, net.blobs["conv1"].data.copy()] + [p.diff.copy() for p in net.learnable_params]
    for got, want in zip(results[True], results[False]):
        numpy.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1e-3, numpy.abs(want).max()))
