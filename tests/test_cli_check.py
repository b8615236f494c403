"""`brewnet check` and `brewnet upgrade`."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from brewnet import netdef
from brewnet.cli import main
from brewnet.netdef import caffe_pb2

TYPO = """name: "typo"
layer {
  name: "conv1"
  type: "Convolution"
  convolution_param { num_ouput: 3 }
}
"""


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _needs_types(*types):
    from brewnet.layers.registry import known_types

    missing = set(types) - set(known_types())
    if missing:
        pytest.skip(f"layer types not registered yet: {sorted(missing)}")


def _flat(text):
    """Text with every run of white space one space (table columns without their padding)."""
    return " ".join(text.split())


def _write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_typo_prints_path_line_column_without_traceback(tmp_path):
    path = _write(tmp_path, TYPO)
    result = _run("check", path)
    assert result.exit_code != 0
    assert f"{path}:5:23: unknown field \"num_ouput\" in ConvolutionParameter" in result.output
    assert "did you mean \"num_output\"" in result.output
    assert "Traceback" not in result.output


def test_check_typo_through_the_real_command(tmp_path):
    path = _write(tmp_path, TYPO)
    proc = subprocess.run([sys.executable, "-m", "brewnet", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"brewnet: error: {path}:5:23: unknown field \"num_ouput\" in "
                                   f"ConvolutionParameter (did you mean \"num_output\"?)")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_check_unknown_layer_type(tmp_path):
    path = _write(tmp_path, 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
                            'layer { name: "conv1" type: "Convolutoin" bottom: "x" top: "y" }\n')
    result = _run("check", path)
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "conv1" in line and "Convolutoin" in line and "Traceback" not in line


INPUT = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: [2, 3] } } }\n'


def test_check_good_net_prints_table_and_summary(tmp_path):
    _needs_types("Input", "ReLU", "InnerProduct")
    path = _write(tmp_path, 'name: "tiny"\n' + INPUT +
                  'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }\n'
                  'layer { name: "relu" type: "ReLU" bottom: "y" top: "y" }\n'
                  'layer { name: "train_relu" type: "ReLU" bottom: "y" top: "z" include { phase: TRAIN } }\n')
    result = _run("check", path, "--phase", "test")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{path}: net 'tiny', 4 layers; states: TEST"
    assert lines[2] == "phase TEST: 3 of 4 layers"
    assert lines[3].split() == ["NAME", "TYPE", "BOTTOMS", "->", "TOPS", "OUTPUT", "SHAPES", "PARAMS", "FLOPS",
                                "ACTIVATIONS"]
    # InnerProduct 3 -> 2 on 2 samples: 6 weights + 2 biases; 2 x 2 x 6 multiply-adds + 4 bias adds
    assert lines[5].split() == ["ip", "InnerProduct", "x", "->", "y", "2x2", "8", "28", "16", "B"]
    assert lines[6].split() == ["relu", "ReLU", "y", "->", "y", "2x2", "-", "4", "-"]
    assert "  total: 8 parameters (32 B of weights); forward 16 FLOPs per sample, 32 FLOPs per batch of 2; " \
           "activations 40 B per batch" in lines
    assert "  inference memory at batch 2: about 72 B (weights 32 B, activations 40 B)" in lines
    assert lines[-1] == f"{path}: OK: net 'tiny', phase TEST, 3 of 4 layers, 2 blobs"
    result = _run("check", path)  # every state: TRAIN (with train_relu) and TEST
    assert result.exit_code == 0 and "phase TRAIN, 4 of 4" in result.output and "phase TEST, 3 of 4" in result.output
    assert "  training memory at batch 2: about 208 B (weights, their gradients and 1 solver history blob: 96 B; " \
           "activations and their gradients: 112 B; workspaces not counted)" in result.output


def test_check_explains_every_declared_state_like_mnist_autoencoder(tmp_path):
    """BVLC's mnist_autoencoder: a TRAIN data layer and two TEST data layers, each with its own
    stage; TEST without a stage has no data layer, and that is fine."""
    _needs_types("DummyData", "Flatten", "InnerProduct", "EuclideanLoss")
    data = ('layer {{ name: "data" type: "DummyData" top: "data" include {{ phase: {phase} {stage} }} '
            'dummy_data_param {{ shape {{ dim: [{n}, 1, 2, 2] }} }} }}\n')
    path = _write(tmp_path, 'name: "AE"\n'
                  + data.format(phase="TRAIN", stage="", n=8)
                  + data.format(phase="TEST", stage='stage: "test-on-train"', n=4)
                  + data.format(phase="TEST", stage='stage: "test-on-test"', n=2)
                  + 'layer { name: "flat" type: "Flatten" bottom: "data" top: "flat" }\n'
                    'layer { name: "code" type: "InnerProduct" bottom: "data" top: "code" '
                    'inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }\n'
                    'layer { name: "loss" type: "EuclideanLoss" bottom: "code" bottom: "flat" top: "loss" }\n')
    result = _run("check", path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.splitlines()[0] == (f"{path}: net 'AE', 6 layers; states: TRAIN; TEST (optional); "
                                   f"TEST, stage test-on-train; TEST, stage test-on-test")
    assert "phase TEST: not built (layer 'flat' (#0, Flatten): bottom 'data' is not produced by any earlier " \
           "layer); fine: this file's TEST states name stages" in out
    for label, batch in (("TRAIN", 8), ("TEST, stage test-on-train", 4), ("TEST, stage test-on-test", 2)):
        assert f"{path}: OK: net 'AE', phase {label}, 4 of 6 layers, 4 blobs" in out
        assert f"code InnerProduct data -> code {batch}x4 " in _flat(out)
    # a state the file does not name is an error
    bad = _run("check", path, "--phase", "test")
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "bottom 'data' is not produced" in bad.output


def test_check_reads_sources_without_readers_and_warns_when_missing(tmp_path, monkeypatch):
    import numpy

    from brewnet.layers.dataio.db import DBWriter, array_to_datum

    _needs_types("Data", "InnerProduct", "SoftmaxWithLoss")
    monkeypatch.chdir(tmp_path)
    with DBWriter("train_lmdb") as db:
        for i in range(10):
            db.put(b"%08d" % i, array_to_datum(numpy.zeros((3, 8, 6), numpy.uint8), i % 2).SerializeToString())
    netdef.write_blobproto(numpy.zeros((1, 3, 8, 6), numpy.float32), "mean.binaryproto")
    net = ('layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN } '
           'transform_param { crop_size: 4 mean_file: "mean.binaryproto" } '
           'data_param { source: "train_lmdb" backend: LMDB batch_size: 5 } }\n'
           'layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST } '
           'transform_param { mean_file: "gone.binaryproto" } '
           'data_param { source: "test_lmdb" backend: LMDB batch_size: 2 } }\n'
           'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }\n'
           'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    _write(tmp_path, net, "net.prototxt")
    result = _run("check", "net.prototxt")
    assert result.exit_code == 0, result.output
    out = result.output
    flat = _flat(out)
    # TRAIN: the first record's 3x8x6 cropped to 4x4; 48 inputs x 2 outputs + 2 biases
    assert "d Data -> data label 5x3x4x4, 5 - - 980 B" in flat
    assert "ip InnerProduct data -> ip 5x2 98 970 40 B" in flat
    assert "  layer 'd' reads train_lmdb (LMDB): 10 records of 3x8x6\n" in out
    assert "  layer 'd' reads mean file mean.binaryproto: 3x8x6\n" in out
    # TEST: nothing to read, so no shapes; said so, and the check still passes
    assert f"  warning: layer 'd' (Data): source test_lmdb does not exist (relative to {tmp_path})\n" in out
    assert f"  warning: layer 'd' (Data): mean file gone.binaryproto does not exist (relative to {tmp_path})\n" in out
    assert "ip InnerProduct data -> ip ? ? ? ? (its input shapes are unknown)" in flat
    assert "net.prototxt: OK (3 warnings): net '', phase TEST, 3 of 4 layers, 4 blobs" in out
    assert "prefetch" not in " ".join(t.name for t in __import__("threading").enumerate())


def test_check_solver_follows_its_nets(tmp_path, monkeypatch):
    _needs_types("DummyData", "InnerProduct", "SoftmaxWithLoss")
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, 'name: "n"\nlayer { name: "d" type: "DummyData" top: "x" top: "label" '
                     'dummy_data_param { shape { dim: [4, 3] } shape { dim: [4] } } }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 2 } }\n'
                     'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" '
                     'include { stage: "scored" } }\n', "n.prototxt")
    _write(tmp_path, 'net: "n.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\ntype: "Adam"\nmax_iter: 10\ntest_iter: 3\ntest_interval: 5\n'
                     'train_state { stage: "scored" }\nweights: "zoo:nonesuch"\nsnapshot_prefix: "snaps/run"\n',
           "solver.prototxt")
    result = _run("check", "solver.prototxt")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.splitlines()[:5] == [
        "solver.prototxt: Adam solver, base_lr 0.1, lr_policy fixed, max_iter 10",
        "  train net: n.prototxt (net), phase TRAIN, stage scored",
        "  test net #0: n.prototxt (net), phase TEST, test_iter 3, every 5 iterations",
        "  snapshots: snaps/run_iter_N.caffemodel at the end (the folder snaps is made when training starts)",
        "  warning: weights zoo:nonesuch: unknown zoo model 'nonesuch'" + out.splitlines()[4].split("'nonesuch'")[1]]
    # Adam keeps two history blobs per weight: 8 weights x 4 bytes x (2 + 2)
    assert "weights, their gradients and 2 solver history blobs: 128 B" in out
    assert "n.prototxt: OK: net 'n', phase TRAIN, stage scored, 3 of 3 layers, 4 blobs" in out
    assert "n.prototxt: OK: net 'n', phase TEST, 2 of 3 layers, 3 blobs" in out
    assert out.splitlines()[-1] == "solver.prototxt: OK (1 warning): Adam solver, a train net and 1 test net(s)"
    _write(tmp_path, 'net: "gone.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n', "solver2.prototxt")
    missing = _run("check", "solver2.prototxt")
    assert missing.exit_code == 1 and missing.output.startswith("brewnet: error: solver2.prototxt: net: net file "
                                                                "'gone.prototxt' not found")


def test_check_zoo_model():
    result = _run("check", "zoo:lenet_mnist")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("zoo:lenet_mnist: deploy net ") and first.endswith("(sha1 verified)")
    assert "phase TEST: the same layers as phase TRAIN" in result.output
    assert "ip1 InnerProduct pool2 -> ip1 64x500 400,500 51.2 M 125 KiB" in " ".join(result.output.split())


def test_check_stage_and_level_filter(tmp_path):
    _needs_types("Input", "ReLU")
    path = _write(tmp_path, INPUT + 'layer { name: "deep" type: "ReLU" bottom: "x" top: "d" '
                                    'include { stage: "deploy" min_level: 2 } }\n')
    assert "deep" not in _run("check", path, "--stage", "deploy").output
    result = _run("check", path, "--stage", "deploy", "--level", "2")
    assert result.exit_code == 0 and "deep" in result.output


def test_check_bottom_never_produced(tmp_path):
    _needs_types("Input", "ReLU")
    path = _write(tmp_path, INPUT + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }\n')
    result = _run("check", path)
    assert result.exit_code != 0
    assert result.output.strip() == (f"brewnet: error: {path}: layer 'r' (#1, ReLU): bottom 'nope' "
                                     f"is not produced by any earlier layer")


def test_check_top_produced_twice(tmp_path):
    _needs_types("Input", "ReLU")
    path = _write(tmp_path, INPUT + 'layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
                                    'layer { name: "b" type: "ReLU" bottom: "x" top: "y" }\n')
    result = _run("check", path)
    assert result.exit_code != 0
    assert "layer 'b' (#2, ReLU): top 'y' is already produced by layer 'a'" in result.output


def test_check_blob_counts(tmp_path):
    _needs_types("Input", "ReLU")
    path = _write(tmp_path, INPUT + 'layer { name: "r" type: "ReLU" bottom: "x" bottom: "x" top: "y" }\n')
    result = _run("check", path)
    assert result.exit_code != 0 and "layer 'r' (ReLU): takes 1 bottom blob(s), got 2" in result.output


def test_check_include_and_exclude_error_names_the_file(tmp_path):
    path = _write(tmp_path, 'layer { name: "r" type: "ReLU" include { phase: TEST } exclude { stage: "x" } }\n')
    result = _run("check", path)
    assert result.exit_code != 0
    assert f"{path}: layer 'r': specify either include rules or exclude rules" in result.output


def test_check_missing_file(tmp_path):
    result = _run("check", tmp_path / "none.prototxt")
    assert result.exit_code != 0 and "none.prototxt: no such file" in result.output


def test_check_solver_typo_reports_the_solver_error(tmp_path):
    path = _write(tmp_path, 'net: "n.prototxt"\nbase_lr: 0.1\nmomentun: 0.9\n', "solver.prototxt")
    result = _run("check", path)
    assert result.exit_code != 0
    assert f'{path}:3:1: unknown field "momentun" in SolverParameter (did you mean "momentum"?)' in result.output


V1_TEXT = ('name: "old"\ninput: "data"\ninput_dim: [1, 1, 2, 2]\n'
           'layers { name: "r" type: RELU bottom: "data" top: "r" }\n')


def test_upgrade_v1_text_to_text_and_binary(tmp_path):
    source = _write(tmp_path, V1_TEXT, "old.prototxt")
    result = _run("upgrade", source, tmp_path / "new.prototxt")
    assert result.exit_code == 0, result.output
    new = text_format.Parse((tmp_path / "new.prototxt").read_text(), caffe_pb2.NetParameter())
    assert [(layer.name, layer.type) for layer in new.layer] == [("input", "Input"), ("r", "ReLU")]
    assert not new.layers and not new.input
    assert _run("upgrade", source, tmp_path / "new.caffemodel").exit_code == 0
    assert caffe_pb2.NetParameter.FromString((tmp_path / "new.caffemodel").read_bytes()) == new


def test_upgrade_v1_caffemodel_to_h5_and_binary(fixtures, tmp_path):
    source = fixtures / "real-models/everpeace+caffe/examples/mnist/lenet_iter_10000.caffemodel"
    assert _run("upgrade", source, tmp_path / "lenet.caffemodel").exit_code == 0
    upgraded = caffe_pb2.NetParameter.FromString((tmp_path / "lenet.caffemodel").read_bytes())
    assert not upgraded.layers and upgraded == netdef.read_weights(source)
    assert _run("upgrade", source, tmp_path / "lenet.caffemodel.h5").exit_code == 0
    h5 = netdef.read_weights(tmp_path / "lenet.caffemodel.h5")
    assert {layer.name for layer in h5.layer} == {layer.name for layer in upgraded.layer}


def test_upgrade_solver(tmp_path):
    source = _write(tmp_path, 'net: "n.prototxt"\nbase_lr: 0.01\nsolver_type: ADAM\n', "solver.prototxt")
    result = _run("upgrade", source, tmp_path / "new_solver.prototxt")
    assert result.exit_code == 0 and "solver" in result.output
    solver = text_format.Parse((tmp_path / "new_solver.prototxt").read_text(), caffe_pb2.SolverParameter())
    assert solver.type == "Adam" and not solver.HasField("solver_type") and solver.net == "n.prototxt"
    result = _run("upgrade", source, tmp_path / "solver.h5")
    assert result.exit_code != 0 and "solver cannot be written as HDF5" in result.output
    assert not os.path.exists(tmp_path / "solver.h5")


def test_check_image_list_hdf5_and_python_layers(tmp_path, monkeypatch):
    import h5py
    import numpy
    from PIL import Image

    _needs_types("ImageData", "HDF5Data", "Python", "Concat")
    monkeypatch.chdir(tmp_path)
    Image.fromarray(numpy.zeros((10, 12, 3), numpy.uint8)).save("a.png")
    (tmp_path / "list.txt").write_text("a.png 0\nmissing.png 1\n")
    with h5py.File("d.h5", "w") as f:
        f["x"] = numpy.zeros((7, 5), numpy.float32)
        f["y"] = numpy.zeros((7,), numpy.float32)
    (tmp_path / "h5list.txt").write_text("d.h5\nd.h5\n")
    _write(tmp_path, 'layer { name: "img" type: "ImageData" top: "data" top: "label" '
                     'image_data_param { source: "list.txt" batch_size: 3 } transform_param { crop_size: 8 } }\n'
                     'layer { name: "h5" type: "HDF5Data" top: "x" top: "y" hdf5_data_param { source: "h5list.txt" '
                     'batch_size: 3 } }\n'
                     'layer { name: "py" type: "Python" bottom: "x" top: "z" python_param { module: "m" layer: "L" } }\n'
                     'layer { name: "cat" type: "Concat" bottom: "z" bottom: "x" top: "c" }\n', "net.prototxt")
    result = _run("check", "net.prototxt", "--phase", "train")
    assert result.exit_code == 0, result.output
    flat = _flat(result.output)
    assert "img ImageData -> data label 3x3x8x8, 3" in flat
    assert "h5 HDF5Data -> x y 3x5, 3" in flat
    assert "py Python x -> z ? ? ? ? (a Python layer: check does not run user code)" in flat
    assert "cat Concat z x -> c ? ? ? ? (its input shapes are unknown)" in flat
    assert "layer 'img' reads list.txt: 2 images, the first a.png (3x10x12 as read)" in result.output
    assert "layer 'h5' reads h5list.txt: 2 file(s), 14 rows; x 5, y scalar" in result.output
    assert "warning: layer 'py': a Python layer: check does not run user code" in result.output
