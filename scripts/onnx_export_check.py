#!/usr/bin/env python
"""The one-off ONNX export check on large nets (too slow for CI): export each net, run it in
onnxruntime and in brewnet on the same random inputs, print max |difference| and export time.

  python scripts/onnx_export_check.py                          # LeNet, CIFAR-10-quick, CaffeNet, ResNet-18
  python scripts/onnx_export_check.py --net googlenet=PATH/deploy.prototxt
  python scripts/onnx_export_check.py --only resnet18 --keep out/

Nets without real weights get random ones: He-scaled normal weights, small biases, BatchNorm
statistics with positive variances and a scale factor that is not 1. The ResNet is generated
here (ResNet-18's layout in Caffe's style: in-place BatchNorm + Scale, Eltwise SUM shortcuts,
projection shortcuts, a 3x3/2 max pool with Caffe's ceil rounding, global average pooling).
With BREWNET_FIXTURES set, LeNet's and CIFAR-10-quick's published Caffe weights and the
MTCNN PReLU nets are checked too.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a source checkout runs as it is

from brewnet import onnx_export  # noqa: E402
from brewnet.layers.net import Net  # noqa: E402
from brewnet.netdef import caffe_pb2, parse_net  # noqa: E402


def resnet18_prototxt(batch=2, size=224, classes=1000):
    """ResNet-18 in Caffe's deploy style (He et al.'s published prototxts' conventions)."""
    layers = [f'name: "ResNet-18"\nlayer {{ name: "data" type: "Input" top: "data" '
              f'input_param {{ shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }} }} }}']

    def conv_bn(name, bottom, out, k, s, p, relu=True):
        layers.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                      f'convolution_param {{ num_output: {out} kernel_size: {k} stride: {s} pad: {p} '
                      f'bias_term: false }} }}')
        layers.append(f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" top: "{name}" '
                      f'batch_norm_param {{ use_global_stats: true }} }}')
        layers.append(f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" top: "{name}" '
                      f'scale_param {{ bias_term: true }} }}')
        if relu:
            layers.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}')
        return name

    x = conv_bn("conv1", "data", 64, 7, 2, 3)
    layers.append('layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
                  'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }')
    x, channels = "pool1", 64
    for stage, width in enumerate((64, 128, 256, 512), start=2):
        for block in "ab":
            stride = 2 if block == "a" and stage > 2 else 1
            name = f"res{stage}{block}"
            shortcut = x
            if stride != 1 or width != channels:
                shortcut = conv_bn(f"{name}_branch1", x, width, 1, stride, 0, relu=False)
            y = conv_bn(f"{name}_branch2a", x, width, 3, stride, 1)
            y = conv_bn(f"{name}_branch2b", y, width, 3, 1, 1, relu=False)
            layers.append(f'layer {{ name: "{name}" type: "Eltwise" bottom: "{shortcut}" bottom: "{y}" '
                          f'top: "{name}" }}')
            layers.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            x, channels = name, width
    layers.append(f'layer {{ name: "pool5" type: "Pooling" bottom: "{x}" top: "pool5" '
                  f'pooling_param {{ pool: AVE kernel_size: {size // 32} stride: 1 }} }}')
    layers.append(f'layer {{ name: "fc1000" type: "InnerProduct" bottom: "pool5" top: "fc1000" '
                  f'inner_product_param {{ num_output: {classes} }} }}')
    layers.append('layer { name: "prob" type: "Softmax" bottom: "fc1000" top: "prob" }')
    return "\n".join(layers) + "\n"


def randomize(net, seed=0):
    rng = numpy.random.default_rng(seed)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            factor = rng.uniform(0.5, 2.0)
            mean, var, scale = (b.data for b in layer.blobs)
            mean[...] = rng.standard_normal(mean.shape) * 0.1 * factor
            var[...] = rng.uniform(0.5, 1.5, var.shape) * factor
            scale[...] = factor
            continue
        for k, blob in enumerate(layer.blobs):
            shape = blob.shape
            if k == 0 and len(shape) >= 2:
                std = numpy.sqrt(2.0 / max(1, int(numpy.prod(shape[1:]))))
            else:
                std = 0.1 if layer.type == "Scale" and k == 0 else 0.01
            value = rng.standard_normal(shape) * std
            if layer.type == "Scale" and k == 0:
                value += 1.0
            blob.data[...] = value.astype(numpy.float32)


