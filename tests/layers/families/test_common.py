"""Utility layers (layers/families/: arithmetic, plumbing, inner_product, sources):
Caffe semantics and Caffe's own numbers. Their gradient checks are in
tests/layers/gradient_cases.py.

The last test replays every caffe-reference case whose layers are the utility
or normalization layers, building those layers by hand (no Net).
"""

import json

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.registry import get_layer_class
from brewnet.netdef import DefinitionError, caffe_pb2

rng = numpy.random.default_rng(42)


def randn(*shape):
    return rng.standard_normal(shape)


def run(layer_text, arrays, n_tops=1, phase=caffe_pb2.TEST, dtype=numpy.float64):
    layer = make_layer(layer_text, phase=phase, dtype=dtype)
    bottom, top = setup_layer(layer, [numpy.asarray(a, dtype=dtype) for a in arrays], n_tops, dtype=dtype)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


# ---------------------------------------------------------------------------
# values and Caffe semantics
# ---------------------------------------------------------------------------
def test_inner_product_weight_layout():
    layer, bottom, top = run('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 transpose: true '
                             'weight_filler { type: "gaussian" } }', [randn(2, 5)])
    assert layer.blobs[0].shape == (5, 3) and layer.blobs[1].shape == (3,)
    numpy.testing.assert_allclose(top[0].data, bottom[0].data @ layer.blobs[0].data)
    layer, _, top = run('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 axis: -1 }',
                        [randn(2, 4, 5)])
    assert layer.blobs[0].shape == (3, 5) and top[0].shape == (2, 4, 3)


def test_inner_product_rejects_changed_input_size():
    layer, bottom, top = run('name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 }', [randn(2, 5)])
    bottom[0].reshape(2, 6)
    with pytest.raises(DefinitionError, match="'ip'"):
        layer.reshape(bottom, top)


