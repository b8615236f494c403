"""Every layer case Caffe itself computed: build the whole case net, load
Caffe's weights, forward, backward, and compare every array Caffe wrote
(tops, input and blob gradients, parameter gradients, parameters changed by
forward). See fixtures/README.md, section caffe-reference/layers."""

import json
import os
import pathlib

import numpy
import pytest

from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2, read_net

RTOL, ATOL = 1e-4, 1e-5


def _cases():
    root = os.environ.get("BREWNET_FIXTURES")
    manifest = pathlib.Path(root or "/nonexistent") / "caffe-reference" / "layers" / "manifest.json"
    if not manifest.is_file():
        return [pytest.param(None, id="no-fixtures")]
    cases = json.loads(manifest.read_text())["cases"]
    return [pytest.param(c, id=c["name"]) for c in cases]


def _compare(what, got, want):
    got = to_numpy(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, Caffe has {want.shape}"
    if not numpy.allclose(got, want, rtol=RTOL, atol=ATOL):
        err = numpy.abs(got.astype(numpy.float64) - want)
        worst = numpy.unravel_index(int(numpy.argmax(err)), want.shape) if want.ndim else ()
        raise AssertionError(f"{what}: max abs error {err.max():.3g} at {worst}: "
                             f"brewnet {got[worst]!r} vs Caffe {want[worst]!r}")


def _convolution_cases():
    """The cases whose net has a Convolution layer (oneDNN's kernels may take them)."""
    root = pathlib.Path(os.environ.get("BREWNET_FIXTURES") or "/nonexistent") / "caffe-reference" / "layers"
    return [p for p in _cases() if p.values[0] is None
            or 'type: "Convolution"' in (root / p.values[0]["name"] / "net.prototxt").read_text()]


@pytest.mark.parametrize("case", _cases())
def test_layer_case_matches_caffe(case, fixtures):
    _check_case(case, fixtures)


@pytest.mark.onednn
@pytest.mark.parametrize("case", _convolution_cases())
def test_convolution_case_matches_caffe_with_onednn(case, fixtures):
    from brewnet.layers.kernels import onednn

    if not onednn.available():
        pytest.skip("oneDNN (onednn-cpu-gomp) is not installed")
    net = _check_case(case, fixtures)
    for layer in net.layers:
        cp = layer.param.convolution_param
        if layer.type == "Convolution" and cp.group == 1 and layer.plan.path not in ("1x1",):
            assert layer.plan.path == "onednn", f"{layer.param.name} took {layer.plan.path}"


def _check_case(case, fixtures):
    if case is None:
        pytest.skip("no caffe-reference manifest")
    folder = fixtures / "caffe-reference" / "layers" / case["name"]
    data = numpy.load(folder / "data.npz")
    phase = caffe_pb2.TRAIN if case.get("phase") == "TRAIN" else caffe_pb2.TEST
    net = Net(read_net(folder / "net.prototxt"), phase=phase, source=str(folder / "net.prototxt"))
    net.copy_trained_layers_from(str(folder / "weights.caffemodel"))

    keys = data.files
    for key in keys:
        if key.startswith("in/"):
            name = key[3:]
            blob = net.blobs[name]
            blob.reshape(data[key].shape)
            blob.data[...] = net.xp.asarray(data[key])
    net.forward()
    for key in keys:
        if key.startswith("out/"):
            _compare(key, net.blobs[key[4:]].data, data[key])

    if not any(k.split("/")[0] in ("topdiff", "bottomdiff", "blobdiff", "paramdiff") for k in keys):
        return net  # Caffe ran no backward for this case (e.g. a layer without one)
    for key in keys:
        if key.startswith("topdiff/"):
            net.blobs[key[8:]].diff[...] = net.xp.asarray(data[key])
    net.clear_param_diffs()
    net.backward()
    for key in keys:
        prefix, _, rest = key.partition("/")
        if prefix in ("bottomdiff", "blobdiff"):
            _compare(key, net.blobs[rest].diff, data[key])
        elif prefix in ("paramdiff", "paramafter"):
            layer_name, _, index = rest.rpartition("/")
            blob = net.params[layer_name][int(index)]
            _compare(key, blob.diff if prefix == "paramdiff" else blob.data, data[key])
    return net
