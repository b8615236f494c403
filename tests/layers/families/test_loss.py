"""Loss layers and Accuracy: normalization, labels, and Caffe's own numbers (their gradient
checks are in tests/layers/gradient_cases.py)."""

import importlib.util
import pathlib

import numpy
import pytest

from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.netdef import DefinitionError, caffe_pb2


def _neuron_tests():
    # the caffe-reference harness lives in test_neuron.py (tests/layers is not a package)
    path = pathlib.Path(__file__).with_name("test_neuron.py")
    spec = importlib.util.spec_from_file_location("_brewnet_neuron_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

LOSS_TYPES = {
    "SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "InfogainLoss",
    "MultinomialLogisticLoss", "ContrastiveLoss", "Accuracy",
}
FLT_MIN = float(numpy.finfo(numpy.float32).tiny)

RNG = numpy.random.default_rng(0)
X = RNG.standard_normal((4, 5))
LABELS = numpy.array([0, 3, 4, 3], dtype=float)
X_SPATIAL = RNG.standard_normal((2, 4, 3, 2))
LABELS_SPATIAL = RNG.integers(0, 4, size=(2, 1, 3, 2)).astype(float)
LABELS_SPATIAL[0, 0, 1, 1] = 2  # make sure the ignored value occurs
LABELS_SPATIAL[1, 0, 0, 0] = 2


def layer_text(type_name, params="", bottoms=("x", "label"), tops=("loss",)):
    b = " ".join(f'bottom: "{n}"' for n in bottoms)
    t = " ".join(f'top: "{n}"' for n in tops)
    return f'name: "t" type: "{type_name}" {b} {t} {params}'


def run(text, arrays, n_tops=1, weight=1.0, propagate=None):
    """Forward, then backward with the given loss weight; returns (layer, bottom, top)."""
    layer = make_layer(text)
    bottom, top = setup_layer(layer, arrays, n_tops)
    layer.forward(bottom, top)
    top[0].diff[...] = weight
    if propagate is None:
        propagate = [True] + [False] * (len(arrays) - 1)
    layer.backward(top, propagate, bottom)
    return layer, bottom, top


def softmax(x, axis=1):
    e = numpy.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -- SoftmaxWithLoss semantics --------------------------------------------------
def softmax_loss_reference(x, labels, ignore=None):
    prob = softmax(x)
    lab = labels.reshape(x.shape[0], *x.shape[2:]).astype(int)
    valid = numpy.ones(lab.shape, bool) if ignore is None else lab != ignore
    safe = numpy.where(valid, lab, 0)
    p = numpy.take_along_axis(prob, safe[:, None], axis=1)[:, 0]
    total = -(numpy.log(p) * valid).sum()
    onehot = numpy.arange(x.shape[1])[None, :, None, None] == safe[:, None]
    grad = (prob - onehot) * valid[:, None]
    return total, grad, valid.sum()


@pytest.mark.parametrize(
    "params, divisor",
    [
        ("", "valid"),  # default VALID
        ("loss_param { normalization: VALID }", "valid"),
        ("loss_param { normalization: FULL }", "full"),
        ("loss_param { normalization: BATCH_SIZE }", "batch"),
        ("loss_param { normalization: NONE }", "none"),
        ("loss_param { normalize: true }", "valid"),
        ("loss_param { normalize: false }", "batch"),
        ("loss_param { normalize: false normalization: FULL }", "full"),  # explicit wins
    ],
)
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_normalization(params, divisor, ignore):
    if ignore is not None:
        params = params.replace("loss_param {", f"loss_param {{ ignore_label: {ignore}") if params else \
            f"loss_param {{ ignore_label: {ignore} }}"
    total, grad, valid = softmax_loss_reference(X_SPATIAL, LABELS_SPATIAL, ignore)
    n = {"valid": valid, "full": 2 * 3 * 2, "batch": 2, "none": 1}[divisor]
    _, bottom, top = run(layer_text("SoftmaxWithLoss", params), [X_SPATIAL, LABELS_SPATIAL], weight=0.5)
    numpy.testing.assert_allclose(top[0].data, total / n, rtol=1e-12)
    numpy.testing.assert_allclose(bottom[0].diff, grad * 0.5 / n, rtol=1e-12, atol=1e-15)


def test_softmax_loss_all_ignored_divides_by_one():
    labels = numpy.full(4, 7.0)
    _, bottom, top = run(layer_text("SoftmaxWithLoss", "loss_param { ignore_label: 7 }"), [X, labels])
    assert float(top[0].data) == 0.0
    assert not bottom[0].diff.any()


def test_softmax_loss_second_top_is_probability_and_clamps_at_flt_min():
    x = numpy.array([[0.0, 200.0], [1.0, 2.0]])
    _, _, top = run(layer_text("SoftmaxWithLoss", "", tops=("loss", "prob")), [x, numpy.array([0.0, 1.0])], n_tops=2)
    numpy.testing.assert_allclose(top[1].data, softmax(x), rtol=1e-12)
    want = (-numpy.log(FLT_MIN) - numpy.log(softmax(x)[1, 1])) / 2
    numpy.testing.assert_allclose(top[0].data, want, rtol=1e-12)


def test_softmax_loss_is_a_loss_with_label_rules():
    layer = make_layer(layer_text("SoftmaxWithLoss"))
    assert layer.is_loss
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    with pytest.raises(DefinitionError, match="cannot backpropagate to label"):
        run(layer_text("SoftmaxWithLoss"), [X, LABELS], propagate=[True, True])


def test_labels_out_of_range_and_count_mismatch_are_reported():
    with pytest.raises(DefinitionError, match="label value 5"):
        run(layer_text("SoftmaxWithLoss"), [X, numpy.array([0, 1, 5, 2.0])])
    with pytest.raises(DefinitionError, match="label value -1"):
        run(layer_text("Accuracy", tops=("acc",)), [X, numpy.array([0, -1, 3, 2.0])])
    with pytest.raises(DefinitionError, match="number of labels"):
        run(layer_text("SoftmaxWithLoss"), [X_SPATIAL, numpy.zeros((2, 5))])


def test_softmax_loss_float32():
    layer = make_layer(layer_text("SoftmaxWithLoss"), dtype=numpy.float32)
    bottom, top = setup_layer(layer, [X, LABELS], dtype=numpy.float32)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True, False], bottom)
    assert top[0].data.dtype == numpy.float32 and bottom[0].diff.dtype == numpy.float32


