"""Softmax, Eltwise, Reduction and ArgMax (layers/families/arithmetic.py): Caffe semantics
and Caffe's own numbers. Their gradient checks are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.netdef import DefinitionError

from family_helpers import check_reference_case, randn, reference_case_names, run


@pytest.mark.parametrize("axis, shape", [(1, (2, 4, 3)), (2, (2, 3, 4)), (-1, (3, 5))])
def test_softmax_sums_to_one_without_overflow(axis, shape):
    _, _, top = run(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}', [randn(*shape) * 50])
    numpy.testing.assert_allclose(top[0].data.sum(axis=axis), 1.0)


def test_eltwise_max_ties_follow_caffe():
    a = numpy.array([1.0, 2.0, 3.0, 0.0])
    b = numpy.array([1.0, 1.0, 4.0, 0.0])
    c = numpy.array([1.0, 2.0, 4.0, 5.0])
    layer, bottom, top = run('name: "e" type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c])
    numpy.testing.assert_array_equal(top[0].data, [1, 2, 4, 5])
    top[0].diff[...] = 1
    layer.backward(top, [True] * 3, bottom)
    # a==b: bottom 1 wins; later bottoms only when strictly larger
    numpy.testing.assert_array_equal(bottom[0].diff, [0, 1, 0, 0])
    numpy.testing.assert_array_equal(bottom[1].diff, [1, 0, 1, 0])
    numpy.testing.assert_array_equal(bottom[2].diff, [0, 0, 0, 1])


def test_eltwise_errors():
    with pytest.raises(DefinitionError, match="coeff"):
        run('name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 1 }', [randn(2), randn(2)])
    with pytest.raises(DefinitionError, match="coeff"):
        run('name: "e" type: "Eltwise" eltwise_param { coeff: 1 }', [randn(2), randn(2)])
    with pytest.raises(DefinitionError, match="shape"):
        run('name: "e" type: "Eltwise"', [randn(2), randn(3)])


@pytest.mark.parametrize("op, ref", [
    ("SUM", lambda x: x.sum(-1)), ("ASUM", lambda x: numpy.abs(x).sum(-1)),
    ("SUMSQ", lambda x: (x * x).sum(-1)), ("MEAN", lambda x: x.mean(-1)),
])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction(op, ref, axis):
    text = f'name: "r" type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}'
    x = randn(2, 3, 4)
    _, _, top = run(text, [x])
    a = axis % 3
    assert top[0].shape == x.shape[:a]
    numpy.testing.assert_allclose(top[0].data, -1.5 * ref(x.reshape(x.shape[:a] + (-1,))))


def test_argmax():
    x = numpy.array([[1.0, 3.0, 3.0, 0.0], [5.0, 2.0, 5.0, 5.0]])
    _, _, top = run('name: "a" type: "ArgMax"', [x])
    assert top[0].shape == (2, 1, 1)
    # equal values: Caffe's (value, index) descending sort puts the larger index first
    numpy.testing.assert_array_equal(top[0].data.ravel(), [2, 3])
    _, _, top = run('name: "a" type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x])
    assert top[0].shape == (2, 2, 3)
    numpy.testing.assert_array_equal(top[0].data[:, 0], [[2, 1, 0], [3, 2, 0]])
    numpy.testing.assert_array_equal(top[0].data[:, 1], [[3, 3, 1], [5, 5, 5]])
    x3 = randn(2, 4, 3)
    _, _, top = run('name: "a" type: "ArgMax" argmax_param { axis: 1 top_k: 2 }', [x3])
    assert top[0].shape == (2, 2, 3)
    numpy.testing.assert_array_equal(top[0].data, numpy.argsort(-x3, axis=1)[:, :2])
    _, _, top = run('name: "a" type: "ArgMax" argmax_param { axis: -1 out_max_val: true }', [x3])
    numpy.testing.assert_array_equal(top[0].data[..., 0], x3.max(-1))
    with pytest.raises(DefinitionError, match="top_k"):
        run('name: "a" type: "ArgMax" argmax_param { top_k: 5 }', [x])


@pytest.mark.parametrize("case", reference_case_names("arithmetic"))
def test_caffe_reference(fixtures, case):
    check_reference_case(fixtures, case)


@pytest.mark.parametrize("in_place", [False, True])
def test_eltwise_plain_sum_in_place_and_over_threads(in_place, monkeypatch):
    # the coefficient-free SUM adds straight into the top (in ranges on the threads) and copies
    # dy to each bottom but an in-place one, whose diff already is dy
    from brewnet.layers.gradcheck import make_layer, setup_layer
    from brewnet.layers.kernels import parallel

    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: 3)
    monkeypatch.setattr(parallel, "elementwise", lambda fn, size, xp=numpy, min_size=0: parallel.over_ranges(
        fn, size, xp, True))
    rng = numpy.random.default_rng(5)
    xs = [rng.standard_normal((2, 3, 4)) for _ in range(3)]
    dy = rng.standard_normal((2, 3, 4))
    layer = make_layer('name: "e" type: "Eltwise" eltwise_param { operation: SUM }')
    bottom, top = setup_layer(layer, xs)
    if in_place:
        top = [bottom[0]]
    layer.forward(bottom, top)
    numpy.testing.assert_allclose(top[0].data, xs[0] + xs[1] + xs[2], rtol=1e-14)
    top[0].diff[...] = dy
    layer.backward(top, [True, True, False], bottom)
    for b in bottom[:2]:
        numpy.testing.assert_array_equal(b.diff, dy)
    assert not numpy.any(bottom[2].diff)
