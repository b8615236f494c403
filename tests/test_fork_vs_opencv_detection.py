"""brewnet's detection fork layers against a reference that is not ourselves: OpenCV's dnn
module, which reads Caffe fork models (SSD, Fast R-CNN) and implements these layers.

Small nets (Input layers feeding the layer under test, random weights written to a caffemodel)
run in both; the public face detectors of the shared fixtures run end to end; and a
MobileNet-SSD-style net (depthwise convolutions, six PriorBox scales, DetectionOutput) with
random weights runs whole in both. OpenCV's limits decide some cases: its PriorBox takes one
min_size, its Normalize no per-channel scale across space, its Permute wants every axis named, its DetectionOutput ignores eta (the
adaptive NMS of SSD is checked against SSD's algorithm in tests/layers/families/test_detection.py)
and pads its output with zero rows instead of SSD's empty convention.

`python tests/test_fork_vs_opencv_detection.py` prints the max |diff| of every case (docs/FORKS.md).
"""

import os
import pathlib
import sys

import numpy
import pytest

from brewnet.layers.kernels.backend import to_numpy
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2, parse_net

cv2 = pytest.importorskip("cv2") if __name__ != "__main__" else __import__("cv2")

ROOT = pathlib.Path(__file__).resolve().parent.parent
FACES = "real-models/Linzaer+Ultra-Light-Fast-Generic-Face-Detector-1MB"
VAR4 = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"


def inputs(**shapes):
    return "".join(f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
                   f'{" ".join(f"dim: {d}" for d in shape)} }} }} }}\n' for name, shape in shapes.items())


def randomize(net, rng):
    """Weights that keep activations in range: He-scaled filters, BatchNorm statistics with a
    positive variance and a scale factor of 1, Normalize scales near 1."""
    for layer in net.layers:
        for i, blob in enumerate(layer.blobs):
            shape = blob.shape
            if layer.type == "BatchNorm":
                value = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape), numpy.ones(shape)][i]
            elif layer.type in ("Normalize", "Scale") and i == 0:
                value = rng.uniform(0.5, 1.5, shape)
            elif len(shape) > 1:
                value = rng.standard_normal(shape) * numpy.sqrt(2.0 / max(1, int(numpy.prod(shape[1:]))))
            else:
                value = rng.normal(0, 0.1, shape)
            blob.data[...] = numpy.asarray(value, dtype=numpy.float32)


def opencv_caffemodel(path):
    """OpenCV cannot make a Mat of a 0-axis blob (SSD's channel-shared Normalize scale): give those a
    shape of (1,) in the copy OpenCV reads."""
    weights = caffe_pb2.NetParameter.FromString(pathlib.Path(path).read_bytes())
    for layer in weights.layer:
        for blob in layer.blobs:
            if not blob.shape.dim and not blob.num:
                blob.shape.dim.append(1)
    out = str(path) + ".opencv"
    pathlib.Path(out).write_bytes(weights.SerializeToString())
    return out


