"""brewnet's CUDA kernels (layers/kernels/cuda, BREWNET_CUDA_KERNELS=1) on a real device: every
layer case of tests/layers/kernels/test_cuda_sources.py runs on cupy with the kernels and on
numpy with the array code (the reference), and must agree within the CPU tolerances; the solver
steps likewise. Each test checks that its kernels were really launched. Skipped without cupy
and a CUDA device."""

import numpy
import pytest
from gpu_env import load_test_module, require_gpu

cupy = require_gpu()

from brewnet.layers.kernels.backend import to_numpy  # noqa: E402
from brewnet.layers.kernels.cuda import ops, sources  # noqa: E402
from brewnet.netdef import caffe_pb2  # noqa: E402

cpu = load_test_module("layers/kernels/test_cuda_sources.py", "cuda_sources_cpu")


@pytest.fixture
def launched(monkeypatch):
    """Kernel names launched on the device during the test."""
    names = []
    original = ops.CupyKernels.__call__

    def spy(self, name, count, *args):
        names.append(name)
        return original(self, name, count, *args)

    monkeypatch.setattr(ops.CupyKernels, "__call__", spy)
    return names


# tests/gpu's parity tolerances (gpu_parity.py): float32 sums in another order
RTOL, ATOL = 1e-4, 1e-5


def compare(monkeypatch, launched, kernel_names, proto, inputs, rtol=RTOL, atol=ATOL, **kw):
    monkeypatch.setenv(ops.SWITCH, "0")
    want = cpu.run_layer(proto, inputs, **kw)
    monkeypatch.setenv(ops.SWITCH, "1")
    launched.clear()
    got = cpu.run_layer(proto, inputs, xp=cupy, **kw)
    for name in kernel_names:
        assert name in launched, f"{name} did not run on the device (launched: {launched})"
    for w_list, g_list in zip(want, got):
        for w, g in zip(w_list, g_list):
            numpy.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    ops.run_deferred_checks()


def test_every_source_compiles_with_nvrtc():
    kernels = ops.CupyKernels()
    for name in sources.kernel_table():
        assert kernels.function(name) is not None


