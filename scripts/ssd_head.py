#!/usr/bin/env python
"""Give a net that ends in raw box regressions and class scores SSD's inference head.

Some public detectors ship their Caffe model without SSD's last layers and decode the boxes in
Python instead: Linzaer's Ultra-Light-Fast-Generic-Face-Detector (RFB-320, slim-320) ends in
"boxes" (1 x P x 4, centre-size offsets) and "scores" (1 x P x 2, softmax). Their priors are
exactly SSD's PriorBox with several min sizes per feature map and the default step
(image size / feature-map size), so appending Flatten, PriorBox, Concat and DetectionOutput
layers makes the net produce SSD's detections itself, and `brewnet detect` can run it:

  python scripts/ssd_head.py slim-320.prototxt slim-320-ssd.prototxt
  brewnet detect IMAGE --model slim-320-ssd.prototxt --weights slim-320.caffemodel \\
      --mean-value 127,127,127 --input-scale 0.0078125 --channel-swap 0,1,2 --draw faces.png

The defaults are the face detector's (min sizes per scale, variances 0.1/0.2, IoU 0.3).
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ULTRAFACE_MIN_SIZES = [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]


def _feature_maps(net, boxes_blob):
    """The blob of each scale whose box branch feeds ``boxes_blob``: for each bottom of the Concat
    that makes it, the input of the Permute above it (a map of the scale's height and width)."""
    producer = {top: layer for layer in net.layer for top in layer.top}
    concat = producer[boxes_blob]
    maps = []
    for bottom in concat.bottom:
        layer = producer[bottom]
        while layer.type != "Permute":
            layer = producer[layer.bottom[0]]
        maps.append(layer.bottom[0])
    return maps


def add_ssd_head(text, boxes="boxes", scores="scores", min_sizes=None, num_classes=2,
                 confidence_threshold=0.5, nms_threshold=0.3, top_k=1000, keep_top_k=750):
    """The prototxt ``text`` with SSD's head appended; its output blob is "detection_out"."""
    from brewnet.netdef import parse_net

    net = parse_net(text)
    image = net.layer[0].top[0] if net.layer and net.layer[0].type == "Input" else net.input[0]
    maps = _feature_maps(net, boxes)
    min_sizes = min_sizes or ULTRAFACE_MIN_SIZES
    if len(min_sizes) != len(maps):
        raise SystemExit(f"{len(maps)} scales feed {boxes!r}, but {len(min_sizes)} lists of min sizes were given")
    layers = []
    for i, (blob, sizes) in enumerate(zip(maps, min_sizes)):
        sizes_text = " ".join(f"min_size: {s}" for s in sizes)
        layers.append(f'layer {{ name: "priorbox{i}" type: "PriorBox" bottom: "{blob}" bottom: "{image}" '
                      f'top: "priorbox{i}" prior_box_param {{ {sizes_text} clip: false '
                      f'variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 offset: 0.5 }} }}')
    priors = " ".join(f'bottom: "priorbox{i}"' for i in range(len(maps)))
    layers += [
        f'layer {{ name: "priors" type: "Concat" {priors} top: "priors" concat_param {{ axis: 2 }} }}',
        f'layer {{ name: "boxes_flat" type: "Flatten" bottom: "{boxes}" top: "boxes_flat" }}',
        f'layer {{ name: "scores_flat" type: "Flatten" bottom: "{scores}" top: "scores_flat" }}',
        f'layer {{ name: "detection_out" type: "DetectionOutput" bottom: "boxes_flat" bottom: "scores_flat" '
        f'bottom: "priors" top: "detection_out" detection_output_param {{ num_classes: {num_classes} '
        f'share_location: true background_label_id: 0 code_type: CENTER_SIZE keep_top_k: {keep_top_k} '
        f'confidence_threshold: {confidence_threshold} '
        f'nms_param {{ nms_threshold: {nms_threshold} top_k: {top_k} }} }} }}',
    ]
    return text.rstrip() + "\n" + "\n".join(layers) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="deploy prototxt ending in boxes and scores")
    parser.add_argument("out", help="where to write the prototxt with SSD's head")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--nms-threshold", type=float, default=0.3)
    args = parser.parse_args()
    text = pathlib.Path(args.source).read_text()
    out = add_ssd_head(text, confidence_threshold=args.confidence_threshold, nms_threshold=args.nms_threshold)
    pathlib.Path(args.out).write_text(out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
