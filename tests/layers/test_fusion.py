"""layers.fusion: BatchNorm -> Scale [-> ReLU | Clip] chains run as one kernel each way give
the layers' own results (training and partial runs), are found only where Caffe's graph lets
them be, and pass a finite-difference check of their gradient."""

import numpy
import pytest

from brewnet.layers.gradcheck import net_numeric_gradient
from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net, set_random_seed
from brewnet.netdef import caffe_pb2, parse_net

ACTIVATIONS = {
    "relu": 'layer { name: "act" type: "ReLU" bottom: "c" top: "c" }\n',
    "leaky": 'layer { name: "act" type: "ReLU" bottom: "c" top: "c" relu_param { negative_slope: 0.1 } }\n',
    "clip": 'layer { name: "act" type: "Clip" bottom: "c" top: "c" clip_param { min: -0.3 max: 0.5 } }\n',
    "none": "",
}


def chain_net(activation="relu", bn="", scale='bottom: "c" top: "c"', extra="", batch=3):
    return (f'force_backward: true\n'
            f'layer {{ name: "x" type: "Input" top: "x" top: "label" input_param {{ shape {{ dim: {batch} dim: 2 '
            f'dim: 5 dim: 4 }} shape {{ dim: {batch} }} }} }}\n'
            'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 3 '
            'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 } '
            'bias_filler { type: "gaussian" std: 0.5 } } }\n'
            f'layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "c" {bn} }}\n'
            f'layer {{ name: "scale" type: "Scale" {scale} scale_param {{ bias_term: true '
            'filler { type: "gaussian" std: 0.7 } bias_filler { type: "gaussian" std: 0.3 } } }\n'
            + ACTIVATIONS[activation] + extra +
            'layer { name: "ip" type: "InnerProduct" bottom: "c" top: "ip" inner_product_param { num_output: 4 '
            'weight_filler { type: "gaussian" std: 0.5 } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')


def build(text, monkeypatch, fuse, dtype=numpy.float32):
    monkeypatch.setenv("BREWNET_FUSE", "1" if fuse else "0")
    set_random_seed(7)
    net = Net(parse_net(text), dtype=dtype, phase=caffe_pb2.TRAIN)
    rng = numpy.random.default_rng(3)
    net.blobs["x"].data[...] = rng.standard_normal(net.blobs["x"].shape) * 2 + 0.5
    net.blobs["label"].data[...] = rng.integers(0, 4, net.blobs["label"].shape)
    return net


def state(net):
    """Everything a user can read after a pass: blobs, parameters and their diffs."""
    out = {}
    for name, blob in net.blobs.items():
        out[f"blob {name}"] = to_numpy(blob.data).copy()
        out[f"diff {name}"] = to_numpy(blob.diff).copy()
    for name, blobs in net.params.items():
        for k, blob in enumerate(blobs):
            out[f"param {name} {k}"] = to_numpy(blob.data).copy()
            out[f"param diff {name} {k}"] = to_numpy(blob.diff).copy()
    return out


def assert_same(a, b, dtype):
    # atol: gradients that are zero in exact arithmetic (a bias before BatchNorm) are rounding noise
    rtol = 1e-6 if dtype == numpy.float32 else 1e-13
    for key in a:
        scale = max(float(numpy.abs(a[key]).max(initial=0)), 1.0)
        numpy.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=rtol * scale, err_msg=key)


def chains_of(net):
    return [(c.start, c.end) for c in net._chains.values()]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_training_passes_equal_the_layers_own(monkeypatch, activation, dtype):
    text = chain_net(activation)
    results = []
    for fuse in (False, True):
        net = build(text, monkeypatch, fuse, dtype)
        net.clear_param_diffs()
        for _ in range(2):  # two passes, diffs accumulating (iter_size), statistics moving
            net.forward_backward()
        assert net._chains[2].forward_fused == fuse
        results.append(state(net))
    assert_same(*results, dtype)
    assert chains_of(net) == [(2, 4 if activation != "none" else 3)]


def test_the_fused_chain_really_runs_and_keeps_what_each_layer_needs(monkeypatch):
    net = build(chain_net("clip"), monkeypatch, True)
    chain = net._chains[2]
    net.forward()
    assert chain.forward_fused
    # a backward stopping inside the chain runs the layers, from what the fused forward left
    reference = build(chain_net("clip"), monkeypatch, False)
    reference.forward()
    for n in (net, reference):
        n.clear_param_diffs()
        for i in range(len(n.layers) - 1, 2, -1):
            n.backward(start=i, end=i)
    monkeypatch.setenv("BREWNET_FUSE", "1")
    assert_same(state(reference), state(net), numpy.float32)


