"""Vision layers against numbers real Caffe produced (fixtures caffe-reference/layers/)."""

import json
import os
import pathlib

import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.registry import get_layer_class
from brewnet.netdef import caffe_pb2

MINE = ("conv_", "deconv_", "pool_", "lrn_", "im2col", "spp", "crop")
RTOL, ATOL = 1e-4, 1e-5


def _cases(fixtures):
    manifest = json.loads((fixtures / "caffe-reference/layers/manifest.json").read_text())
    return [c for c in manifest["cases"] if c["name"].startswith(MINE)]


def _blob_array(bp):
    dims = list(bp.shape.dim) if bp.HasField("shape") else [bp.num, bp.channels, bp.height, bp.width]
    values = bp.double_data if len(bp.double_data) else bp.data
    return numpy.asarray(values, dtype=numpy.float32).reshape(dims)


def _run_case(case_dir, phase):
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    (lp,) = [l for l in net.layer if l.type != "Input"]
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    stored = {l.name: l for l in list(weights.layer) + list(weights.layers)}
    data = numpy.load(case_dir / "data.npz")

    layer = get_layer_class(lp.type, lp.name)(lp, phase=phase, rng=numpy.random.default_rng(0))
    if lp.name in stored and len(stored[lp.name].blobs):
        for bp in stored[lp.name].blobs:
            blob = layer.make_blob(_blob_array(bp).shape)
            blob.data[...] = _blob_array(bp)
            layer.blobs.append(blob)
    bottom = []
    for name in lp.bottom:
        x = data[f"in/{name}"]
        b = Blob(x.shape)
        b.data[...] = x
        bottom.append(b)
    top = [Blob(()) for _ in lp.top]
    layer.check_blob_counts(len(bottom), len(top))
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    for name, t in zip(lp.top, top):
        numpy.testing.assert_allclose(t.data, data[f"out/{name}"], rtol=RTOL, atol=ATOL, err_msg=f"top {name}")
    for name, t in zip(lp.top, top):
        t.diff[...] = data[f"topdiff/{name}"]
    for p in layer.blobs:
        p.diff[...] = 0
    propagate = [f"bottomdiff/{name}" in data for name in lp.bottom]
    layer.backward(top, propagate, bottom)
    checked = 0
    for name, b, prop in zip(lp.bottom, bottom, propagate):
        if prop:
            numpy.testing.assert_allclose(b.diff, data[f"bottomdiff/{name}"], rtol=RTOL, atol=ATOL,
                                          err_msg=f"bottom diff {name}")
            checked += 1
    for i, p in enumerate(layer.blobs):
        numpy.testing.assert_allclose(p.diff, data[f"paramdiff/{lp.name}/{i}"], rtol=RTOL, atol=ATOL,
                                      err_msg=f"param diff {i}")
    return checked


def _names_from_env():
    root = os.environ.get("BREWNET_FIXTURES")
    manifest = pathlib.Path(root or "/nonexistent") / "caffe-reference/layers/manifest.json"
    if not manifest.is_file():
        return ["fixtures-unset"]
    return [c["name"] for c in json.loads(manifest.read_text())["cases"] if c["name"].startswith(MINE)]


def test_vision_fixture_cases_present(fixtures):
    assert len(_cases(fixtures)) >= 20


@pytest.mark.parametrize("name", _names_from_env())
def test_vision_case_matches_caffe(fixtures, name):
    (case,) = [c for c in _cases(fixtures) if c["name"] == name]
    phase = caffe_pb2.TRAIN if case.get("phase") == "TRAIN" else caffe_pb2.TEST
    assert _run_case(fixtures / "caffe-reference/layers" / name, phase) >= 1
