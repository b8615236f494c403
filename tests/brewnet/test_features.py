"""`brewnet classify` at classify.py's level (folders, .npy in and out, ten crops, means) and
`brewnet extract_features` (Caffe's tool) to LMDB and HDF5."""

import h5py
import lmdb
import numpy
import pytest
from click.testing import CliRunner
from PIL import Image

from brewnet import netdef
from brewnet.cli import main
from brewnet.layers.dataio.db import DBWriter, array_to_datum
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2

DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: [1, 3, 4, 4] } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def brewnet(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def tiny_model(tmp_path):
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    net = Net(str(tmp_path / "deploy.prototxt"), phase=caffe_pb2.TEST, rng=1)
    netdef.write_weights(net.to_proto(), str(tmp_path / "w.caffemodel"))
    rng = numpy.random.default_rng(0)
    (tmp_path / "images").mkdir()
    pixels = [rng.integers(0, 256, (6, 7, 3), dtype=numpy.uint8) for _ in range(3)]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "images" / f"im{i}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path, net, [p.astype(numpy.float32) / 255 for p in pixels]


def _expected(net, crops, mean=0.0):
    """Softmax outputs of preprocessed HxWx3 [0,1] crops (BGR, x255, - mean), averaged."""
    batch = numpy.stack([c.transpose(2, 0, 1)[::-1] * 255 - mean for c in crops]).astype(numpy.float32)
    net.blobs["data"].reshape(*batch.shape)
    net.reshape()
    net.blobs["data"].data[...] = batch
    net.forward()
    return net.blobs["prob"].data.mean(axis=0)


def test_classify_folder_to_npy_with_ten_crops(tiny_model):
    folder, net, images = tiny_model
    result = brewnet("classify", folder / "images", folder / "out.npy", "--model_def", folder / "deploy.prototxt",
                     "--pretrained_model", folder / "w.caffemodel", "--images_dim", "6,7")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # classify.py's form: the predictions go to the file
    assert "Classifying 3 inputs (ten crops each)." in result.stderr
    predictions = numpy.load(folder / "out.npy")
    assert predictions.shape == (3, 3) and predictions.dtype == numpy.float32
    for image, row in zip(images, predictions):
        corners = [(0, 0), (0, 3), (2, 0), (2, 3), (1, 1)]
        crops = [image[r:r + 4, c:c + 4] for r, c in corners]
        crops += [crop[:, ::-1] for crop in crops]
        numpy.testing.assert_allclose(row, _expected(net, crops), rtol=1e-5)
    # --center_only: one crop; the .npy output named by --output; a resized mean
    numpy.save(folder / "mean.npy", numpy.full((3, 8, 8), 100.0, numpy.float32))
    result = brewnet("classify", folder / "images" / "im1.png", "--model", folder / "deploy.prototxt", "--weights",
                     folder / "w.caffemodel", "--images_dim", "6,7", "--center_only", "--mean_file", folder / "mean.npy",
                     "-o", folder / "one.npy")
    assert result.exit_code == 0, result.output
    numpy.testing.assert_allclose(numpy.load(folder / "one.npy")[0], _expected(net, [images[1][1:5, 1:5]], 100.0),
                                  rtol=1e-5)


def test_classify_npy_input_and_labels(tiny_model):
    folder, net, images = tiny_model
    numpy.save(folder / "in.npy", numpy.stack([im[:4, :4] for im in images]))
    (folder / "labels.txt").write_text("cat\ndog\nbird\n")
    result = brewnet("classify", folder / "in.npy", "--model", folder / "deploy.prototxt", "--weights",
                     folder / "w.caffemodel", "--labels", folder / "labels.txt", "--top-k", "1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{folder / 'in.npy'}[0]" and len(lines) == 6
    best = ["cat", "dog", "bird"][int(_expected(net, [images[0][:4, :4]]).argmax())]
    assert lines[1].split()[:2] == ["1.", best]
    missing = brewnet("classify", folder / "gone", "--model", folder / "deploy.prototxt", "--weights",
                      folder / "w.caffemodel")
    assert missing.exit_code == 1
    assert missing.output.strip() == f"brewnet: error: {folder / 'gone'}: no such image, folder or .npy file"


def test_extract_features_to_lmdb_and_hdf5(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = numpy.random.default_rng(0)
    values = rng.integers(0, 256, (10, 1, 2, 3), dtype=numpy.uint8)
    with DBWriter("in_lmdb") as db:
        for i, v in enumerate(values):
            db.put(b"%08d" % i, array_to_datum(v, i).SerializeToString())
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "Data" top: "data" top: "label" data_param { source: "in_lmdb" backend: LMDB '
        'batch_size: 4 } transform_param { scale: 0.5 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 '
        'weight_filler { type: "gaussian" std: 1 } } }\n')
    net = Net("net.prototxt", phase=caffe_pb2.TEST, rng=3)
    netdef.write_weights(net.to_proto(), "w.caffemodel")
    weights, bias = (b.data.copy() for b in net.params["ip"])
    result = brewnet("extract_features", "w.caffemodel", "net.prototxt", "ip,data", "ip_lmdb,data_lmdb", 3, "LMDB")
    assert result.exit_code == 0, result.output
    assert "Extracted features of 12 query images for feature blob ip" in result.stderr
    with lmdb.open(str(tmp_path / "data_lmdb"), readonly=True) as env, env.begin() as txn:
        first = caffe_pb2.Datum.FromString(txn.get(b"0000000000"))
    assert (first.channels, first.height, first.width) == (1, 2, 3)
    numpy.testing.assert_allclose(first.float_data, values[0].ravel() * 0.5)
    order = [i % 10 for i in range(12)]  # three batches of 4 cycle the 10 records
    expected = values[order].reshape(12, -1).astype(numpy.float32) * 0.5 @ weights.T + bias
    with lmdb.open(str(tmp_path / "ip_lmdb"), readonly=True) as env, env.begin() as txn:
        records = list(txn.cursor())
    assert [k for k, _ in records] == [b"%010d" % i for i in range(12)]
    datums = [caffe_pb2.Datum.FromString(v) for _, v in records]
    assert (datums[0].channels, datums[0].height, datums[0].width) == (2, 1, 1)
    numpy.testing.assert_allclose([list(d.float_data) for d in datums], expected, rtol=1e-5)
    result = brewnet("extract_features", "w.caffemodel", "net.prototxt", "ip", "ip.h5", 2, "hdf5")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "ip.h5", "r") as f:
        numpy.testing.assert_allclose(f["ip"][...], expected[:8], rtol=1e-5)
    again = brewnet("extract_features", "w.caffemodel", "net.prototxt", "ip", "ip.h5", 2, "hdf5")
    assert again.exit_code == 1 and "ip.h5 already exists (use --overwrite to replace it)" in again.output
    wrong = brewnet("extract_features", "w.caffemodel", "net.prototxt", "fc7", "x_lmdb", 1, "lmdb")
    assert wrong.exit_code == 1 and "unknown feature blob name 'fc7' in the network" in wrong.output