def caffe_inputs(net, seed):
    """Inputs in Caffe's image scale (pixels minus a mean)."""
    rng = numpy.random.default_rng(seed)
    return {name: (rng.standard_normal(blob.shape) * 50).astype(numpy.float32)
            for name, blob in zip(net.inputs, net.input_blobs)}


def nets(fixtures):
    configs = ROOT / "configs"
    yield "lenet", configs / "lenet/lenet_deploy.prototxt", "zoo:lenet_mnist"
    if fixtures:
        yield ("cifar10_quick", configs / "cifar10_quick/cifar10_quick_deploy.prototxt",
               fixtures / "real-models/everpeace+caffe/examples/cifar10/cifar10_quick_iter_5000.caffemodel")
    else:
        yield "cifar10_quick", configs / "cifar10_quick/cifar10_quick_deploy.prototxt", None
    yield "caffenet", configs / "caffenet/caffenet_deploy.prototxt", None
    yield "resnet18", None, None
    if fixtures:
        folder = fixtures / "real-models/kpzhang93+MTCNN_face_detection_alignment/code/codes/MTCNNv2/model"
        for name in ("det1", "det2", "det3", "det4"):
            yield f"mtcnn_{name}", folder / f"{name}.prototxt", folder / f"{name}.caffemodel"


@click.command()
@click.option("--net", "extra", multiple=True, metavar="NAME=PROTOTXT[:WEIGHTS]",
              help="Another deploy net (random weights unless WEIGHTS is given).")
@click.option("--only", multiple=True, help="Check only these nets (by name).")
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Keep the .onnx files here.")
@click.option("--seed", default=0, show_default=True)
def main(extra, only, keep, seed):
    fixtures = os.environ.get("BREWNET_FIXTURES")
    fixtures = Path(fixtures) if fixtures and Path(fixtures).is_dir() else None
    todo = list(nets(fixtures))
    for spec in extra:
        name, _, rest = spec.partition("=")
        proto, _, weights = rest.partition(":")
        todo.append((name, Path(proto), weights or None))
    if only:
        todo = [t for t in todo if t[0] in only]
    onnx_export.require(check=True)  # imported before the first export is timed
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="onnx_check_"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    click.echo(f"{'net':<14} {'weights':<8} {'inputs':<15} {'max |diff|':>10} {'max |out|':>9} "
               f"{'worst blob (diff / its max)':<36} {'blobs':>5} {'export s':>8} {'nodes':>5} {'MiB':>6}")
    for name, proto, weights in todo:
        if proto is None:
            param = parse_net(resnet18_prototxt(), f"<{name}>")
            net = Net(param, phase=caffe_pb2.TEST, source=f"<{name}>")
        elif weights is not None:
            net, missing = onnx_export.load_net_for_export(str(proto), str(weights))
            if missing:
                raise click.ClickException(f"{name}: {weights} lacks {missing}")
        else:
            net = Net(str(proto), phase=caffe_pb2.TEST)
        if weights is None:
            randomize(net, seed)
        path = folder / f"{name}.onnx"
        model, seconds = onnx_export.timed_export(net, path)
        inputs = caffe_inputs(net, seed + 1)
        start = time.perf_counter()
        result = onnx_export.compare_with_onnxruntime(net, path, inputs, every_blob=True)
        run_s = time.perf_counter() - start
        outputs = [result[o] for o in net.outputs]
        diff, scale = max(d for d, _ in outputs), max(s for _, s in outputs)
        # every blob the graph computes under its name, relative to that blob's largest magnitude
        worst, worst_blob = max((d / max(s, 1e-30), b) for b, (d, s) in result.items())
        shapes = " ".join("x".join(map(str, b.shape)) for b in net.input_blobs)
        size = path.stat().st_size / 2**20
        kind = "random" if weights is None else "trained"
        click.echo(f"{name:<14} {kind:<8} {shapes:<15} {diff:>10.3g} {scale:>9.3g} "
                   f"{f'{worst:.2g} ({worst_blob})':<36} {len(result):>5} {seconds:>8.2f} "
                   f"{len(model.graph.node):>5} {size:>6.1f}   (both runs {run_s:.1f} s)")
        rows.append((name, diff, scale, worst))
    bad = [n for n, d, s, w in rows if not (d <= 1e-4 * max(s, 1e-6) + 1e-6 and w <= 1e-4)]
    if bad:
        raise click.ClickException(f"blobs differ beyond 1e-4 of their scale: {', '.join(bad)}")


if __name__ == "__main__":
    main()