@pytest.mark.parametrize("shape,body", cpu.CONV_CASES + [
    ((8, 3, 67, 67), "num_output: 96 kernel_size: 11 stride: 4"),  # CaffeNet's conv1, smaller image
    ((4, 48, 13, 13), "num_output: 64 kernel_size: 3 pad: 1 group: 2"),
])
def test_convolution(monkeypatch, launched, shape, body):
    proto = (f'name: "c" type: "Convolution" convolution_param {{ {body} weight_filler {{ type: "gaussian" std: 0.1 }} '
             f'bias_filler {{ type: "gaussian" std: 0.1 }} }}')
    compare(monkeypatch, launched, ["im2col", "col2im", "swap_leading_axes"], proto, [cpu.normal(*shape)],
            rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape,body", cpu.CONV_CASES)
def test_deconvolution(monkeypatch, launched, shape, body):
    proto = (f'name: "d" type: "Deconvolution" convolution_param {{ {body} weight_filler {{ type: "gaussian" '
             f'std: 0.1 }} bias_filler {{ type: "gaussian" std: 0.1 }} }}')
    compare(monkeypatch, launched, ["im2col", "col2im"], proto, [cpu.normal(*shape)], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape,body", cpu.POOL_CASES)
def test_pooling(monkeypatch, launched, shape, body):
    is_max = "MAX" in body
    names = ["max_pool_forward", "max_pool_backward"] if is_max else ["ave_pool_forward", "ave_pool_backward"]
    x = numpy.random.default_rng(3).permutation(numpy.prod(shape)).reshape(shape).astype(numpy.float32) / 7
    compare(monkeypatch, launched, names, f'name: "p" type: "Pooling" pooling_param {{ {body} }}', [x],
            n_tops=2 if is_max else 1)


@pytest.mark.parametrize("body,names", [
    ("local_size: 5 alpha: 0.2 beta: 0.75 k: 2", ["lrn_across_forward", "lrn_across_backward"]),
    ("local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL", ["lrn_within_forward", "lrn_within_backward"]),
])
def test_lrn(monkeypatch, launched, body, names):
    compare(monkeypatch, launched, names, f'name: "n" type: "LRN" lrn_param {{ {body} }}', [cpu.normal(2, 7, 5, 4)])


@pytest.mark.parametrize("proto,names", [
    ('type: "ReLU"', ["relu_forward", "relu_backward"]),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', ["relu_forward", "relu_backward"]),
    ('type: "Sigmoid"', ["sigmoid_forward", "sigmoid_backward"]),
    ('type: "TanH"', ["tanh_forward", "tanh_backward"]),
])
@pytest.mark.parametrize("in_place", [False, True])
def test_neurons(monkeypatch, launched, proto, names, in_place):
    compare(monkeypatch, launched, names, f'name: "a" {proto}', [cpu.normal(3, 4, 5)], in_place=in_place)


def test_dropout(monkeypatch, launched):
    compare(monkeypatch, launched, ["dropout_forward", "dropout_backward"],
            'name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [cpu.normal(4, 50)],
            phase=caffe_pb2.TRAIN)


@pytest.mark.parametrize("shape,axis", [((4, 10), 1), ((2, 5, 3, 4), 1), ((2, 3, 6), 2), ((128, 1000), 1)])
def test_softmax(monkeypatch, launched, shape, axis):
    compare(monkeypatch, launched, ["softmax_forward", "softmax_backward"],
            f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}', [cpu.normal(*shape) * 4])


@pytest.mark.parametrize("loss_param", ["", "ignore_label: 2", "normalization: BATCH_SIZE", "normalization: NONE"])
def test_softmax_loss(monkeypatch, launched, loss_param):
    ignore = 2 if "ignore_label" in loss_param else None
    x, lab = cpu.normal(3, 4, 2, 3) * 3, cpu.labels((3, 1, 2, 3), 4, ignore=ignore)
    compare(monkeypatch, launched, ["softmax_forward", "softmax_loss_forward", "softmax_loss_backward"],
            f'name: "l" type: "SoftmaxWithLoss" loss_param {{ {loss_param} }}', [x, lab], n_tops=2,
            top_diffs=[numpy.float32(1.5), numpy.zeros((3, 4, 2, 3), numpy.float32)])


@pytest.mark.parametrize("accuracy_param", ["", "top_k: 2", "ignore_label: 1"])
def test_accuracy(monkeypatch, launched, accuracy_param):
    from brewnet.layers.gradcheck import make_layer, setup_layer

    x = cpu.normal(6, 5, 4).round(1)
    lab = cpu.labels((6, 4), 5, ignore=1 if "ignore" in accuracy_param else None)
    proto = f'name: "a" type: "Accuracy" accuracy_param {{ {accuracy_param} }}'
    values = []
    for switch, xp in (("0", numpy), ("1", cupy)):
        monkeypatch.setenv(ops.SWITCH, switch)
        layer = make_layer(proto, dtype=numpy.float32, xp=xp)
        bottom, top = setup_layer(layer, [x, lab], 1, dtype=numpy.float32)
        layer.forward(bottom, top)
        values.append(float(top[0].data))
    assert "accuracy_forward" in launched
    assert values[1] == pytest.approx(values[0], rel=1e-6)


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, caffe_pb2.TEST])
def test_batch_norm(monkeypatch, launched, phase):
    compare(monkeypatch, launched, ["channel_normalize"], 'name: "b" type: "BatchNorm"', [cpu.normal(4, 3, 5) * 2 + 1],
            phase=phase)


def test_scale(monkeypatch, launched):
    compare(monkeypatch, launched, ["channel_scale"],
            'name: "s" type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } }',
            [cpu.normal(2, 3, 4, 5)])


@pytest.mark.parametrize("rule", sorted(cpu.RULE_PARAMS))
def test_solver_steps(monkeypatch, launched, rule):
    from brewnet.solver import updates

    param = caffe_pb2.SolverParameter(**cpu.RULE_PARAMS[rule])
    rng = numpy.random.default_rng(5)
    w0, g0 = rng.standard_normal(100000).astype(numpy.float32), rng.standard_normal(100000).astype(numpy.float32)
    hist0 = [numpy.abs(rng.standard_normal(100000)).astype(numpy.float32) for _ in range(cpu.HISTORIES.get(rule, 1))]
    w, g, hist = w0.copy(), g0.copy(), [h.copy() for h in hist0]
    updates.regularize(g, w, 0.0005, "L2", numpy)
    getattr(updates, rule)(g, hist, 0.01, param, 3, numpy)
    w -= g
    wk, gk, histk = cupy.asarray(w0), cupy.asarray(g0), [cupy.asarray(h) for h in hist0]
    ops.apply_step(cupy, rule, wk, gk, histk, 1, 0.0005, "L2", 0.01, param, 3)
    assert launched == [f"{rule}_step"]
    numpy.testing.assert_allclose(to_numpy(gk), g, rtol=1e-5, atol=1e-8)
    numpy.testing.assert_allclose(to_numpy(wk), w, rtol=1e-6, atol=1e-7)
