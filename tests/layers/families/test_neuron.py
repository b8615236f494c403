"""Neuron layers: Caffe semantics, in-place use, and Caffe's own numbers (their gradient
checks are in tests/layers/gradient_cases.py)."""

import json

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.registry import get_layer_class
from brewnet.netdef import DefinitionError, caffe_pb2

NEURON_TYPES = {
    "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log",
    "BNLL", "Threshold", "Clip", "Swish", "Dropout",
}


def layer_text(type_name, params=""):
    return f'name: "t" type: "{type_name}" bottom: "x" top: "y" {params}'


RNG = numpy.random.default_rng(0)
X = RNG.standard_normal((2, 3, 3, 2))


# -- the TRAIN mask (the table's Dropout case runs TEST, the identity) ----------
def test_dropout_train_gradient():
    # the mask is redrawn on every forward: check against a fixed mask instead
    layer = make_layer(layer_text("Dropout", "dropout_param { dropout_ratio: 0.3 }"), phase=caffe_pb2.TRAIN)
    bottom, top = setup_layer(layer, [X])
    layer.forward(bottom, top)
    mask = top[0].data / X
    top[0].diff[...] = 2.0
    layer.backward(top, [True], bottom)
    numpy.testing.assert_allclose(bottom[0].diff, 2.0 * mask)