def test_partial_forward_runs_the_layers_and_backward_follows(monkeypatch):
    results = []
    for fuse in (False, True):
        net = build(chain_net("relu"), monkeypatch, fuse)
        net.forward(end="bn")       # the chain cut short: BatchNorm alone
        net.forward(start="scale")  # and the rest
        net.clear_param_diffs()
        net.backward()
        assert not net._chains[2].forward_fused
        results.append(state(net))
    assert_same(*results, numpy.float32)


def test_hooks_and_debug_info_see_every_layer(monkeypatch):
    net = build(chain_net("relu"), monkeypatch, True)
    seen = []
    net.before_forward_hooks.append(seen.append)
    net.forward()
    assert seen == list(range(len(net.layers)))
    assert not net._chains[2].forward_fused


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_stored_statistics_fused_equal_the_layers_own(monkeypatch, activation, dtype):
    """use_global_stats (a frozen BatchNorm in training, and every TEST net): forward and backward."""
    results = []
    for fuse in (False, True):
        net = build(chain_net(activation, bn="batch_norm_param { use_global_stats: true }"), monkeypatch, fuse,
                    dtype)
        net.layers[2].blobs[0].data[...] = [0.2, -0.4, 0.6]
        net.layers[2].blobs[1].data[...] = [3.0, 1.0, 4.0]
        net.layers[2].blobs[2].data[...] = 2
        net.clear_param_diffs()
        for _ in range(2):
            net.forward_backward()
        assert net._chains[2].forward_fused == fuse
        results.append(state(net))
    assert_same(*results, dtype)


def test_a_test_phase_net_fuses_and_gives_the_layers_outputs(monkeypatch):
    outputs = []
    for fuse in (False, True):
        monkeypatch.setenv("BREWNET_FUSE", "1" if fuse else "0")
        set_random_seed(7)
        net = Net(parse_net(chain_net("clip")), phase=caffe_pb2.TEST)
        net.layers[2].blobs[2].data[...] = 0  # no statistics yet: Caffe's zeros
        net.blobs["x"].data[...] = numpy.random.default_rng(3).standard_normal(net.blobs["x"].shape)
        net.forward()
        assert net._chains[2].forward_fused == fuse
        outputs.append(state(net))
    assert_same(*outputs, numpy.float32)


@pytest.mark.parametrize("text, chains", [
    # Scale out of place: BatchNorm's top is a blob of its own that users read
    (chain_net("none", scale='bottom: "c" top: "s"').replace('bottom: "c" top: "ip"', 'bottom: "s" top: "ip"'), []),
    # a negative slope: the output's sign no longer tells the input's, the activation stays out
    (chain_net("none", extra='layer { name: "act" type: "ReLU" bottom: "c" top: "c" '
                             'relu_param { negative_slope: -0.5 } }\n'), [(2, 3)]),
    # the activation out of place
    (chain_net("none", extra='layer { name: "act" type: "ReLU" bottom: "c" top: "r" }\n')
     .replace('bottom: "c" top: "ip"', 'bottom: "r" top: "ip"'), [(2, 3)]),
    # a loss weight on the chain's blob, which no later layer reads (else a Split carries it)
    (chain_net("none").replace('bottom: "c" top: "c" scale_param', 'bottom: "c" top: "c" loss_weight: 0.5 '
                                                                 'scale_param').split('layer { name: "ip"')[0], []),
    (chain_net("none").replace('bottom: "c" top: "c" scale_param', 'bottom: "c" top: "c" loss_weight: 0.5 '
                                                                 'scale_param'), [(2, 3)]),
])
def test_chains_are_found_only_where_caffe_lets_the_layers_merge(monkeypatch, text, chains):
    net = build(text, monkeypatch, True)
    assert chains_of(net) == chains
    reference = build(text, monkeypatch, False)
    for n in (net, reference):
        n.clear_param_diffs()
        n.forward_backward()
    assert_same(state(reference), state(net), numpy.float32)


