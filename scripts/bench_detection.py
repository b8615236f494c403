#!/usr/bin/env python
"""Time the detection layers on the sizes real models give them (docs/FORKS.md, Speed).

- DetectionOutput, SSD300 on VOC at its slowest: 8732 priors, 21 classes, confidence 0.01,
  top_k 400, keep_top_k 200, random boxes and softmax scores;
- ROIPooling on VGG16's conv5 for a 600 x 1000 image (1 x 512 x 38 x 63), 300 ROIs, 7 x 7,
  forward and backward, compiled loop and array code (BREWNET_JIT=0's path).

Prints the median of --repeat runs after one untimed run, with the load average.

  python scripts/bench_detection.py [--repeat 5]
"""

import argparse
import pathlib
import sys
import time

import numpy

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_ms(run, repeat):
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def detection_output(repeat):
    from brewnet.layers.gradcheck import make_layer, setup_layer

    rng = numpy.random.default_rng(0)
    priors, classes = 8732, 21
    centre, size = rng.uniform(0, 1, (priors, 2)), rng.uniform(0.05, 0.5, (priors, 2))
    boxes = numpy.concatenate([centre - size / 2, centre + size / 2], axis=1)
    prior = numpy.stack([boxes.reshape(-1), numpy.tile([0.1, 0.1, 0.2, 0.2], priors)])[None]
    logits = rng.standard_normal((priors, classes)) * 2
    conf = (numpy.exp(logits) / numpy.exp(logits).sum(axis=1, keepdims=True)).reshape(1, -1)
    loc = rng.standard_normal((1, priors * 4)) * 0.5
    layer = make_layer('name: "d" type: "DetectionOutput" detection_output_param { num_classes: 21 '
                       'code_type: CENTER_SIZE keep_top_k: 200 confidence_threshold: 0.01 '
                       'nms_param { nms_threshold: 0.45 top_k: 400 } }', dtype=numpy.float32)
    bottom, top = setup_layer(layer, [a.astype(numpy.float32) for a in (loc, conf, prior)], dtype=numpy.float32)

    def run():
        layer.reshape(bottom, top)
        layer.forward(bottom, top)

    return median_ms(run, repeat)


def roi_pooling(repeat, compiled):
    from brewnet.layers.kernels import cpu_kernels
    from brewnet.layers.kernels import detection as kernels

    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((1, 512, 38, 63)).astype(numpy.float32)
    corner = rng.uniform(0, [900, 500], (300, 2))
    far = numpy.minimum(corner + rng.uniform(30, [500, 400], (300, 2)), [999, 599])
    rois = numpy.concatenate([numpy.zeros((300, 1)), corner, far], axis=1).astype(numpy.float32)
    batch = rois[:, 0].astype(numpy.int64)
    mode = cpu_kernels.enabled_for_test() if compiled else cpu_kernels.disabled()
    with mode:
        out, argmax = kernels.roi_pool_forward(numpy, x, rois, 7, 7, 1 / 16)
        dy = numpy.ones_like(out)
        forward = median_ms(lambda: kernels.roi_pool_forward(numpy, x, rois, 7, 7, 1 / 16), repeat)
        backward = median_ms(lambda: kernels.roi_pool_backward(numpy, dy, argmax, batch, x.shape), repeat)
    return forward, backward


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from brewnet.layers.kernels import cpu_kernels

    load = pathlib.Path("/proc/loadavg").read_text().split()[0] if pathlib.Path("/proc/loadavg").exists() else "?"
    print(f"load average {load}")
    print(f"DetectionOutput SSD300 VOC, confidence 0.01: {detection_output(args.repeat):.1f} ms")
    paths = [("compiled", True)] if cpu_kernels.kernels() is not None else []
    for name, compiled in paths + [("array code", False)]:
        forward, backward = roi_pooling(args.repeat, compiled)
        print(f"ROIPooling VGG16 conv5, 300 ROIs, 7x7 ({name}): forward {forward:.0f} ms, backward {backward:.0f} ms")


if __name__ == "__main__":
    main()