# -- values and semantics -----------------------------------------------------
def run(type_name, params, x, phase=caffe_pb2.TEST, dtype=numpy.float64):
    layer = make_layer(layer_text(type_name, params), phase=phase, dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    layer.forward(bottom, top)
    return layer, bottom, top


def test_forward_formulas():
    x = numpy.array([-3.0, -0.5, 0.0, 0.25, 2.0])
    cases = [
        ("ReLU", "relu_param { negative_slope: 0.1 }", numpy.where(x > 0, x, 0.1 * x)),
        ("ELU", "elu_param { alpha: 0.7 }", numpy.where(x > 0, x, 0.7 * (numpy.exp(x) - 1))),
        ("Sigmoid", "", 1 / (1 + numpy.exp(-x))),
        ("TanH", "", numpy.tanh(x)),
        ("AbsVal", "", numpy.abs(x)),
        ("Power", "power_param { power: 2 scale: 3 shift: 1 }", (1 + 3 * x) ** 2),
        ("Power", "power_param { power: 0 scale: 3 shift: 1 }", numpy.ones_like(x)),
        ("Power", "power_param { power: 2 scale: 0 shift: 1.5 }", numpy.full_like(x, 2.25)),
        ("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }", 2 ** (0.1 + 0.5 * x)),
        ("Exp", "exp_param { scale: 2 }", numpy.exp(2 * x)),
        ("Log", "log_param { base: 10 scale: 1.5 shift: 5 }", numpy.log10(5 + 1.5 * x)),
        ("BNLL", "", numpy.log1p(numpy.exp(x))),
        ("Threshold", "threshold_param { threshold: 0.25 }", (x > 0.25).astype(float)),
        ("Clip", "clip_param { min: -0.5 max: 0.7 }", numpy.clip(x, -0.5, 0.7)),
        ("Swish", "swish_param { beta: 2 }", x / (1 + numpy.exp(-2 * x))),
        ("Dropout", "", x),
    ]
    for type_name, params, want in cases:
        _, _, top = run(type_name, params, x)
        numpy.testing.assert_allclose(top[0].data, want, rtol=1e-6, atol=1e-12, err_msg=f"{type_name} {params}")


def test_bnll_large_inputs_stay_finite():
    x = numpy.array([-1000.0, -60.0, 60.0, 1000.0], dtype=numpy.float32)
    layer, bottom, top = run("BNLL", "", x, dtype=numpy.float32)
    numpy.testing.assert_allclose(top[0].data, [0, 0, 60, 1000], atol=1e-6)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    numpy.testing.assert_allclose(bottom[0].diff, [0, 0, 1, 1], atol=1e-6)


def test_float32_stays_float32():
    x = X.astype(numpy.float32)
    special = {"Clip": "clip_param { min: -1 max: 1 }", "Power": "power_param { power: 2 scale: 0.3 }"}
    for type_name in sorted(NEURON_TYPES):
        params = special.get(type_name, "")
        xin = numpy.abs(x) + 1 if type_name == "Log" else x
        layer, bottom, top = run(type_name, params, xin, phase=caffe_pb2.TRAIN, dtype=numpy.float32)
        assert top[0].data.dtype == numpy.float32, type_name
        if type_name != "Threshold":
            top[0].diff[...] = 1
            layer.backward(top, [True], bottom)
            assert bottom[0].diff.dtype == numpy.float32, type_name


def test_relu_gradient_at_zero_uses_slope():
    # Caffe: derivative is negative_slope for x <= 0
    layer, bottom, top = run("ReLU", "relu_param { negative_slope: 0.2 }", numpy.array([0.0, 1.0]))
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    numpy.testing.assert_allclose(bottom[0].diff, [0.2, 1.0])


def test_prelu_default_filler_and_shapes():
    layer, _, _ = run("PReLU", "", X)
    assert layer.blobs[0].shape == (3,)
    numpy.testing.assert_allclose(layer.blobs[0].data, 0.25)
    layer, _, _ = run("PReLU", "prelu_param { channel_shared: true }", X)
    assert layer.blobs[0].shape == ()


def test_prelu_param_diff_accumulates_and_respects_lr_mult_zero():
    layer, bottom, top = run("PReLU", "", X)
    top[0].diff[...] = 1
    layer.backward(top, [False], bottom)
    once = layer.blobs[0].diff.copy()
    layer.backward(top, [False], bottom)
    numpy.testing.assert_allclose(layer.blobs[0].diff, 2 * once)
    layer.param_propagate_down = [False]
    layer.backward(top, [False], bottom)
    numpy.testing.assert_allclose(layer.blobs[0].diff, 2 * once)


def test_prelu_rejects_wrong_loaded_slope_count():
    layer = make_layer(layer_text("PReLU"))
    blob = Blob((5,), dtype=numpy.float64)
    layer.blobs.append(blob)
    with pytest.raises(DefinitionError, match="slope"):
        setup_layer(layer, [X])


def test_dropout_train_scaling_and_expectation():
    x = numpy.ones((200, 100), dtype=numpy.float32)
    layer, bottom, top = run("Dropout", "dropout_param { dropout_ratio: 0.4 }", x, phase=caffe_pb2.TRAIN,
                             dtype=numpy.float32)
    y = top[0].data.copy()
    kept = y != 0
    numpy.testing.assert_allclose(y[kept], 1 / 0.6, rtol=1e-6)
    assert abs(kept.mean() - 0.6) < 0.02
    assert abs(y.mean() - 1.0) < 0.04
    # same seed, same mask; a new forward draws a new mask
    again = run("Dropout", "dropout_param { dropout_ratio: 0.4 }", x, phase=caffe_pb2.TRAIN, dtype=numpy.float32)[2]
    numpy.testing.assert_array_equal(again[0].data, y)
    layer.forward(bottom, top)
    assert not numpy.array_equal(top[0].data, y)


def test_dropout_test_phase_is_identity():
    _, _, top = run("Dropout", "dropout_param { dropout_ratio: 0.9 }", X)
    numpy.testing.assert_array_equal(top[0].data, X)


def test_threshold_has_no_backward():
    layer, bottom, top = run("Threshold", "", X)
    layer.backward(top, [False], bottom)  # nothing asked, nothing done
    with pytest.raises(DefinitionError, match=r"layer 't' \(Threshold\): has no gradient"):
        layer.backward(top, [True], bottom)


def test_bad_parameters_are_reported():
    with pytest.raises(DefinitionError, match="base"):
        run("Log", "log_param { base: 1 }", X)
    with pytest.raises(DefinitionError, match="base"):
        run("Exp", "exp_param { base: -2 }", X)
    with pytest.raises(DefinitionError, match="dropout_ratio"):
        run("Dropout", "dropout_param { dropout_ratio: 1.0 }", X)


# -- in place ------------------------------------------------------------------
def in_place(type_name, params, x, phase=caffe_pb2.TEST):
    layer = make_layer(layer_text(type_name, params), phase=phase)
    blob = Blob(x.shape, dtype=numpy.float64)
    blob.data[...] = x
    layer.check_blob_counts(1, 1)
    layer.setup([blob], [blob])
    layer.reshape([blob], [blob])
    layer.forward([blob], [blob])
    out = blob.data.copy()
    blob.diff[...] = 1.5
    layer.backward([blob], [True], [blob])
    return layer, out, blob.diff.copy()


@pytest.mark.parametrize(
    "type_name, params, x",
    [
        ("ReLU", "relu_param { negative_slope: 0.1 }", X),
        ("PReLU", 'prelu_param { filler { type: "uniform" min: 0.1 max: 0.5 } }', X),
        ("ELU", "", X),
        ("Sigmoid", "", X),
        ("TanH", "", X),
        ("Power", "power_param { power: 1.5 scale: 0.8 shift: 3 }", X),
        ("Exp", "exp_param { base: 2 scale: 0.5 }", X),
        ("Log", "log_param { scale: 2 shift: 0.5 }", numpy.abs(X) + 0.5),
        ("BNLL", "", X),
        ("Clip", "clip_param { min: -0.5 max: 0.7 }", X),
        ("Swish", "swish_param { beta: 1.3 }", X),
        ("Dropout", "", X),
    ],
)
def test_in_place_matches_separate_blobs(type_name, params, x):
    layer, out, diff = in_place(type_name, params, x)
    ref, bottom, top = run(type_name, params, x)
    top[0].diff[...] = 1.5
    ref.backward(top, [True], bottom)
    numpy.testing.assert_allclose(out, top[0].data, rtol=1e-12)
    numpy.testing.assert_allclose(diff, bottom[0].diff, rtol=1e-12)
    for mine, theirs in zip(layer.blobs, ref.blobs):
        numpy.testing.assert_allclose(mine.diff, theirs.diff, rtol=1e-12)


def test_dropout_train_in_place():
    layer, out, diff = in_place("Dropout", "", X, phase=caffe_pb2.TRAIN)
    mask = out / X
    numpy.testing.assert_allclose(diff, 1.5 * mask)


def test_absval_refuses_in_place():
    with pytest.raises(DefinitionError, match="in-place"):
        in_place("AbsVal", "", X)


# -- Caffe's own numbers --------------------------------------------------------
def run_reference_case(case_dir, phase, types):
    """Run the layers of `types` from a caffe-reference case by hand and compare every array."""
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    saved = {lp.name: lp.blobs for lp in weights.layer}
    data = numpy.load(case_dir / "data.npz")
    checked = 0
    for lp in net.layer:
        if lp.type not in types:
            continue
        layer = get_layer_class(lp.type, lp.name)(lp, phase=phase, rng=numpy.random.default_rng(0))
        for bp in saved.get(lp.name, []):
            blob = Blob(tuple(bp.shape.dim))
            blob.data[...] = numpy.asarray(bp.data, dtype=numpy.float32).reshape(blob.shape)
            layer.blobs.append(blob)
        blobs = {}
        for name in lp.bottom:
            values = data[f"in/{name}"] if f"in/{name}" in data else data[f"out/{name}"]
            blobs[name] = Blob(values.shape)
            blobs[name].data[...] = values
        bottom = [blobs[n] for n in lp.bottom]
        top = [blobs.setdefault(n, Blob(())) for n in lp.top]
        layer.check_blob_counts(len(bottom), len(top))
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        for name, blob in zip(lp.top, top):
            numpy.testing.assert_allclose(blob.data, data[f"out/{name}"], rtol=1e-4, atol=1e-5,
                                          err_msg=f"{case_dir.name}: top {name}")
            checked += 1
        if not any(f"topdiff/{n}" in data for n in lp.top):
            continue
        for name, blob in zip(lp.top, top):
            blob.diff[...] = data[f"topdiff/{name}"]
        expected = [data.get(f"bottomdiff/{n}", data.get(f"blobdiff/{n}")) for n in lp.bottom]
        if lp.propagate_down:
            propagate = list(lp.propagate_down)
        else:
            propagate = [e is not None for e in expected]
        for p in layer.blobs:
            p.diff[...] = 0
        layer.backward(top, propagate, bottom)
        for name, blob, want, asked in zip(lp.bottom, bottom, expected, propagate):
            if asked and want is not None:
                numpy.testing.assert_allclose(blob.diff, want, rtol=1e-4, atol=1e-5,
                                              err_msg=f"{case_dir.name}: bottom diff {name}")
                checked += 1
        for i, p in enumerate(layer.blobs):
            key = f"paramdiff/{lp.name}/{i}"
            if key in data:
                numpy.testing.assert_allclose(p.diff, data[key], rtol=1e-4, atol=1e-5,
                                              err_msg=f"{case_dir.name}: {key}")
                checked += 1
    return checked


def reference_cases(fixtures, types):
    root = fixtures / "caffe-reference" / "layers"
    manifest = json.loads((root / "manifest.json").read_text())
    return [(root / c["name"], c.get("phase", "TEST")) for c in manifest["cases"] if c["type"] in types]


def test_caffe_reference_cases(fixtures):
    cases = reference_cases(fixtures, NEURON_TYPES)
    assert len(cases) >= 16
    for case_dir, phase_name in cases:
        phase = caffe_pb2.TRAIN if phase_name == "TRAIN" else caffe_pb2.TEST
        assert run_reference_case(case_dir, phase, NEURON_TYPES) >= 1, case_dir.name
