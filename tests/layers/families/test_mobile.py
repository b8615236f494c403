"""layers/families/mobile.py and layers/kernels/depthwise.py: the depthwise kernel against the
im2col path it replaces, ShuffleChannel's permutation, Axpy, and their one-line errors."""

import numpy
import pytest
from family_helpers import randn, run

from brewnet.layers.base import LayerError
from brewnet.layers.families.conv import Convolution
from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.layers.kernels.conv_plan import ConvPlan

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def _conv_pass(params, x, dy, depthwise, monkeypatch, type_name="Convolution"):
    """(y, dx, dW, db) of one forward and backward, on the depthwise kernel or im2col."""
    monkeypatch.setattr(ConvPlan, "use_depthwise", depthwise)
    layer, bottom, top = run(f'name: "c" type: "{type_name}" convolution_param {{ {params} {FILLERS} }}', [x],
                             dtype=numpy.float32)
    assert (layer.plan.path == "depthwise") == depthwise
    top[0].diff[...] = dy
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, [True], bottom)
    return [numpy.array(a) for a in (top[0].data, bottom[0].diff, layer.blobs[0].diff, layer.blobs[1].diff)]


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "array-code"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("params, shape", [
    ("num_output: 8 group: 8 kernel_size: 3 pad: 1", (3, 8, 9, 7)),
    ("num_output: 12 group: 4 kernel_size: 3 stride: 2 pad: 1", (2, 4, 8, 9)),  # 3 outputs per channel
    ("num_output: 5 group: 5 kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 2 pad_w: 0 dilation: 2",
     (2, 5, 11, 10)),
    ("num_output: 6 group: 6 kernel_size: 2 stride: 3", (1, 6, 7, 8)),
])
def test_depthwise_kernel_matches_im2col(params, shape, threads, compiled, monkeypatch):
    before = parallel.thread_count()
    parallel.set_thread_count(threads)
    try:
        x = randn(*shape).astype(numpy.float32)
        plain = _conv_pass(params, x, 0, False, monkeypatch)[0]
        dy = randn(*plain.shape).astype(numpy.float32)
        with cpu_kernels.enabled_for_test() if compiled else cpu_kernels.disabled():
            fast = _conv_pass(params, x, dy, True, monkeypatch)
        slow = _conv_pass(params, x, dy, False, monkeypatch)
    finally:
        parallel.set_thread_count(before)
    for what, a, b in zip(("y", "dx", "dW", "db"), fast, slow):
        assert a.shape == b.shape, what
        numpy.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, numpy.abs(b).max()), err_msg=what)


def test_fork_depthwise_types_take_group_from_the_channels(monkeypatch):
    x = randn(2, 4, 5, 5).astype(numpy.float32)
    dy = randn(2, 4, 5, 5).astype(numpy.float32)
    want = _conv_pass("num_output: 4 group: 4 kernel_size: 3 pad: 1", x, dy, True, monkeypatch)
    for type_name, group in (("DepthwiseConvolution", ""), ("ConvolutionDepthwise", ""),
                             ("DepthwiseConvolution", "group: 4")):
        got = _conv_pass(f"num_output: 4 {group} kernel_size: 3 pad: 1", x, dy, True, monkeypatch, type_name)
        for a, b in zip(got, want):
            numpy.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(LayerError, match="group = channels"):
        run(f'name: "d" type: "DepthwiseConvolution" convolution_param {{ num_output: 4 group: 2 kernel_size: 1 }}',
            [x])


def test_shuffle_channel_is_the_grid_transpose():
    x = numpy.arange(2 * 6 * 2, dtype=float).reshape(2, 6, 2)
    layer, bottom, top = run('name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 2 }', [x])
    # channels (a0 a1 a2 | b0 b1 b2) become (a0 b0 a1 b1 a2 b2)
    numpy.testing.assert_array_equal(top[0].data, x[:, [0, 3, 1, 4, 2, 5]])
    top[0].diff[...] = top[0].data
    layer.backward(top, [True], bottom)
    numpy.testing.assert_array_equal(bottom[0].diff, x)
    with pytest.raises(LayerError, match="not a multiple of group 4"):
        run('name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 4 }', [x])


def test_axpy_scales_the_second_bottom():
    a, x, y = randn(2, 3, 1, 1), randn(2, 3, 4, 2), randn(2, 3, 4, 2)
    _, _, top = run('name: "a" type: "Axpy"', [a, x, y])
    numpy.testing.assert_allclose(top[0].data, a * x + y)
    with pytest.raises(LayerError, match="must be \\(N, C\\)"):
        run('name: "a" type: "Axpy"', [randn(2, 3, 2, 1), x, y])


def test_relu6_clips_at_zero_and_six():
    x = numpy.array([-3.0, 0.5, 5.9, 6.1, 40.0])
    _, _, top = run('name: "r" type: "ReLU6"', [x])
    numpy.testing.assert_array_equal(top[0].data, [0, 0.5, 5.9, 6, 6])
