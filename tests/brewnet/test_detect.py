"""`brewnet detect`: an SSD-style net's boxes, labels and scores, printed and drawn."""

import json
import pathlib
import sys

import numpy
import pytest
from click.testing import CliRunner
from PIL import Image

from brewnet.cli import main
from brewnet.layers.net import Net
from brewnet.netdef import parse_net

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
FACES = "real-models/Linzaer+Ultra-Light-Fast-Generic-Face-Detector-1MB"

# one prior (4 x 4 pixels) per pixel; class 1 scores the sum of the pixel's channels, so the
# detections sit on the bright square of the test image
SQUARE_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "loc" type: "Convolution" bottom: "data" top: "loc" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "data" top: "conf" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_soft" type: "Softmax" bottom: "conf_perm" top: "conf_soft" softmax_param { axis: 3 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_soft" top: "conf_flat" }
layer { name: "priors" type: "PriorBox" bottom: "data" bottom: "data" top: "priors"
  prior_box_param { min_size: 4 clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "det" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_flat" bottom: "priors" top: "det"
  detection_output_param { num_classes: 2 background_label_id: 0 code_type: CENTER_SIZE keep_top_k: 50
    confidence_threshold: 0.1 nms_param { nms_threshold: 0.45 top_k: 100 } } }
"""
LABELMAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "thing" label: 1 display_name: "bright thing" }
"""


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def square_model(tmp_path):
    proto = tmp_path / "square.prototxt"
    proto.write_text(SQUARE_NET)
    net = Net(parse_net(SQUARE_NET))
    for blob in net.params["loc"] + net.params["conf"]:
        blob.data[...] = 0
    net.params["conf"][0].data[1] = 1.0  # class 1's logit: r + g + b
    net.save(tmp_path / "square.caffemodel")
    image = numpy.zeros((32, 48, 3), numpy.float32)
    image[8:24, 24:40] = 1.0  # 16 x 16 pixels, right half
    numpy.save(tmp_path / "square.npy", image[None])
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    return tmp_path


def test_detect_finds_the_bright_square_and_draws_it(square_model):
    folder = square_model
    out = folder / "boxes.png"
    result = _run("detect", folder / "square.npy", "--model", folder / "square.prototxt",
                  "--weights", folder / "square.caffemodel", "--labels", folder / "labelmap.prototxt",
                  "--threshold", "0.9", "--draw", out, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    detections = found[0]["detections"]
    assert detections and {d["label"] for d in detections} == {"bright thing"}
    for d in detections:
        x0, y0, x1, y1 = d["box"]  # in the image's pixels (48 x 32), around the square
        assert 24 - 4 <= (x0 + x1) / 2 <= 40 + 4 and 8 - 4 <= (y0 + y1) / 2 <= 24 + 4
        assert d["score"] >= 0.9
    assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
    picture = numpy.asarray(Image.open(out))
    assert picture.shape == (32, 48, 3) and (picture.max(axis=2) != picture.min(axis=2)).any()  # coloured boxes on grey


def test_detect_text_output_and_a_net_without_detections(square_model):
    folder = square_model
    result = _run("detect", folder / "square.npy", "--model", folder / "square.prototxt",
                  "--weights", folder / "square.caffemodel", "--threshold", "0.9")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("detection(s)") and lines[1].split()[0] == "1"
    plain = folder / "plain.prototxt"
    plain.write_text(SQUARE_NET.split('layer { name: "loc_perm"')[0])
    result = _run("detect", folder / "square.npy", "--model", plain, "--weights", folder / "square.caffemodel")
    assert result.exit_code != 0 and "is not SSD's detections" in result.output
    assert "Traceback" not in result.output


def test_detect_faces_with_a_public_model(fixtures, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import ssd_head
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    folder = fixtures / FACES / "caffe/model/Slim-320"
    proto = tmp_path / "slim-320-ssd.prototxt"
    proto.write_text(ssd_head.add_ssd_head((folder / "slim-320.prototxt").read_text()))
    (tmp_path / "labels.txt").write_text("background\nface\n")
    image = fixtures / FACES / "imgs/1.jpg"
    result = _run("detect", image, "--model", proto, "--weights", folder / "slim-320.caffemodel",
                  "--labels", tmp_path / "labels.txt", "--mean-value", "127,127,127", "--input-scale", "0.0078125",
                  "--channel-swap", "0,1,2", "--threshold", "0.7", "--json", "--draw", tmp_path / "faces.png")
    assert result.exit_code == 0, result.output
    detections = json.loads(result.stdout)[0]["detections"]
    width, height = Image.open(image).size
    assert len(detections) >= 40 and {d["label"] for d in detections} == {"face"}  # a class photo
    sides = numpy.array([[d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]] for d in detections])
    assert (sides > 10).all() and (sides < 60).all()  # faces, not the whole picture
    assert Image.open(tmp_path / "faces.png").size == (width, height)


def test_time_runs_an_ssd_deploy_net(square_model):
    # force_backward passes over DetectionOutput (no gradient) and PriorBox gives zeros
    result = _run("time", "--model", square_model / "square.prototxt", "--iterations", "1")
    assert result.exit_code == 0, result.output
    assert "DetectionOutput" in result.output and "Average Forward pass" in result.output
