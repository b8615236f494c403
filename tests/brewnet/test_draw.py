"""`brewnet draw` (Caffe's draw_net.py) and brewnet.netdef.draw."""

import pathlib
import shutil

import pytest
from click.testing import CliRunner

from brewnet import netdef
from brewnet.cli import main
from brewnet.netdef import caffe_pb2, draw

ROOT = pathlib.Path(__file__).resolve().parents[2]
CAFFENET = ROOT / "configs" / "caffenet" / "caffenet_train.prototxt"
NET = """name: "small"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "x" batch_size: 64 } }
layer { name: "data" type: "Input" top: "data" include { phase: TEST } input_param { shape { dim: [1, 1, 8, 8] } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 5 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool|{x}" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" exclude { phase: TEST } }
"""


def brewnet(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_dot_text_labels_colours_and_edges():
    net = netdef.parse_net(NET)
    text = draw.net_to_dot(net, display_lrm=True)
    assert text.startswith('digraph "small" {\n  rankdir="LR";')
    assert ('layer2 [label="conv\\n(Convolution)\\nkernel size: 3x5\\nstride: 1\\npad: 0\\nlr mult: 1.0, 2.0", '
            'shape=record, style=filled, fillcolor="#FF5050"];') in text
    assert 'layer3 [label="relu\\n(ReLU)", shape=record, style=filled, fillcolor="#90EE90"];' in text  # in place
    assert 'label="pool\\|\\{x\\}\\n(Pooling AVE)\\nkernel size: global' in text  # record characters escaped
    assert "layer0 -> blob0 [label=\"Batch 64\"];" in text and "layer2 -> blob2 [label=\"4\"];" in text
    assert 'blob0 [label="data", shape=octagon, style=filled, fillcolor="#E0E0E0"];' in text
    # both "data" layers are drawn (caffe.draw merges layers of one name and type only)
    assert text.count('(Data)"') == 1 and text.count('(Input)"') == 1
    vertical = draw.net_to_dot(net, rankdir="TB", phase=caffe_pb2.TEST, label_edges=False)
    assert 'label="conv (Convolution) kernel size: 3x5 stride: 1 pad: 0"' in vertical
    assert "(Data)" not in vertical and "SoftmaxWithLoss" not in vertical and "Batch" not in vertical


def test_draw_writes_dot_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot program to be found
    out = tmp_path / "net.dot"
    result = brewnet("draw", CAFFENET, out, "--phase", "train")
    assert result.exit_code == 0, result.output
    assert result.output == f"Drawing net to {out}\n"
    assert out.read_text().count("shape=record") == 24
    png = brewnet("draw", CAFFENET, tmp_path / "net.png")
    assert png.exit_code == 1
    assert png.output.strip().splitlines()[-1] == ("brewnet: error: drawing PNG needs Graphviz's dot program "
                                                   "(e.g. apt-get install graphviz); a .dot file needs nothing")
    assert not (tmp_path / "net.png").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot")
def test_draw_png_and_svg_with_graphviz(tmp_path):
    result = brewnet("draw", CAFFENET, tmp_path / "net.png", "--rankdir", "TB", "--display_lrm")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "net.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert brewnet("draw", "zoo:lenet_mnist", tmp_path / "lenet.svg").exit_code == 0
    svg = (tmp_path / "lenet.svg").read_text()
    assert "<svg" in svg and "conv1" in svg and "ip2" in svg


def test_draw_errors_are_one_line(tmp_path):
    (tmp_path / "solver.prototxt").write_text('net: "n.prototxt"\nbase_lr: 0.1\n')
    result = brewnet("draw", tmp_path / "solver.prototxt", tmp_path / "x.dot")
    assert result.exit_code == 1
    assert result.output.strip() == f"brewnet: error: {tmp_path / 'solver.prototxt'}: this is a solver; draw one of its nets"
    assert "--rankdir must be one of" in brewnet("draw", CAFFENET, tmp_path / "x.dot", "--rankdir", "XY").output
    assert "give the output file an extension" in brewnet("draw", CAFFENET, tmp_path / "x").output