def test_embed_forward():
    text = ('name: "e" type: "Embed" embed_param { num_output: 3 input_dim: 5 '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    idx = numpy.array([[0, 4, 2], [2, 2, 1]], dtype=float)
    layer, _, top = run(text, [idx])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert top[0].shape == (2, 3, 3)
    numpy.testing.assert_allclose(top[0].data, w[idx.astype(int)] + b)
    with pytest.raises(DefinitionError, match="out of range"):
        run(text, [numpy.array([5.0])])


@pytest.mark.parametrize("axis, shape", [(1, (2, 4, 3)), (2, (2, 3, 4)), (-1, (3, 5))])
def test_softmax_sums_to_one_without_overflow(axis, shape):
    _, _, top = run(f'name: "s" type: "Softmax" softmax_param {{ axis: {axis} }}', [randn(*shape) * 50])
    numpy.testing.assert_allclose(top[0].data.sum(axis=axis), 1.0)


def test_concat_forward_and_errors():
    a, b = randn(2, 3, 2), randn(2, 1, 2)
    _, _, top = run('name: "c" type: "Concat"', [a, b])
    numpy.testing.assert_array_equal(top[0].data, numpy.concatenate([a, b], axis=1))
    with pytest.raises(DefinitionError):
        run('name: "c" type: "Concat"', [randn(2, 3), randn(3, 3)])
    with pytest.raises(DefinitionError, match="not both"):
        run('name: "c" type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [a, b])


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


def test_silence_zeroes_bottom_diffs():
    layer = make_layer('name: "s" type: "Silence"')
    bottom, top = setup_layer(layer, [randn(2, 3), randn(4)], n_tops=0)
    layer.forward(bottom, top)
    for b in bottom:
        b.diff[...] = 3
    layer.backward(top, [True, False], bottom)
    assert not bottom[0].diff.any() and (bottom[1].diff == 3).all()


def test_parameter():
    text = 'name: "p" type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }'
    layer, _, top = run(text, [])
    assert top[0].shape == (2, 3) and not top[0].data.any()  # fresh blob: zeros


def test_input_shapes():
    layer = make_layer('name: "i" type: "Input" input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }')
    _, top = setup_layer(layer, [], n_tops=2)
    assert [t.shape for t in top] == [(2, 3), (4,)]
    layer = make_layer('name: "i" type: "Input" input_param { shape { dim: 5 } }')
    _, top = setup_layer(layer, [], n_tops=3)
    assert [t.shape for t in top] == [(5,)] * 3


def test_dummy_data():
    _, _, top = run('name: "d" type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
                    'data_filler { type: "constant" value: 1.5 } }', [])
    assert top[0].shape == (2, 3) and (top[0].data == 1.5).all()
    layer, bottom, top = run('name: "d" type: "DummyData" dummy_data_param { num: 2 channels: 3 height: 1 width: 2 '
                             'num: 1 channels: 1 height: 1 width: 1 '
                             'data_filler { type: "gaussian" } data_filler { type: "constant" value: 2 } }',
                             [], n_tops=2)
    assert top[0].shape == (2, 3, 1, 2) and top[1].shape == (1, 1, 1, 1)
    first = top[0].data.copy()
    assert first.std() > 0 and top[1].data[0, 0, 0, 0] == 2
    layer.forward(bottom, top)  # random fillers refill on every forward
    assert not numpy.array_equal(first, top[0].data)
    _, _, top = run('name: "d" type: "DummyData" dummy_data_param { shape { dim: 3 } }', [], n_tops=2)
    assert all(t.shape == (3,) and not t.data.any() for t in top)
    with pytest.raises(DefinitionError):
        run('name: "d" type: "DummyData" dummy_data_param { shape { dim: 3 } shape { dim: 2 } }', [], n_tops=3)


def test_float32_preserved():
    cases = [
        ('name: "l" type: "InnerProduct" inner_product_param { num_output: 2 weight_filler { type: "xavier" } }', 1),
        ('name: "l" type: "Softmax"', 1), ('name: "l" type: "Reduction" reduction_param { operation: MEAN }', 1),
        ('name: "l" type: "Eltwise" eltwise_param { coeff: 0.5 coeff: 2 }', 2),
        ('name: "l" type: "BatchNorm"', 1), ('name: "l" type: "MVN"', 1), ('name: "l" type: "Scale"', 1),
    ]
    for text, n in cases:
        for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
            layer, bottom, top = run(text, [randn(2, 3, 2) for _ in range(n)], phase=phase, dtype=numpy.float32)
            top[0].diff[...] = 1
            layer.backward(top, [True] * n, bottom)
            assert top[0].data.dtype == numpy.float32 and bottom[0].diff.dtype == numpy.float32, text
            assert all(b.data.dtype == numpy.float32 for b in layer.blobs), text


# ---------------------------------------------------------------------------
# Caffe's own numbers
# ---------------------------------------------------------------------------
MY_TYPES = {
    "InnerProduct", "Embed", "Softmax", "Concat", "Slice", "Split", "Flatten", "Reshape", "Eltwise", "Filter",
    "BatchReindex", "Tile", "Reduction", "ArgMax", "Silence", "Parameter", "Input", "DummyData",
    "BatchNorm", "Scale", "Bias", "MVN",
}


def _load_manifest(fixtures):
    path = fixtures / "caffe-reference" / "layers" / "manifest.json"
    return [c for c in json.loads(path.read_text())["cases"] if c["type"] in MY_TYPES]


def _blob_array(proto):
    if proto.HasField("shape"):
        shape = tuple(proto.shape.dim)
    else:
        shape = tuple(d for d in (proto.num, proto.channels, proto.height, proto.width))
    values = proto.double_data if len(proto.double_data) else proto.data
    return numpy.array(values, dtype=numpy.float32).reshape(shape)


def _case_names():
    import os
    import pathlib

    root = os.environ.get("BREWNET_FIXTURES")
    if not root or not pathlib.Path(root).is_dir():
        return ["(no fixtures)"]
    return [c["name"] for c in _load_manifest(pathlib.Path(root))]


def _run_reference_case(case_dir, phase):
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    stored = {lp.name: [_blob_array(b) for b in lp.blobs] for lp in list(weights.layer) + list(weights.layers)}
    data = numpy.load(case_dir / "data.npz")
    keys = set(data.files)

    blobs = {}
    steps = []
    for lp in net.layer:
        if lp.type == "Input":
            for name in lp.top:
                blobs[name] = Blob(data[f"in/{name}"].shape, dtype=numpy.float32, name=name)
                blobs[name].data[...] = data[f"in/{name}"]
            continue
        assert lp.type in MY_TYPES, f"case uses {lp.type}, not a utility/normalization layer"
        layer = get_layer_class(lp.type, lp.name)(lp, phase=phase, dtype=numpy.float32,
                                                  rng=numpy.random.default_rng(0))
        for array in stored.get(lp.name, []):
            blob = layer.make_blob(array.shape)
            blob.data[...] = array
            layer.blobs.append(blob)
        bottom = [blobs[name] for name in lp.bottom]
        top = [blobs.setdefault(name, Blob((), dtype=numpy.float32, name=name)) for name in lp.top]
        layer.check_blob_counts(len(bottom), len(top))
        layer.setup(bottom, top)
        # what the Net does: lr_mult 0 (BatchNorm sets it for itself) means no param gradient
        specs = layer.param.param
        layer.param_propagate_down = [i >= len(specs) or specs[i].lr_mult != 0 for i in range(len(layer.blobs))]
        # as the Net under force_backward: every bottom the layer allows (none for ArgMax)
        down = list(lp.propagate_down) or [bool(layer.allow_force_backward(j)) for j in range(len(bottom))]
        steps.append((lp.name, layer, bottom, top, down))

    for _, layer, bottom, top, _ in steps:  # Caffe reshapes before every forward
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
    checked = 0

    def compare(key, got):
        nonlocal checked
        numpy.testing.assert_allclose(got, data[key], rtol=1e-4, atol=1e-5, err_msg=key)
        checked += 1

    for key in sorted(k for k in keys if k.startswith("out/")):
        compare(key, blobs[key[4:]].data)
    by_name = {name: layer for name, layer, *_ in steps}
    for key in sorted(k for k in keys if k.startswith("paramafter/")):
        _, lname, i = key.split("/")
        compare(key, by_name[lname].blobs[int(i)].data)

    for key in (k for k in keys if k.startswith("topdiff/")):
        blobs[key[8:]].diff[...] = data[key]
    for _, layer, bottom, top, down in reversed(steps):
        layer.backward(top, down, bottom)
    for key in sorted(k for k in keys if k.startswith(("bottomdiff/", "blobdiff/"))):
        compare(key, blobs[key.split("/", 1)[1]].diff)
    for key in sorted(k for k in keys if k.startswith("paramdiff/")):
        _, lname, i = key.split("/")
        compare(key, by_name[lname].blobs[int(i)].diff)
    return checked


@pytest.mark.parametrize("case", _case_names())
def test_caffe_reference(fixtures, case):
    cases = {c["name"]: c for c in _load_manifest(fixtures)}
    assert case in cases, "no utility/normalization cases found in the manifest"
    phase = caffe_pb2.TRAIN if cases[case].get("phase") == "TRAIN" else caffe_pb2.TEST
    checked = _run_reference_case(fixtures / "caffe-reference" / "layers" / case, phase)
    assert checked >= 1

