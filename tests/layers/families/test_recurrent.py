"""RNN, LSTM and LSTMUnit: Caffe's state semantics and Caffe reference fixtures (their
gradient checks are in tests/layers/gradient_cases.py)."""

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.registry import get_layer_class
from brewnet.netdef import caffe_pb2

T, N, D, H = 3, 2, 3, 4
FILLERS = "weight_filler { type: 'gaussian' std: 0.5 } bias_filler { type: 'gaussian' std: 0.5 }"


def recurrent_layer(kind, expose_hidden=False, seed=0):
    extra = " expose_hidden: true" if expose_hidden else ""
    text = f"name: 'r' type: '{kind}' recurrent_param {{ num_output: {H} {FILLERS}{extra} }}"
    return make_layer(text, seed=seed)


def inputs(expose_hidden, static, n_states, seed=3, x_shape=(T, N, D)):
    rng = numpy.random.default_rng(seed)
    arrays = [rng.uniform(-1, 1, x_shape)]
    # stream 1 restarts in the middle; without exposed state the first step must
    # reset (else h_0 is the previous call's h_T, which the numeric check changes)
    first = 1.0 if expose_hidden else 0.0
    arrays.append(numpy.array([[first, first], [1, 0], [1, 1]]))
    if static:
        arrays.append(rng.uniform(-1, 1, (N, 2, 1)))
    if expose_hidden:
        arrays += [rng.uniform(-1, 1, (1, N, H)) for _ in range(n_states)]
    return arrays


def test_param_shapes_and_order():
    lstm = recurrent_layer("LSTM")
    setup_layer(lstm, inputs(False, True, 2))
    assert [b.shape for b in lstm.blobs] == [(4 * H, D), (4 * H,), (4 * H, 2), (4 * H, H)]
    rnn = recurrent_layer("RNN")
    setup_layer(rnn, inputs(False, True, 1))
    assert [b.shape for b in rnn.blobs] == [(H, D), (H,), (H, 2), (H, H), (H, H), (H,)]
    assert not lstm.allow_force_backward(1) and lstm.allow_force_backward(0)
    unit = make_layer("name: 'u' type: 'LSTMUnit'")
    assert not unit.allow_force_backward(2) and unit.allow_force_backward(1)


def _sig(a):
    return 1 / (1 + numpy.exp(-a))


def test_lstm_forward_by_hand():
    layer = recurrent_layer("LSTM")
    x, cont = inputs(False, False, 2)
    bottom, top = setup_layer(layer, [x, cont])
    layer.forward(bottom, top)
    W_xc, b_c, W_hc = (b.data for b in layer.blobs)
    h, c = numpy.zeros((N, H)), numpy.zeros((N, H))
    for t in range(T):
        z = x[t] @ W_xc.T + b_c + (cont[t][:, None] * h) @ W_hc.T
        i, f, o, g = _sig(z[:, :H]), _sig(z[:, H:2 * H]), _sig(z[:, 2 * H:3 * H]), numpy.tanh(z[:, 3 * H:])
        c = cont[t][:, None] * f * c + i * g
        h = o * numpy.tanh(c)
        numpy.testing.assert_allclose(top[0].data[t], h, rtol=1e-12, atol=1e-12)