@pytest.mark.parametrize("bn", ["", "batch_norm_param { use_global_stats: true }"])
@pytest.mark.parametrize("activation", ["leaky", "clip"])
def test_fused_gradient_matches_finite_differences(monkeypatch, activation, bn):
    net = build(chain_net(activation, bn=bn, batch=2), monkeypatch, True, numpy.float64)
    if bn:
        net.layers[2].blobs[0].data[...] = [0.2, -0.4, 0.6]
        net.layers[2].blobs[1].data[...] = [3.0, 1.0, 4.0]
        net.layers[2].blobs[2].data[...] = 2
    net.clear_param_diffs()
    net.forward_backward()
    assert net._chains[2].forward_fused
    for blob in (net.blobs["x"], net.params["scale"][0], net.params["scale"][1], net.params["conv"][0]):
        analytic = to_numpy(blob.diff).reshape(-1).copy()
        numeric = net_numeric_gradient(net, blob)
        numpy.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-7)


def conv_relu_net(conv, channels, relu="", hw=8):
    return ('force_backward: true\n'
            f'layer {{ name: "x" type: "Input" top: "x" top: "label" input_param {{ shape {{ dim: 2 dim: {channels} '
            f'dim: {hw} dim: {hw} }} shape {{ dim: 2 }} }} }}\n'
            f'layer {{ name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param {{ {conv} '
            'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 } } }\n'
            f'layer {{ name: "relu" type: "ReLU" bottom: "c" top: "c" {relu} }}\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "c" top: "ip" inner_product_param { num_output: 4 '
            'weight_filler { type: "gaussian" std: 0.3 } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')


@pytest.mark.parametrize("conv, channels, path", [
    ("num_output: 6 kernel_size: 1", 4, "1x1"),
    ("num_output: 6 kernel_size: 1 stride: 2", 4, "1x1"),
    ("num_output: 5 kernel_size: 3 pad: 1 stride: 2", 3, "im2col"),
    ("num_output: 16 kernel_size: 3 pad: 1", 16, "winograd"),
    ("num_output: 4 kernel_size: 3 pad: 1 group: 4", 4, "depthwise"),  # no epilogue step: the layers run
])
@pytest.mark.parametrize("relu", ["", "relu_param { negative_slope: 0.2 }"])
def test_convolution_relu_chain_equals_the_layers(monkeypatch, conv, channels, path, relu):
    text = conv_relu_net(conv, channels, relu, hw=12 if path == "winograd" else 8)
    results = []
    for fuse in (False, True):
        net = build(text, monkeypatch, fuse, numpy.float32)
        net.clear_param_diffs()
        for _ in range(2):
            net.forward_backward()
        assert net.layers[1].plan.path == path
        assert chains_of(net) == [(1, 2)]
        assert net._chains[1].forward_fused == (fuse and path != "depthwise")
        results.append(state(net))
    assert_same(*results, numpy.float32)
    for key in results[0]:  # the same operations on the same blocks: equal, not just close
        numpy.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)


@pytest.mark.parametrize("eltwise, fused", [("", True), ("eltwise_param { coeff: 1 coeff: -0.5 }", False),
                                            ("eltwise_param { operation: MAX }", False)])
def test_eltwise_relu_chain_equals_the_layers(monkeypatch, eltwise, fused):
    # a residual sum then a ReLU in place on it (ResNet's block ends): the ReLU runs on each summed
    # range while in cache; a weighted sum or another operation runs the layers
    text = ('force_backward: true\n'
            'layer { name: "x" type: "Input" top: "x" top: "label" input_param { shape { dim: 2 dim: 4 '
            'dim: 8 dim: 8 } shape { dim: 2 } } }\n'
            'layer { name: "a" type: "Convolution" bottom: "x" top: "a" convolution_param { num_output: 4 '
            'kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }\n'
            f'layer {{ name: "sum" type: "Eltwise" bottom: "a" bottom: "x" top: "s" {eltwise} }}\n'
            'layer { name: "relu" type: "ReLU" bottom: "s" top: "s" }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "s" top: "ip" inner_product_param { num_output: 4 '
            'weight_filler { type: "gaussian" std: 0.3 } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    results = []
    for fuse in (False, True):
        net = build(text, monkeypatch, fuse, numpy.float32)
        net.clear_param_diffs()
        for _ in range(2):
            net.forward_backward()
        at = list(net.layer_names).index("sum")  # (after the Split that x's two readers get)
        assert (at, at + 1) in chains_of(net)
        assert net._chains[at].forward_fused == (fuse and fused)
        results.append(state(net))
    for key in results[0]:  # the same operations on the same ranges: equal, not just close
        numpy.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
