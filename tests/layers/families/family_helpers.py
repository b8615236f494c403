"""Helpers shared by the family test files (imported by module name: this folder's
conftest.py puts it on sys.path; tests/layers is not a package).

- ``randn``, ``run``: build one layer by hand, set it up and run its forward.
- Caffe's own numbers (fixtures caffe-reference/layers/), replayed layer by layer with
  no Net: ``check_reference_case`` runs a whole case net of the utility and normalization
  layers (``MY_TYPES``) in float32; ``check_vision_case`` runs the single layer of a
  vision case (conv, pooling, LRN, Im2col, SPP, Crop). Each family's test file replays
  its own cases: ``reference_case_names(family)``, ``vision_case_names(family)``.
"""

import json
import os
import pathlib

import numpy
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.layers.registry import get_layer_class
from brewnet.netdef import caffe_pb2

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
# Caffe's own numbers
# ---------------------------------------------------------------------------
# the cases check_reference_case replays, by layer type, under the family (module of
# brewnet/layers/families/) whose test file replays them
REFERENCE_TYPES = {
    "inner_product": {"InnerProduct", "Embed"},
    "arithmetic": {"Softmax", "Eltwise", "Reduction", "ArgMax"},
    "plumbing": {"Concat", "Slice", "Split", "Flatten", "Reshape", "Filter", "BatchReindex", "Tile"},
    "sources": {"Silence", "Parameter", "Input", "DummyData"},
    "normalization": {"BatchNorm", "Scale", "Bias", "MVN"},
}
MY_TYPES = set().union(*REFERENCE_TYPES.values())

# the cases check_vision_case replays, by case-name prefix, under their family
VISION_PREFIXES = {
    "conv": ("conv_", "deconv_", "im2col"),
    "pooling": ("pool_", "spp"),
    "lrn": ("lrn_",),
    "plumbing": ("crop",),
}
MINE = tuple(prefix for prefixes in VISION_PREFIXES.values() for prefix in prefixes)
RTOL, ATOL = 1e-4, 1e-5


def _manifest_cases(fixtures):
    return json.loads((fixtures / "caffe-reference/layers/manifest.json").read_text())["cases"]


def _fixtures_from_env():
    root = os.environ.get("BREWNET_FIXTURES")
    if not root or not (pathlib.Path(root) / "caffe-reference/layers/manifest.json").is_file():
        return None
    return pathlib.Path(root)


def load_manifest(fixtures, types=MY_TYPES):
    return [c for c in _manifest_cases(fixtures) if c["type"] in types]


def reference_case_names(family):
    """Parametrize values: the check_reference_case cases of ``family``."""
    root = _fixtures_from_env()
    if root is None:
        return ["(no fixtures)"]
    return [c["name"] for c in load_manifest(root, REFERENCE_TYPES[family])]


def vision_cases(fixtures, prefixes=MINE):
    return [c for c in _manifest_cases(fixtures) if c["name"].startswith(prefixes)]


def vision_case_names(family):
    """Parametrize values: the check_vision_case cases of ``family``."""
    root = _fixtures_from_env()
    if root is None:
        return ["fixtures-unset"]
    return [c["name"] for c in vision_cases(root, VISION_PREFIXES[family])]


def blob_array(proto):
    if proto.HasField("shape"):
        shape = tuple(proto.shape.dim)
    else:
        shape = tuple(d for d in (proto.num, proto.channels, proto.height, proto.width))
    values = proto.double_data if len(proto.double_data) else proto.data
    return numpy.array(values, dtype=numpy.float32).reshape(shape)


def _run_reference_case(case_dir, phase):
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    stored = {lp.name: [blob_array(b) for b in lp.blobs] for lp in list(weights.layer) + list(weights.layers)}
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


def check_reference_case(fixtures, case):
    """The body of each family's test_caffe_reference: one case net, by hand, in float32."""
    cases = {c["name"]: c for c in load_manifest(fixtures)}
    assert case in cases, "no utility/normalization cases found in the manifest"
    phase = caffe_pb2.TRAIN if cases[case].get("phase") == "TRAIN" else caffe_pb2.TEST
    checked = _run_reference_case(fixtures / "caffe-reference" / "layers" / case, phase)
    assert checked >= 1


def _run_vision_case(case_dir, phase):
    net = text_format.Parse((case_dir / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    (lp,) = [l for l in net.layer if l.type != "Input"]
    weights = caffe_pb2.NetParameter()
    weights.ParseFromString((case_dir / "weights.caffemodel").read_bytes())
    stored = {l.name: l for l in list(weights.layer) + list(weights.layers)}
    data = numpy.load(case_dir / "data.npz")

    layer = get_layer_class(lp.type, lp.name)(lp, phase=phase, rng=numpy.random.default_rng(0))
    if lp.name in stored and len(stored[lp.name].blobs):
        for bp in stored[lp.name].blobs:
            blob = layer.make_blob(blob_array(bp).shape)
            blob.data[...] = blob_array(bp)
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


def check_vision_case(fixtures, name):
    """The body of each family's test_vision_case_matches_caffe: the case's one layer, by hand."""
    (case,) = [c for c in vision_cases(fixtures) if c["name"] == name]
    phase = caffe_pb2.TRAIN if case.get("phase") == "TRAIN" else caffe_pb2.TEST
    assert _run_vision_case(fixtures / "caffe-reference/layers" / name, phase) >= 1