# -- the other losses ------------------------------------------------------------
def test_euclidean_values():
    a, b = X, RNG.standard_normal((4, 5))
    _, bottom, top = run(layer_text("EuclideanLoss", bottoms=("a", "b")), [a, b], weight=3.0, propagate=[True, True])
    numpy.testing.assert_allclose(top[0].data, ((a - b) ** 2).sum() / 8, rtol=1e-12)
    numpy.testing.assert_allclose(bottom[0].diff, 3 * (a - b) / 4, rtol=1e-12)
    numpy.testing.assert_allclose(bottom[1].diff, -3 * (a - b) / 4, rtol=1e-12)
    assert make_layer(layer_text("EuclideanLoss")).allow_force_backward(1)


def test_sigmoid_cross_entropy_values_and_default_batch_normalization():
    x, t = numpy.array([[-800.0, 0.5, 3.0], [2.0, -1.0, 0.0]]), numpy.array([[0.0, 1.0, 0.2], [1.0, 0.3, 0.5]])
    p = 0.5 * numpy.tanh(0.5 * x) + 0.5
    # softplus form of -(t log p + (1 - t) log(1 - p)): finite for x = -800
    terms = numpy.logaddexp(0, x) - t * x
    _, bottom, top = run(layer_text("SigmoidCrossEntropyLoss"), [x, t], weight=2.0)
    numpy.testing.assert_allclose(top[0].data, terms.sum() / 2, rtol=1e-12)
    numpy.testing.assert_allclose(bottom[0].diff, 2 * (p - t) / 2, rtol=1e-12, atol=1e-300)
    # ignore_label with the legacy normalize bool -> VALID
    t2 = t.copy()
    t2[1] = -1
    _, bottom, top = run(layer_text("SigmoidCrossEntropyLoss", "loss_param { ignore_label: -1 normalize: true }"),
                         [x, t2])
    numpy.testing.assert_allclose(top[0].data, terms[0].sum() / 3, rtol=1e-12)
    assert not bottom[0].diff[1].any()