def run_both(folder, text, feeds, outputs, weights=None, seed=0):
    """{output: (brewnet's array, OpenCV's array)} for the net ``text`` fed ``feeds``; random
    weights unless a caffemodel is given."""
    folder = pathlib.Path(folder)
    proto = folder / "net.prototxt"
    proto.write_text(text)
    net = Net(parse_net(text, path=str(proto)), source=str(proto))
    if weights is None:
        randomize(net, numpy.random.default_rng(seed))
        weights = folder / "net.caffemodel"
        net.save(weights)
    else:
        net.copy_trained_layers_from(str(weights))
    for name, value in feeds.items():
        net.blobs[name].reshape(value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    ocv = cv2.dnn.readNetFromCaffe(str(proto), opencv_caffemodel(weights))
    for name, value in feeds.items():
        ocv.setInput(value, name)
    theirs = ocv.forward(list(outputs))
    return {name: (to_numpy(net.blobs[name].data), numpy.asarray(t)) for name, t in zip(outputs, theirs)}


def detection_rows(mine, theirs):
    """Both detection outputs as rows sorted the same way; OpenCV's zero padding dropped."""
    mine, theirs = mine.reshape(-1, 7), theirs.reshape(-1, 7)
    theirs = theirs[~(theirs == 0).all(axis=1)]
    key = lambda rows: rows[numpy.lexsort(rows.T[::-1])]  # noqa: E731
    return key(mine), key(theirs)


# -- layer by layer --------------------------------------------------------------------------
RNG = numpy.random.default_rng(11)
X = RNG.standard_normal((2, 3, 4, 5)).astype(numpy.float32)
FEATURE = RNG.standard_normal((2, 2, 3, 4)).astype(numpy.float32)
IMAGE = RNG.standard_normal((2, 3, 30, 40)).astype(numpy.float32)
ROIS = numpy.array([[0, 0, 0, 15, 11], [1, 2.4, 3.3, 19, 20], [0, 5, 5, 5, 5], [1, -8, -2, 30, 40],
                    [0, 3, 1, 9, 2]], numpy.float32)
ROI_MAP = RNG.standard_normal((2, 3, 12, 10)).astype(numpy.float32)
PRIOR_SSD = f"min_size: 10 max_size: 20 aspect_ratio: 2 flip: true clip: false {VAR4}"


def _layer(type_name, params, bottoms):
    bottoms = " ".join(f'bottom: "{b}"' for b in bottoms)
    return f'layer {{ name: "out" type: "{type_name}" {bottoms} top: "out" {params} }}\n'



LAYER_CASES = {
    "Permute 0,2,3,1": (inputs(x=X.shape) + _layer("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }", ["x"]), {"x": X}),
    "Permute 0,3,1,2": (inputs(x=X.shape) + _layer("Permute", "permute_param { order: 0 order: 3 order: 1 order: 2 }", ["x"]), {"x": X}),
    "Permute 1,0,3,2": (inputs(x=X.shape) + _layer("Permute", "permute_param { order: 1 order: 0 order: 3 order: 2 }", ["x"]), {"x": X}),
    "Normalize across space, shared": (inputs(x=X.shape) + _layer(
        "Normalize", "norm_param { across_spatial: true channel_shared: true }", ["x"]), {"x": X}),
    "Normalize per position, shared": (inputs(x=X.shape) + _layer(
        "Normalize", "norm_param { across_spatial: false channel_shared: true }", ["x"]), {"x": X}),
    "Normalize per position, per channel": (inputs(x=X.shape) + _layer(
        "Normalize", "norm_param { across_spatial: false channel_shared: false eps: 0.01 }", ["x"]), {"x": X}),
    "PriorBox min+max, ratios 2, flip": (inputs(f=FEATURE.shape, img=IMAGE.shape) + _layer(
        "PriorBox", f"prior_box_param {{ {PRIOR_SSD} }}", ["f", "img"]), {"f": FEATURE, "img": IMAGE}),
    "PriorBox ratios 2,3, clip, step, offset": (inputs(f=FEATURE.shape, img=IMAGE.shape) + _layer(
        "PriorBox", "prior_box_param { min_size: 8 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: true "
        "variance: 0.2 step: 9 offset: 0.3 }", ["f", "img"]), {"f": FEATURE, "img": IMAGE}),
    "PriorBox no flip, step_h/step_w": (inputs(f=FEATURE.shape, img=IMAGE.shape) + _layer(
        "PriorBox", f"prior_box_param {{ min_size: 12 max_size: 30 aspect_ratio: 0.5 flip: false clip: false "
        f"{VAR4} step_h: 7 step_w: 11 }}", ["f", "img"]), {"f": FEATURE, "img": IMAGE}),
    "ROIPooling 2x3, scale 1/2": (inputs(x=ROI_MAP.shape, rois=ROIS.shape) + _layer(
        "ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 3 spatial_scale: 0.5 }", ["x", "rois"]),
        {"x": ROI_MAP, "rois": ROIS}),
    "ROIPooling 7x7, scale 1/16": (inputs(x=ROI_MAP.shape, rois=ROIS.shape) + _layer(
        "ROIPooling", "roi_pooling_param { pooled_h: 7 pooled_w: 7 spatial_scale: 0.0625 }", ["x", "rois"]),
        {"x": ROI_MAP, "rois": ROIS}),
}

# DetectionOutput on PriorBox's priors: 2 images, 4 classes, 48 priors
NUM_PRIORS, NUM_CLASSES = 3 * 4 * 4, 4
DETECTION_CASES = {}
for code in ("CORNER", "CENTER_SIZE"):
    for share in (True, False):
        for tag, params in (("top_k 400, keep 200", "background_label_id: 0 keep_top_k: 200 confidence_threshold: 0.01 "
                                                    "nms_param { nms_threshold: 0.45 top_k: 400 }"),
                            ("keep_top_k 5", "background_label_id: 0 keep_top_k: 5 confidence_threshold: 0.01 "
                                             "nms_param { nms_threshold: 0.45 top_k: 20 }"),
                            ("background 2, threshold 0.3", "background_label_id: 2 keep_top_k: 50 "
                                                            "confidence_threshold: 0.3 nms_param { nms_threshold: 0.3 top_k: 40 }")):
            loc_classes = 1 if share else NUM_CLASSES
            loc = (RNG.standard_normal((2, NUM_PRIORS * loc_classes * 4)) * 0.3).astype(numpy.float32)
            conf = RNG.uniform(0, 1, (2, NUM_PRIORS * NUM_CLASSES)).astype(numpy.float32)
            text = (inputs(f=FEATURE.shape, img=IMAGE.shape, loc=loc.shape, conf=conf.shape)
                    + _layer("PriorBox", f"prior_box_param {{ {PRIOR_SSD} }}", ["f", "img"]).replace('"out"', '"priors"')
                    + "\n" + _layer("DetectionOutput", f"detection_output_param {{ num_classes: {NUM_CLASSES} "
                                    f"share_location: {str(share).lower()} code_type: {code} {params} }}",
                                    ["loc", "conf", "priors"]))
            DETECTION_CASES[f"DetectionOutput {code}, share_location {str(share).lower()}, {tag}"] = (
                text, {"f": FEATURE, "img": IMAGE, "loc": loc, "conf": conf})


def layer_diff(tmp, name):
    text, feeds = LAYER_CASES[name]
    mine, theirs = run_both(tmp, text, feeds, ["out"])["out"]
    assert mine.shape == theirs.shape, f"{name}: shape {mine.shape} vs OpenCV {theirs.shape}"
    return float(numpy.abs(mine - theirs).max())


def detection_diff(tmp, name):
    text, feeds = DETECTION_CASES[name]
    mine, theirs = detection_rows(*run_both(tmp, text, feeds, ["out"])["out"])
    assert len(mine) > 0 and mine.shape == theirs.shape, f"{name}: {len(mine)} detections vs OpenCV's {len(theirs)}"
    return float(numpy.abs(mine - theirs).max())


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_matches_opencv(name, tmp_path):
    assert layer_diff(tmp_path, name) <= 1e-6


@pytest.mark.parametrize("name", sorted(DETECTION_CASES))
def test_detection_output_matches_opencv(name, tmp_path):
    assert detection_diff(tmp_path, name) <= 1e-6


# -- whole models ----------------------------------------------------------------------------------
def _face_model(fixtures, which):
    folder = fixtures / FACES / "caffe/model" / which
    stem = "RFB-320" if which == "RFB-320" else "slim-320"
    ref = next((folder / "refs_opencv").iterdir())
    return folder / f"{stem}.prototxt", folder / f"{stem}.caffemodel", ref


def face_model_diffs(fixtures, which, tmp):
    """max |diff| of boxes and scores vs OpenCV run here and vs OpenCV's stored outputs, and of the
    detections of the net with SSD's head vs OpenCV's DetectionOutput on the same inputs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import ssd_head
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    proto, weights, ref = _face_model(fixtures, which)
    image = numpy.load(ref / "input.npy")
    text = ssd_head.add_ssd_head(proto.read_text(), confidence_threshold=0.3)
    got = run_both(tmp, text, {"input": image}, ["boxes", "scores", "detection_out", "boxes_flat", "scores_flat",
                                                 "priors"], weights=weights)
    diffs = {f"{name} vs OpenCV": float(numpy.abs(got[name][0] - got[name][1]).max()) for name in ("boxes", "scores")}
    for name in ("boxes", "scores"):
        diffs[f"{name} vs stored OpenCV outputs"] = float(numpy.abs(got[name][0] - numpy.load(ref / f"output_{name}.npy")).max())
    # OpenCV's PriorBox takes one min_size (these nets have up to three per scale): its DetectionOutput
    # gets brewnet's priors, and the raw outputs above are compared directly
    head = parse_net(text).layer[-1]
    flat = {name: got[name][0] for name in ("boxes_flat", "scores_flat", "priors")}
    head_text = inputs(**{name: a.shape for name, a in flat.items()}) + str_layer(head)
    (tmp / "head").mkdir()
    head_net = Net(parse_net(head_text), source="head")
    head_net.save(tmp / "head" / "empty.caffemodel")
    mine, theirs = detection_rows(*run_both(tmp / "head", head_text, flat, ["detection_out"],
                                            weights=tmp / "head" / "empty.caffemodel")["detection_out"])
    assert len(mine) > 10 and mine.shape == theirs.shape
    numpy.testing.assert_allclose(mine, got["detection_out"][0].reshape(-1, 7)[numpy.lexsort(
        got["detection_out"][0].reshape(-1, 7).T[::-1])])
    diffs["detections vs OpenCV DetectionOutput"] = float(numpy.abs(mine - theirs).max())
    diffs["faces found"] = len(mine)
    return diffs


def str_layer(layer):
    from google.protobuf import text_format

    return "layer {\n" + text_format.MessageToString(layer) + "}\n"


@pytest.mark.parametrize("which", ["RFB-320", "Slim-320"])
def test_face_detector_end_to_end_matches_opencv(which, fixtures, tmp_path):
    diffs = face_model_diffs(fixtures, which, tmp_path)
    assert diffs["boxes vs OpenCV"] <= 5e-5 and diffs["scores vs OpenCV"] <= 5e-6
    assert diffs["boxes vs stored OpenCV outputs"] <= 5e-5 and diffs["scores vs stored OpenCV outputs"] <= 5e-6
    assert diffs["detections vs OpenCV DetectionOutput"] <= 1e-6


def mobilenet_ssd_style(size=96, width=8, classes=5):
    """A MobileNet-SSD-shaped deploy net, small: 3x3 stem, depthwise-separable blocks (group =
    channels) with BatchNorm, Scale and ReLU, two backbone scales and four extra ones, each with
    1x1 location and confidence heads, Permute, Flatten and a PriorBox (SSD's MobileNet sizes,
    scaled), then Concat, Reshape, Softmax, Flatten and DetectionOutput."""
    out = [inputs(data=(1, 3, size, size))]

    def conv(name, bottom, n, k, stride=1, group=1, bn=True):
        pad = k // 2
        out.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
                   f'num_output: {n} kernel_size: {k} stride: {stride} pad: {pad} group: {group} bias_term: {str(not bn).lower()} }} }}')
        if bn:
            out.append(f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{name}" top: "{name}" }}')
            out.append(f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{name}" top: "{name}" scale_param {{ bias_term: true }} }}')
            out.append(f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        return name

    blob = conv("conv0", "data", width, 3, 2)
    channels = width
    plan = [(2, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1), (16, 2)]
    scales = []
    for i, (mult, stride) in enumerate(plan, 1):
        blob = conv(f"conv{i}/dw", blob, channels, 3, stride, group=channels)
        channels = width * mult
        blob = conv(f"conv{i}", blob, channels, 1)
        if i in (7, 8):
            scales.append((blob, channels))
    for j in range(4):
        blob = conv(f"extra{j}_1", blob, channels // 2, 1)
        blob = conv(f"extra{j}_2", blob, channels, 3, 2)
        scales.append((blob, channels))
    sizes = [(6, None, [2]), (14, 26, [2, 3]), (26, 38, [2, 3]), (38, 50, [2, 3]), (50, 62, [2, 3]), (62, 74, [2, 3])]
    locs, confs, priors = [], [], []
    for k, ((blob, _), (lo, hi, ratios)) in enumerate(zip(scales, sizes)):
        per_cell = 1 + (hi is not None) + 2 * len(ratios)
        for kind, n, names in (("loc", 4 * per_cell, locs), ("conf", classes * per_cell, confs)):
            head = conv(f"head{k}_{kind}", blob, n, 1, bn=False)
            out.append(f'layer {{ name: "{head}_perm" type: "Permute" bottom: "{head}" top: "{head}_perm" '
                       f'permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}')
            out.append(f'layer {{ name: "{head}_flat" type: "Flatten" bottom: "{head}_perm" top: "{head}_flat" }}')
            names.append(f"{head}_flat")
        max_text = f"max_size: {hi} " if hi else ""
        ratio_text = " ".join(f"aspect_ratio: {r}" for r in ratios)
        out.append(f'layer {{ name: "head{k}_priors" type: "PriorBox" bottom: "{blob}" bottom: "data" top: "head{k}_priors" '
                   f'prior_box_param {{ min_size: {lo} {max_text}{ratio_text} flip: true clip: false {VAR4} offset: 0.5 }} }}')
        priors.append(f"head{k}_priors")
    for name, bottoms, axis in (("mbox_loc", locs, 1), ("mbox_conf", confs, 1), ("mbox_priorbox", priors, 2)):
        out.append(f'layer {{ name: "{name}" type: "Concat" {" ".join(f"bottom: {chr(34)}{b}{chr(34)}" for b in bottoms)} '
                   f'top: "{name}" concat_param {{ axis: {axis} }} }}')
    out.append(f'layer {{ name: "conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "conf_reshape" '
               f'reshape_param {{ shape {{ dim: 0 dim: -1 dim: {classes} }} }} }}')
    out.append('layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }')
    out.append('layer { name: "conf_flat" type: "Flatten" bottom: "conf_softmax" top: "conf_flat" }')
    out.append(f'layer {{ name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "conf_flat" '
               f'bottom: "mbox_priorbox" top: "detection_out" detection_output_param {{ num_classes: {classes} '
               f'share_location: true background_label_id: 0 code_type: CENTER_SIZE keep_top_k: 100 '
               f'confidence_threshold: 0.2 nms_param {{ nms_threshold: 0.45 top_k: 100 }} }} }}')
    return "\n".join(out) + "\n"


def mobilenet_ssd_diffs(tmp):
    image = numpy.random.default_rng(3).uniform(-1, 1, (1, 3, 96, 96)).astype(numpy.float32)
    got = run_both(tmp, mobilenet_ssd_style(), {"data": image}, ["mbox_loc", "conf_flat", "mbox_priorbox", "detection_out"],
                   seed=5)
    diffs = {name: float(numpy.abs(got[name][0] - got[name][1]).max()) for name in ("mbox_loc", "conf_flat", "mbox_priorbox")}
    mine, theirs = detection_rows(*got["detection_out"])
    assert len(mine) > 5 and mine.shape == theirs.shape, f"{len(mine)} detections vs OpenCV's {len(theirs)}"
    diffs["detection_out"] = float(numpy.abs(mine - theirs).max())
    diffs["detections"] = len(mine)
    return diffs


def test_mobilenet_ssd_style_net_matches_opencv(tmp_path):
    diffs = mobilenet_ssd_diffs(tmp_path)
    assert diffs["mbox_priorbox"] <= 1e-6 and diffs["conf_flat"] <= 1e-5
    assert diffs["mbox_loc"] <= 1e-4 and diffs["detection_out"] <= 1e-5


FAST_RCNN_STYLE = inputs(data=(1, 3, 32, 40), rois=(6, 5)) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool5" type: "ROIPooling" bottom: "conv2" bottom: "rois" top: "pool5"
  roi_pooling_param { pooled_h: 3 pooled_w: 3 spatial_scale: 0.25 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 16 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score" inner_product_param { num_output: 4 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "fc6" top: "bbox_pred" inner_product_param { num_output: 16 } }
layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }
"""


def fast_rcnn_style_diffs(tmp):
    """A Fast R-CNN-shaped test net (convolutions, ROIPooling of given ROIs, fully connected heads)."""
    rng = numpy.random.default_rng(4)
    corner = rng.uniform(-4, 30, (6, 2))
    rois = numpy.concatenate([numpy.zeros((6, 1)), corner, corner + rng.uniform(2, 24, (6, 2))], axis=1)
    feeds = {"data": rng.uniform(-1, 1, (1, 3, 32, 40)).astype(numpy.float32), "rois": rois.astype(numpy.float32)}
    got = run_both(tmp, FAST_RCNN_STYLE, feeds, ["pool5", "cls_prob", "bbox_pred"], seed=6)
    return {name: float(numpy.abs(mine - theirs).max()) for name, (mine, theirs) in got.items()}


def test_fast_rcnn_style_net_matches_opencv(tmp_path):
    diffs = fast_rcnn_style_diffs(tmp_path)
    assert diffs["pool5"] <= 1e-6 and diffs["cls_prob"] <= 1e-6 and diffs["bbox_pred"] <= 1e-5


if __name__ == "__main__":
    import tempfile

    print(f"OpenCV {cv2.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(sorted(LAYER_CASES) + sorted(DETECTION_CASES)):
            folder = pathlib.Path(tmp) / str(i)
            folder.mkdir()
            diff = layer_diff(folder, name) if name in LAYER_CASES else detection_diff(folder, name)
            print(f"{name:<75} {diff:.3g}")
        folder = pathlib.Path(tmp) / "mobilenet"
        folder.mkdir()
        print("MobileNet-SSD-style (random weights)", mobilenet_ssd_diffs(folder))
        folder = pathlib.Path(tmp) / "fast_rcnn"
        folder.mkdir()
        print("Fast R-CNN-style (random weights)", fast_rcnn_style_diffs(folder))
        fixtures = os.environ.get("BREWNET_FIXTURES")
        if fixtures:
            for which in ("RFB-320", "Slim-320"):
                folder = pathlib.Path(tmp) / which
                folder.mkdir()
                print(which, face_model_diffs(pathlib.Path(fixtures), which, folder))