def test_rnn_forward_by_hand():
    layer = recurrent_layer("RNN")
    x, cont = inputs(False, False, 1)
    bottom, top = setup_layer(layer, [x, cont])
    layer.forward(bottom, top)
    W_xh, b_h, W_hh, W_ho, b_o = (b.data for b in layer.blobs)
    h = numpy.zeros((N, H))
    for t in range(T):
        h = numpy.tanh(x[t] @ W_xh.T + b_h + (cont[t][:, None] * h) @ W_hh.T)
        numpy.testing.assert_allclose(top[0].data[t], numpy.tanh(h @ W_ho.T + b_o), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,n_states", [("LSTM", 2), ("RNN", 1)])
def test_state_carries_over_between_forwards(kind, n_states):
    # Caffe's TestForward: one call over T steps == T calls of one step each
    # (the state persists between calls), and cont = 0 resets it.
    x, cont = inputs(False, False, n_states)
    cont = numpy.array([[0.0, 0.0], [1, 1], [1, 1]])
    full = recurrent_layer(kind)
    bottom, top = setup_layer(full, [x, cont])
    full.forward(bottom, top)
    whole = top[0].data.copy()

    for reset, expect_equal in ((False, True), (True, False)):
        step = recurrent_layer(kind)
        b, tp = setup_layer(step, [x[:1], cont[:1]])
        for t in range(T):
            b[0].data[...] = x[t:t + 1]
            b[1].data[...] = 0.0 if (reset or t == 0) else 1.0
            step.reshape(b, tp)
            step.forward(b, tp)
            same = numpy.allclose(tp[0].data[0], whole[t], rtol=1e-12, atol=1e-12)
            assert same == (expect_equal or t == 0), (reset, t)


@pytest.mark.parametrize("kind,n_states", [("LSTM", 2), ("RNN", 1)])
def test_exposed_hidden_matches_carried_state(kind, n_states):
    x, cont = inputs(False, False, n_states)
    cont = numpy.ones((T, N))
    carried = recurrent_layer(kind)
    b, tp = setup_layer(carried, [x, cont])
    carried.forward(b, tp)  # first call: state starts at zero
    state = [s.copy() for s in carried._state]
    carried.forward(b, tp)  # second call continues from that state
    exposed = recurrent_layer(kind, expose_hidden=True)
    arrays = [x, cont] + [s[None] for s in state]
    b2, tp2 = setup_layer(exposed, arrays, n_tops=1 + n_states)
    exposed.forward(b2, tp2)
    numpy.testing.assert_allclose(tp2[0].data, tp[0].data, rtol=1e-12)
    # h_T is the last hidden state; for the RNN the output goes through W_ho, so compare state
    numpy.testing.assert_allclose(tp2[1].data[0], carried._state[0], rtol=1e-12)
    if kind == "LSTM":
        numpy.testing.assert_allclose(tp2[1].data[0], tp2[0].data[-1], rtol=1e-12)
        numpy.testing.assert_allclose(tp2[2].data[0], carried._state[1], rtol=1e-12)


def test_float32_stays_float32():
    layer = make_layer(f"name: 'r' type: 'LSTM' recurrent_param {{ num_output: {H} {FILLERS} }}",
                       dtype=numpy.float32)
    arrays = [a.astype(numpy.float32) for a in inputs(False, False, 2)]
    bottom, top = setup_layer(layer, arrays, dtype=numpy.float32)
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True, False], bottom)
    assert top[0].data.dtype == numpy.float32 and bottom[0].diff.dtype == numpy.float32
    assert all(b.diff.dtype == numpy.float32 for b in layer.blobs)


# -- Caffe reference fixtures --------------------------------------------------

def _blob_array(proto):
    dims = list(proto.shape.dim) or [d for d in (proto.num, proto.channels, proto.height, proto.width)]
    values = proto.double_data if len(proto.double_data) else proto.data
    return numpy.asarray(values, dtype=numpy.float32).reshape(dims)


@pytest.mark.parametrize("case", ["lstm", "rnn", "lstm_unit"])
def test_caffe_reference(fixtures, case):
    folder = fixtures / "caffe-reference" / "layers" / case
    net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    (lp,) = [lp for lp in net.layer if lp.type != "Input"]
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((folder / "weights.caffemodel").read_bytes())
    saved = {w.name: w for w in weights.layer}
    data = numpy.load(folder / "data.npz")

    layer = get_layer_class(lp.type, lp.name)(lp, dtype=numpy.float32)
    for proto in saved[lp.name].blobs if lp.name in saved else []:
        blob = Blob(_blob_array(proto).shape, dtype=numpy.float32)
        blob.data[...] = _blob_array(proto)
        layer.blobs.append(blob)
    bottom = []
    for name in lp.bottom:
        array = data[f"in/{name}"]
        blob = Blob(array.shape, dtype=numpy.float32)
        blob.data[...] = array
        bottom.append(blob)
    top = [Blob((), dtype=numpy.float32) for _ in lp.top]
    layer.check_blob_counts(len(bottom), len(top))
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    for name, blob in zip(lp.top, top):
        numpy.testing.assert_allclose(blob.data, data[f"out/{name}"], rtol=1e-4, atol=1e-5, err_msg=name)

    for name, blob in zip(lp.top, top):
        blob.diff[...] = data[f"topdiff/{name}"]
    for p in layer.blobs:
        p.diff[...] = 0
    propagate = [layer.allow_force_backward(i) for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    checked = 0
    for name, blob in zip(lp.bottom, bottom):
        key = f"bottomdiff/{name}"
        if key in data.files:
            numpy.testing.assert_allclose(blob.diff, data[key], rtol=1e-4, atol=1e-5, err_msg=key)
            checked += 1
    for i, p in enumerate(layer.blobs):
        key = f"paramdiff/{lp.name}/{i}"
        numpy.testing.assert_allclose(p.diff, data[key], rtol=1e-4, atol=1e-5, err_msg=key)
        checked += 1
    assert checked == sum(k.startswith(("bottomdiff/", "paramdiff/")) for k in data.files)
