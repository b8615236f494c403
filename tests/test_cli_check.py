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
    result = _run("check", path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "BOTTOMS", "->", "TOPS"]
    assert lines[2].split() == ["ip", "InnerProduct", "x", "->", "y"]
    assert lines[-1] == f"{path}: OK: net 'tiny', phase TEST, 3 of 4 layers, 2 blobs"
    result = _run("check", path, "--phase", "train")
    assert result.exit_code == 0 and "train_relu" in result.output and "phase TRAIN, 4 of 4" in result.output


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


def test_check_solver_file_says_so(tmp_path):
    path = _write(tmp_path, 'net: "n.prototxt"\nbase_lr: 0.1\nsolver_type: NESTEROV\n', "solver.prototxt")
    result = _run("check", path)
    assert result.exit_code == 0 and "solver of type Nesterov" in result.output


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
