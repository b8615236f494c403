"""Mistakes in a user's files end in one line naming what is wrong, never a traceback
and never a silent success (issue 14's list, each case as it was seen)."""

import logging

import h5py
import numpy
import pytest
from click.testing import CliRunner

from brewnet import netdef
from brewnet.cli import main

DATA = """layer { name: "data" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "list.txt" batch_size: 4 } }"""
NET = DATA + """
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
"""
SOLVER = ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 4 test_iter: 2 test_interval: 2 '
          'snapshot_after_train: false random_seed: 1\n')


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("brewnet: error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = numpy.random.default_rng(0)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data"] = rng.normal(size=(8, 5)).astype(numpy.float32)
        f["label"] = rng.integers(0, 3, 8).astype(numpy.float32)
    (tmp_path / "list.txt").write_text("d.h5\n")
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    return tmp_path


def test_an_unknown_dummydata_filler_is_one_line(folder):
    (folder / "net.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 } '
        'data_filler { type: "no_such_filler" } } }')
    one_line(run("time", "--model", "net.prototxt", "--iterations", 1), "no_such_filler")


def test_an_input_too_large_for_memory_gives_the_figure(folder):
    (folder / "net.prototxt").write_text(
        'layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 2147483647 dim: 16 } } }')
    one_line(run("time", "--model", "net.prototxt", "--iterations", 1), "blob 'd' of shape (2147483647, 16)",
             "needs 128.0 GiB")


@pytest.mark.parametrize("field, text", [("momentum2", 'type: "Adam" momentum2: 2'),
                                         ("momentum", "momentum: 1.5"), ("max_iter", "max_iter: -1"),
                                         ("delta", 'type: "AdaGrad" delta: 0'),
                                         ("rms_decay", 'type: "RMSProp" rms_decay: 1')])
def test_solver_fields_out_of_range_are_one_line(folder, field, text):
    (folder / "solver.prototxt").write_text(SOLVER.replace("max_iter: 4", "") + text + "\n")
    one_line(run("train", "--solver", "solver.prototxt"), f"solver.prototxt: {field} must be")


def test_a_data_source_folder_that_is_not_an_lmdb_says_so(folder):
    (folder / "notadb").mkdir()
    (folder / "net.prototxt").write_text(
        'layer { name: "d" type: "Data" top: "x" top: "y" data_param { source: "notadb" batch_size: 2 '
        'backend: LMDB } }')
    one_line(run("time", "--model", "net.prototxt", "--iterations", 1), "is a folder but not an LMDB")


def test_nan_in_the_test_data_ends_training_with_an_error(folder):
    with h5py.File(folder / "d.h5", "a") as f:
        f["data"][3, 2] = numpy.nan
    line = one_line(run("train", "--solver", "solver.prototxt"), "is not finite")
    assert "training diverged" in line or "test net #0" in line


def test_scoring_nan_weights_is_an_error_not_accuracy_1(folder):
    (folder / "solver.prototxt").write_text(SOLVER.replace("snapshot_after_train: false", 'snapshot_prefix: "w"'))
    assert run("train", "--solver", "solver.prototxt").exit_code == 0
    weights = netdef.read_weights("w_iter_4.caffemodel")
    blob = next(layer for layer in weights.layer if layer.name == "ip").blobs[0]
    blob.data[0] = float("nan")
    netdef.write_weights(weights, "nan.caffemodel")
    one_line(run("test", "--model", "net.prototxt", "--weights", "nan.caffemodel", "--iterations", 2),
             "nan.caffemodel: the weights of layer(s) ip hold NaN or inf values")


def test_weights_that_match_no_layer_are_warned_about(folder, caplog):
    netdef.write_blobproto(numpy.ones((1, 3, 2, 2), numpy.float32), folder / "mean.binaryproto")
    from brewnet.layers.net import Net

    net = Net("net.prototxt", phase=netdef.caffe_pb2.TEST)
    with caplog.at_level(logging.WARNING, logger="brewnet"):
        net.copy_trained_layers_from(str(folder / "mean.binaryproto"))
    assert "nothing was copied" in caplog.text


def test_images_over_the_pixel_limit_are_one_line_in_classify_and_imagedata(folder, monkeypatch):
    from PIL import Image

    from brewnet.layers.dataio import images
    from brewnet.layers.net import Net

    Image.fromarray(numpy.zeros((40, 50, 3), numpy.uint8)).save(folder / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    one_line(run("classify", "--model", "zoo:lenet_mnist", "big.png"), "big.png: image of 50x40 = 0 M pixels")
    (folder / "list.txt").write_text("big.png 0\n")
    (folder / "net.prototxt").write_text('layer { name: "d" type: "ImageData" top: "x" top: "y" '
                                         'image_data_param { source: "list.txt" batch_size: 1 } }')
    with pytest.raises(netdef.DefinitionError, match="big.png: image of 50x40 .* over the limit"):
        Net("net.prototxt", phase=netdef.caffe_pb2.TRAIN).forward()


def test_pillows_own_decompression_bomb_guard_is_one_line_too(folder, monkeypatch):
    from PIL import Image

    from brewnet.layers.dataio import images

    Image.fromarray(numpy.zeros((40, 50, 3), numpy.uint8)).save(folder / "big.png")
    # both limits alike, as by default: over twice Pillow's, Image.open refuses before brewnet looks
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 500)
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    one_line(run("classify", "--model", "zoo:lenet_mnist", "big.png"), "big.png: Image size (2000 pixels) exceeds")
