"""The segmentation and mobile fork layers against a reference that is not brewnet: OpenCV's
dnn module (opencv-python-headless, a test-only dependency; skipped without it) reads the same
prototxt and the weights brewnet wrote, and runs the same input.

- every small per-layer net of scripts/fork_models_check.py (LAYER_NETS);
- small whole nets in the style of ShuffleNet v2, MobileNet and SENet;
- a public trained model of the fixtures (Linzaer's Ultra-Light face detector: depthwise
  convolutions as Convolution with group = channels), up to its SSD layers, which are another
  branch's.
Layers OpenCV lacks (Upsample, SegNet's BN, Interp's cropping) are compared with torch in
tests/layers/families/test_segmentation.py.
"""

import json
import pathlib
import re
import sys

import numpy
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import fork_models_check as check
finally:
    sys.path.remove(str(ROOT / "scripts"))

pytest.importorskip("cv2")


def _close(result):
    for name, (diff, scale) in result.items():
        assert diff <= 1e-5 * max(1.0, scale), f"{name}: max |brewnet - OpenCV| {diff:.3g} (max |value| {scale:.3g})"


@pytest.mark.parametrize("label, text", check.LAYER_NETS, ids=[label for label, _ in check.LAYER_NETS])
def test_layer_matches_opencv(label, text):
    result = check.compare('name: "t"\n' + text, outputs=["y"])
    _close(result)
    assert result["y"][1] > 0.1  # a net of zeros would agree with anything


def test_ceil_mode_false_rounds_down():
    from brewnet.layers.net import Net
    from brewnet.netdef import parse_net

    label, text = next(item for item in check.LAYER_NETS if "MAX 3x3 s2 ceil_mode: false" in item[0])
    assert Net(parse_net('name: "t"\n' + text)).blobs["y"].shape == (2, 3, 3, 4)  # ceil would give 4x4
    assert Net(parse_net('name: "t"\n' + text.replace("ceil_mode: false", ""))).blobs["y"].shape == (2, 3, 4, 4)


def _conv_bn(name, bottom, out, kernel=1, stride=1, group_type="Convolution", relu="ReLU"):
    pad = kernel // 2
    text = (f'layer {{ name: "{name}" type: "{group_type}" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            f'num_output: {out} kernel_size: {kernel} stride: {stride} pad: {pad} bias_term: false }} }}\n'
            f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}" }}\n'
            f'layer {{ name: "{name}_scale" type: "Scale" bottom: "{name}" top: "{name}" '
            f'scale_param {{ bias_term: true }} }}\n')
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "{relu}" bottom: "{name}" top: "{name}" }}\n'
    return text


SHUFFLE_UNIT = (check._input("data", 2, 16, 12, 12) +
                'layer { name: "split" type: "Slice" bottom: "data" top: "left" top: "right" '
                'slice_param { slice_point: 8 } }\n' +
                _conv_bn("b1", "right", 8) + _conv_bn("b2", "b1", 8, 3, 1, "ConvolutionDepthwise", None) +
                _conv_bn("b3", "b2", 8) +
                'layer { name: "cat" type: "Concat" bottom: "left" bottom: "b3" top: "cat" }\n'
                'layer { name: "shuffle" type: "ShuffleChannel" bottom: "cat" top: "shuffle" '
                'shuffle_channel_param { group: 2 } }\n'
                'layer { name: "pool" type: "Pooling" bottom: "shuffle" top: "pool" '
                'pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }\n')
MOBILENET = (check._input("data", 1, 3, 33, 33) + _conv_bn("c1", "data", 8, 3, 2, relu="ReLU6") +
             _conv_bn("dw2", "c1", 8, 3, 1, "DepthwiseConvolution", "ReLU6") + _conv_bn("pw2", "dw2", 16) +
             _conv_bn("dw3", "pw2", 16, 3, 2, "DepthwiseConvolution", "ReLU6") + _conv_bn("pw3", "dw3", 24) +
             'layer { name: "up" type: "Interp" bottom: "pw3" top: "up" interp_param { zoom_factor: 4 } }\n')
