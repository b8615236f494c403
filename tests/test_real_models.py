"""Real trained models from public repositories (fixtures/real-models):
every one built from BVLC layers loads (V1 and V2 prototxt, binary and HDF5
weights) and reproduces every blob real Caffe computed for the same input."""

import json
import os
import pathlib

import numpy
import pytest

from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net
from brewnet.netdef import read_net, read_weights

MODELS = "real-models"


def _ref_cases():
    root = pathlib.Path(os.environ.get("BREWNET_FIXTURES") or "/nonexistent") / MODELS
    metas = sorted(root.glob("**/refs_caffe/*/meta.json"))
    if not metas:
        return [pytest.param(None, id="no-fixtures")]
    return [pytest.param(str(m.relative_to(root)), id=m.parent.name) for m in metas]


def _build(folder, meta):
    net = Net(read_net(folder / meta["prototxt"]), source=str(folder / meta["prototxt"]))
    ignored = net.copy_trained_layers_from(str(folder / meta["caffemodel"]))
    return net, ignored


@pytest.mark.parametrize("meta_path", _ref_cases())
def test_model_reproduces_caffe_blobs(meta_path, fixtures):
    if meta_path is None:
        pytest.skip("no real-models fixtures")
    case = fixtures / MODELS / meta_path
    meta = json.loads(case.read_text())
    folder = case.parent.parent.parent
    net, ignored = _build(folder, meta)
    # every layer with parameters got them from the caffemodel, none kept its filler values
    in_file = {layer.name for layer in read_weights(str(folder / meta["caffemodel"])).layer if len(layer.blobs)}
    assert net.params and set(net.params) <= in_file
    assert not set(ignored) & set(net.layer_names)

    data = numpy.load(case.parent / "input.npy")
    assert list(data.shape) == meta["input_shape"]
    blob = net.blobs[meta["input_blob"]]
    blob.reshape(data.shape)
    blob.data[...] = net.xp.asarray(data)
    net.forward()

    refs = numpy.load(case.parent / "blobs.npz")
    missing = [name for name in refs.files if name not in net.blobs]
    assert not missing, f"blobs Caffe has that brewnet's net lacks: {missing}"
    assert set(meta["outputs"]) <= set(net.outputs)
    for name in refs.files:
        want = refs[name]
        got = to_numpy(net.blobs[name].data)
        assert got.shape == want.shape, f"{name}: shape {got.shape} vs Caffe {want.shape}"
        # outputs are small probabilities/regressions: tight; inner blobs scale with their magnitude
        atol = 1e-5 if name in meta["outputs"] else 1e-5 * max(1.0, float(numpy.abs(want).max()))
        err = float(numpy.abs(got.astype(numpy.float64) - want).max()) if want.size else 0.0
        assert numpy.allclose(got, want, rtol=1e-4, atol=atol), f"blob {name}: max abs error {err:.3g}"


ARM = "ARM-software+ML-examples/cmsisnn-cifar10/models"


@pytest.mark.parametrize("which", ["m4", "m7"])
def test_hdf5_weights_load_and_run(which, fixtures):
    import h5py

    folder = fixtures / MODELS / ARM
    net = Net(read_net(folder / f"cifar10_{which}_deploy_generated.prototxt"))
    weights = folder / f"cifar10_{which}_iter_{'70000' if which == 'm4' else '300000'}.caffemodel.h5"
    ignored = net.copy_trained_layers_from(str(weights))
    assert "loss" in ignored  # training-only layers of the file are reported, not fatal
    with h5py.File(weights, "r") as f:
        for layer_name, blobs in net.params.items():
            for k, blob in enumerate(blobs):
                numpy.testing.assert_array_equal(to_numpy(blob.data), f[f"data/{layer_name}/{k}"][...])
    rng = numpy.random.default_rng(0)
    net.blobs["data"].reshape(2, 3, 32, 32)
    net.blobs["data"].data[...] = net.xp.asarray(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(numpy.float32))
    net.forward()
    out = to_numpy(net.blobs[net.outputs[0]].data)
    assert out.shape == (2, 10) and numpy.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("model", ["RFB-320", "Slim-320"])
def test_ssd_permute_model_matches_opencv_outputs(model, fixtures):
    """Permute is a layer of the SSD fork (netdef/forks/ssd.proto): these face detectors load and
    give OpenCV's stored outputs (tests/test_fork_vs_opencv_detection.py runs OpenCV itself)."""
    folder = fixtures / MODELS / "Linzaer+Ultra-Light-Fast-Generic-Face-Detector-1MB/caffe/model" / model
    stem = model if model == "RFB-320" else model.lower()
    net = Net(read_net(folder / f"{stem}.prototxt"))
    net.copy_trained_layers_from(str(folder / f"{stem}.caffemodel"))
    ref = next((folder / "refs_opencv").iterdir())
    net.blobs["input"].data[...] = net.xp.asarray(numpy.load(ref / "input.npy"))
    net.forward()
    for name in ("boxes", "scores"):
        numpy.testing.assert_allclose(to_numpy(net.blobs[name].data), numpy.load(ref / f"output_{name}.npy"),
                                      rtol=1e-4, atol=5e-5)
