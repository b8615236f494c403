"""Concat, Slice, Split, Flatten, Reshape, Tile, Filter, BatchReindex and Crop
(layers/families/plumbing.py): Caffe semantics and Caffe's own numbers. Their gradient
checks are in tests/layers/gradient_cases.py."""

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.netdef import DefinitionError

from family_helpers import (check_reference_case, check_vision_case, randn, reference_case_names, run,
                            vision_case_names)

RNG = numpy.random.default_rng(7)


def test_concat_forward_and_errors():
    a, b = randn(2, 3, 2), randn(2, 1, 2)
    _, _, top = run('name: "c" type: "Concat"', [a, b])
    numpy.testing.assert_array_equal(top[0].data, numpy.concatenate([a, b], axis=1))
    with pytest.raises(DefinitionError):
        run('name: "c" type: "Concat"', [randn(2, 3), randn(3, 3)])
    with pytest.raises(DefinitionError, match="not both"):
        run('name: "c" type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [a, b])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_large_concat_and_split_gradients_on_threads(axis, monkeypatch):
    # big enough (over 2^18 elements) for the copies and sums to be split over brewnet's threads
    from brewnet.layers.kernels import parallel

    monkeypatch.setattr(parallel, "jobs_for", lambda xp=numpy, big=True, per_thread=4: 3 if big else 1)
    a, b = randn(5, 3, 90, 100), randn(5, 3, 90, 100)
    layer, bottom, top = run(f'name: "c" type: "Concat" concat_param {{ axis: {axis} }}', [a, b])
    numpy.testing.assert_array_equal(top[0].data, numpy.concatenate([a, b], axis=axis))
    top[0].diff[...] = randn(*top[0].shape)
    layer.backward(top, [True, False], bottom)
    want = numpy.split(top[0].diff, 2, axis=axis)[0]
    numpy.testing.assert_array_equal(bottom[0].diff, want)
    split, bottom, tops = run('name: "s" type: "Split"', [a], n_tops=3)
    for t in tops:
        t.diff[...] = randn(*t.shape)
    split.backward(tops, [True], bottom)
    numpy.testing.assert_array_equal(bottom[0].diff, (tops[0].diff + tops[1].diff) + tops[2].diff)


@pytest.mark.parametrize("params, n_tops, sizes", [
    ("axis: 1 slice_point: 1 slice_point: 4", 3, [1, 3, 1]),
    ("axis: 0", 2, [1, 1]),
    ("slice_dim: 2", 3, None),
])
def test_slice(params, n_tops, sizes):
    text = f'name: "s" type: "Slice" slice_param {{ {params} }}'
    x = randn(2, 5, 3)
    layer, _, top = run(text, [x], n_tops=n_tops)
    axis = layer.axis
    if sizes is not None:
        assert [t.shape[axis] for t in top] == sizes
    numpy.testing.assert_array_equal(numpy.concatenate([t.data for t in top], axis=axis), x)


def test_slice_rejects_bad_points():
    with pytest.raises(DefinitionError):
        run('name: "s" type: "Slice" slice_param { slice_point: 2 }', [randn(2, 5)], n_tops=3)
    with pytest.raises(DefinitionError, match="evenly"):
        run('name: "s" type: "Slice"', [randn(2, 5)], n_tops=2)


def test_split_tops_see_the_bottom():
    _, bottom, top = run('name: "s" type: "Split"', [randn(2, 3)], n_tops=2)
    for t in top:
        numpy.testing.assert_array_equal(t.data, bottom[0].data)


@pytest.mark.parametrize("params, out_shape", [("", (2, 24)), ("axis: 1 end_axis: 2", (2, 12, 2)),
                                               ("axis: 0 end_axis: -2", (24, 2))])
def test_flatten(params, out_shape):
    text = f'name: "f" type: "Flatten" flatten_param {{ {params} }}'
    _, bottom, top = run(text, [randn(2, 3, 4, 2)])
    assert top[0].shape == out_shape
    numpy.testing.assert_array_equal(top[0].data.reshape(-1), bottom[0].data.reshape(-1))


@pytest.mark.parametrize("params, in_shape, out_shape", [
    ("shape { dim: 0 dim: -1 }", (2, 3, 4), (2, 12)),
    ("shape { dim: 0 dim: -1 dim: 4 }", (2, 3, 4), (2, 3, 4)),
    ("shape { dim: 2 dim: 3 } axis: 1 num_axes: 1", (2, 6, 4), (2, 2, 3, 4)),
    ("shape { dim: -1 } axis: -2", (2, 3, 4), (2, 3, 4)),
    ("shape { dim: 1 } axis: 1 num_axes: 0", (2, 3), (2, 1, 3)),
    ("shape { dim: 0 dim: 0 dim: -1 dim: 1 }", (2, 3, 4), (2, 3, 4, 1)),
])
def test_reshape(params, in_shape, out_shape):
    text = f'name: "r" type: "Reshape" reshape_param {{ {params} }}'
    _, bottom, top = run(text, [randn(*in_shape)])
    assert top[0].shape == out_shape
    assert numpy.shares_memory(top[0].data, bottom[0].data)  # Caffe shares the data


@pytest.mark.parametrize("params", ["shape { dim: -1 dim: -1 }", "shape { dim: 5 dim: -1 }",
                                    "shape { dim: 0 dim: 0 dim: 0 dim: 0 }", "shape { dim: 7 }"])
def test_reshape_errors(params):
    with pytest.raises(DefinitionError, match="'r'"):
        run(f'name: "r" type: "Reshape" reshape_param {{ {params} }}', [randn(2, 3, 4)])


def test_filter():
    text = 'name: "f" type: "Filter"'
    x, y = randn(5, 3), randn(5, 2, 2)
    sel = numpy.array([0.0, 1.0, 0.0, 2.0, 1.0])
    layer, bottom, top = run(text, [x, y, sel], n_tops=2)
    assert top[0].shape == (3, 3) and top[1].shape == (3, 2, 2)
    numpy.testing.assert_array_equal(top[0].data, x[[1, 3, 4]])
    # the output size follows the selector on every forward
    bottom[2].data[...] = [1, 0, 0, 0, 0]
    layer.forward(bottom, top)
    assert top[0].shape == (1, 3)
    top[0].diff[...] = 7
    top[1].diff[...] = 1
    layer.backward(top, [True, False, False], bottom)
    expect = numpy.zeros((5, 3))
    expect[0] = 7
    numpy.testing.assert_array_equal(bottom[0].diff, expect)


def test_filter_first_reshape_keeps_full_batch():
    layer = make_layer('name: "f" type: "Filter"')
    bottom, top = setup_layer(layer, [randn(4, 2), numpy.array([0.0, 1.0, 0.0, 0.0])])
    assert top[0].shape == (4, 2)  # Caffe sizes the tops like the bottoms before the first forward
    layer.reshape(bottom, top)
    assert top[0].shape == (1, 2)


def test_batch_reindex():
    text = 'name: "b" type: "BatchReindex"'
    x, idx = randn(4, 3), numpy.array([3.0, 0.0, 3.0, 1.0, 3.0])
    layer, bottom, top = run(text, [x, idx])
    numpy.testing.assert_array_equal(top[0].data, x[[3, 0, 3, 1, 3]])
    top[0].diff[...] = 1
    layer.backward(top, [True, False], bottom)
    numpy.testing.assert_array_equal(bottom[0].diff[:, 0], [1, 1, 0, 3])
    with pytest.raises(DefinitionError, match="out of range"):
        run(text, [x, numpy.array([4.0])])


@pytest.mark.parametrize("axis, tiles", [(1, 3), (0, 2), (-1, 2)])
def test_tile(axis, tiles):
    text = f'name: "t" type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}'
    x = randn(2, 3, 2)
    _, _, top = run(text, [x])
    numpy.testing.assert_array_equal(top[0].data, numpy.tile(x, [tiles if i == axis % 3 else 1 for i in range(3)]))


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


@pytest.mark.parametrize("case", reference_case_names("plumbing"))
def test_caffe_reference(fixtures, case):
    check_reference_case(fixtures, case)


@pytest.mark.parametrize("name", vision_case_names("plumbing"))
def test_vision_case_matches_caffe(fixtures, name):
    check_vision_case(fixtures, name)