SE_BLOCK = (check._input("data", 1, 16, 9, 9) + _conv_bn("res", "data", 16, 3) +
            'layer { name: "gap" type: "Pooling" bottom: "res" top: "gap" pooling_param { pool: AVE global_pooling: true } }\n'
            'layer { name: "down" type: "Convolution" bottom: "gap" top: "down" convolution_param { num_output: 4 kernel_size: 1 } }\n'
            'layer { name: "down_relu" type: "ReLU" bottom: "down" top: "down" }\n'
            'layer { name: "up" type: "Convolution" bottom: "down" top: "up" convolution_param { num_output: 16 kernel_size: 1 } }\n'
            'layer { name: "prob" type: "Sigmoid" bottom: "up" top: "up" }\n'
            'layer { name: "axpy" type: "Axpy" bottom: "up" bottom: "res" bottom: "data" top: "out" }\n'
            'layer { name: "out_relu" type: "ReLU" bottom: "out" top: "out" }\n')


@pytest.mark.parametrize("text", [SHUFFLE_UNIT, MOBILENET, SE_BLOCK], ids=["shufflenet-v2-unit", "mobilenet", "se-block"])
def test_small_fork_nets_match_opencv(text):
    result = check.compare('name: "t"\n' + text)
    _close(result)
    assert all(scale > 0.1 for _, scale in result.values())


ULTRAFACE = "real-models/Linzaer+Ultra-Light-Fast-Generic-Face-Detector-1MB/caffe/model"


@pytest.mark.parametrize("model", ["Slim-320", "RFB-320"])
def test_trained_depthwise_model_matches_opencv(model, fixtures):
    """Every blob up to the detection head (Permute belongs to the SSD branch)."""
    import cv2

    from brewnet.layers.kernels.backend import to_numpy
    from brewnet.layers.net import Net
    from brewnet.layers.registry import known_types
    from brewnet.netdef import parse_net

    folder = fixtures / ULTRAFACE / model
    meta_path = next((folder / "refs_opencv").glob("*/meta.json"))
    meta = json.loads(meta_path.read_text())
    # the SSD branch's permute_param may not be in this branch's schema: brewnet does not run those layers here
    text = (folder / meta["prototxt"]).read_text(encoding="utf-8")
    full = parse_net(re.sub(r"permute_param\s*\{[^}]*\}", "", text), str(folder / meta["prototxt"]))
    assert sum(1 for layer in full.layer if layer.type == "Convolution" and layer.convolution_param.group > 1) >= 8
    kept, made = type(full)(), set()
    kept.CopyFrom(full)
    del kept.layer[:]
    for layer in full.layer:
        if layer.type in known_types() and layer.type != "Permute" and set(layer.bottom) <= made:
            kept.layer.add().CopyFrom(layer)
            made.update(layer.top)
    net = Net(kept)
    net.copy_trained_layers_from(str(folder / meta["caffemodel"]))
    data = numpy.load(meta_path.parent / "input.npy").astype(numpy.float32)
    net.blobs["input"].data[...] = data
    net.forward()
    ends = [layer.name for layer in kept.layer if layer.type == "Convolution"
            and any(layer.top[0] in other.bottom and other.type == "Permute" for other in full.layer)]
    assert len(ends) >= 6  # the heads' convolutions
    cv_net = cv2.dnn.readNetFromCaffe(str(folder / meta["prototxt"]), str(folder / meta["caffemodel"]))
    cv_net.setInput(data)
    for name, want in zip(ends, cv_net.forward(ends)):
        got = to_numpy(net.blobs[name].data)
        err = float(numpy.abs(got - want.reshape(got.shape)).max())
        assert err <= 1e-4 * max(1.0, float(numpy.abs(want).max())), f"{model} {name}: max |diff| {err:.3g}"