def test_hinge_values():
    x = numpy.array([[0.5, -2.0, 0.3], [1.5, 0.2, -0.9]])
    labels = numpy.array([0.0, 2.0])
    sign = numpy.array([[-1, 1, 1], [1, 1, -1]])
    margin = numpy.maximum(0, 1 + sign * x)
    _, bottom, top = run(layer_text("HingeLoss"), [x, labels], weight=2.0)
    numpy.testing.assert_allclose(top[0].data, margin.sum() / 2)
    numpy.testing.assert_allclose(bottom[0].diff, sign * (margin > 0) * 2 / 2)
    _, bottom, top = run(layer_text("HingeLoss", "hinge_loss_param { norm: L2 }"), [x, labels], weight=2.0)
    numpy.testing.assert_allclose(top[0].data, (margin ** 2).sum() / 2)
    numpy.testing.assert_allclose(bottom[0].diff, sign * margin * 2 * 2 / 2)


def test_multinomial_logistic_values_and_clamp():
    p = numpy.array([[0.2, 0.8], [0.0, 1.0]])
    _, bottom, top = run(layer_text("MultinomialLogisticLoss"), [p, numpy.array([1.0, 0.0])])
    numpy.testing.assert_allclose(top[0].data, (-numpy.log(0.8) - numpy.log(1e-20)) / 2, rtol=1e-6)
    numpy.testing.assert_allclose(bottom[0].diff, [[0, -1 / 0.8 / 2], [-1 / 1e-20 / 2, 0]], rtol=1e-6)
    with pytest.raises(DefinitionError, match="one value per sample"):
        run(layer_text("MultinomialLogisticLoss"), [p, numpy.zeros((2, 2))])


def test_infogain_identity_matches_softmax_loss_and_reads_source(tmp_path):
    softmax_layer, sb, st = run(layer_text("SoftmaxWithLoss"), [X, LABELS])
    _, ib, it = run(layer_text("InfogainLoss", bottoms=("x", "label", "H")), [X, LABELS, numpy.eye(5)])
    numpy.testing.assert_allclose(it[0].data, st[0].data, rtol=1e-12)
    numpy.testing.assert_allclose(ib[0].diff, sb[0].diff, rtol=1e-12, atol=1e-15)
    # the matrix from a BlobProto file, legacy 4-D shape
    h = RNG.random((5, 5))
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=5, width=5)
    proto.data.extend(h.ravel().tolist())
    path = tmp_path / "H.binaryproto"
    path.write_bytes(proto.SerializeToString())
    _, fb, ft = run(layer_text("InfogainLoss", f'infogain_loss_param {{ source: "{path}" }}', tops=("loss", "prob")),
                    [X, LABELS], n_tops=2)
    _, bb, bt = run(layer_text("InfogainLoss", bottoms=("x", "label", "H")), [X, LABELS, h.astype(numpy.float32)])
    numpy.testing.assert_allclose(ft[0].data, bt[0].data, rtol=1e-12)
    numpy.testing.assert_allclose(fb[0].diff, bb[0].diff, rtol=1e-12)
    numpy.testing.assert_allclose(ft[1].data, softmax(X), rtol=1e-12)


def test_infogain_errors(tmp_path):
    with pytest.raises(DefinitionError, match="source"):
        run(layer_text("InfogainLoss"), [X, LABELS])
    with pytest.raises(DefinitionError, match="cannot read"):
        run(layer_text("InfogainLoss", f'infogain_loss_param {{ source: "{tmp_path}/missing" }}'), [X, LABELS])
    with pytest.raises(DefinitionError, match="5x5"):
        run(layer_text("InfogainLoss", bottoms=("x", "label", "H")), [X, LABELS, numpy.eye(4)])
    with pytest.raises(DefinitionError, match="normalize"):
        text = layer_text("InfogainLoss", "loss_param { normalize: true }", ("x", "label", "H"))
        run(text, [X, LABELS, numpy.eye(5)])
    with pytest.raises(DefinitionError, match="label"):
        run(layer_text("InfogainLoss", bottoms=("x", "label", "H")), [X, LABELS, numpy.eye(5)],
            propagate=[True, False, True])


def test_contrastive_values():
    a = numpy.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = numpy.array([[3.0, 4.0], [0.6, 0.8], [0.3, 0.4]])  # distances 5, 1, 0.5
    sim = numpy.array([1.0, 0.0, 0.0])
    text = layer_text("ContrastiveLoss", "contrastive_loss_param { margin: 2 }", ("a", "b", "sim"))
    _, bottom, top = run(text, [a, b, sim])
    numpy.testing.assert_allclose(top[0].data, (25 + 1 + 1.5 ** 2) / 6)
    legacy = text.replace("margin: 2", "margin: 2 legacy_version: true")
    _, bottom, top = run(legacy, [a, b, sim])
    numpy.testing.assert_allclose(top[0].data, (25 + 1 + 1.75) / 6)
    layer = make_layer(text)
    assert layer.allow_force_backward(1) and not layer.allow_force_backward(2)


# -- Accuracy --------------------------------------------------------------------
def test_accuracy_top_k_ignore_and_per_class():
    x = numpy.array([
        [0.1, 0.5, 0.4],   # label 1: top-1 hit
        [0.6, 0.3, 0.1],   # label 1: top-2 hit only
        [0.2, 0.3, 0.5],   # label 0: miss even at top-2
        [0.9, 0.05, 0.05], # label 2: ignored
    ])
    labels = numpy.array([1.0, 1.0, 0.0, 2.0])
    text = layer_text("Accuracy", "accuracy_param { top_k: %d %s }", tops=("acc", "per_class"))
    layer, _, top = run(text % (1, ""), [x, labels], n_tops=2, propagate=[False, False])
    assert not layer.is_loss
    numpy.testing.assert_allclose(top[0].data, 1 / 4)
    numpy.testing.assert_allclose(top[1].data, [0, 1 / 2, 0])
    _, _, top = run(text % (2, "ignore_label: 2"), [x, labels], n_tops=2, propagate=[False, False])
    numpy.testing.assert_allclose(top[0].data, 2 / 3)
    numpy.testing.assert_allclose(top[1].data, [0, 1, 0])
    # ties count against the true class, as in Caffe (>=)
    _, _, top = run(text % (1, ""), [numpy.full((2, 3), 0.5), numpy.array([0.0, 2.0])], n_tops=2,
                    propagate=[False, False])
    assert float(top[0].data) == 0.0


def test_accuracy_axis_and_errors():
    x = RNG.standard_normal((2, 3, 4))  # classes on axis 2
    labels = x.argmax(axis=2).astype(float)
    _, _, top = run(layer_text("Accuracy", "accuracy_param { axis: 2 }", tops=("acc",)), [x, labels],
                    propagate=[False, False])
    assert float(top[0].data) == 1.0
    _, _, top = run(layer_text("Accuracy", "accuracy_param { ignore_label: 3 }", tops=("acc", "per_class")),
                    [X[:2], numpy.array([3.0, 3.0])], n_tops=2, propagate=[False, False])
    assert float(top[0].data) == 0.0 and not top[1].data.any()  # every label ignored
    with pytest.raises(DefinitionError, match="top_k"):
        run(layer_text("Accuracy", "accuracy_param { top_k: 6 }", tops=("acc",)), [X, LABELS])
    layer, bottom, top = run(layer_text("Accuracy", tops=("acc",)), [X, LABELS], propagate=[False, False])
    with pytest.raises(DefinitionError, match=r"\(Accuracy\): has no gradient"):
        layer.backward(top, [True, False], bottom)


# -- Caffe's own numbers --------------------------------------------------------
def test_caffe_reference_cases(fixtures):
    harness = _neuron_tests()
    cases = harness.reference_cases(fixtures, LOSS_TYPES)
    assert len(cases) >= 13
    for case_dir, phase_name in cases:
        phase = caffe_pb2.TRAIN if phase_name == "TRAIN" else caffe_pb2.TEST
        assert harness.run_reference_case(case_dir, phase, LOSS_TYPES) >= 1, case_dir.name
