#!/usr/bin/env python
"""A fork net through brewnet and through OpenCV's dnn module, with the same weights.

  python scripts/fork_models_check.py NET.prototxt [WEIGHTS.caffemodel] [--seed 0]

Without weights, brewnet builds the net and fills every parameter with seeded random values
scaled so that activations keep their size through deep nets (BatchNorm gets plausible
statistics), writes them as a .caffemodel, and OpenCV reads that file with the same prototxt.
It prints, for every output blob, max |brewnet - OpenCV| and that over the blob's max |value|.
Layer types OpenCV does not know under the fork's name are renamed in OpenCV's copy of the
prototxt only (DepthwiseConvolution -> Convolution with group = channels). opencv-python is a
test and benchmark dependency, never one of brewnet's.
"""

import argparse
import pathlib
import sys
import tempfile

import numpy

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def randomize(net, rng):
    """Seeded parameters of a plausible scale: weights ~ N(0, 1/fan_in), BatchNorm statistics
    of a unit-ish variance, Scale near 1."""
    for layer in net.layers:
        blobs = layer.blobs
        if layer.type == "BatchNorm":
            c = blobs[0].data.shape
            blobs[0].data[...] = rng.normal(0, 0.1, c)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, c)
            blobs[2].data[...] = 1
            continue
        for i, blob in enumerate(blobs):
            shape = blob.data.shape
            if layer.type in ("Scale", "BN") and i == 0:
                blob.data[...] = rng.uniform(0.5, 1.5, shape)
            elif len(shape) >= 2:
                fan_in = int(numpy.prod(shape[1:]))
                blob.data[...] = rng.normal(0, (1.0 / max(1, fan_in)) ** 0.5, shape)
            else:
                blob.data[...] = rng.normal(0, 0.1, shape)


def opencv_prototxt(text):
    """The prototxt as OpenCV should read it, where OpenCV's reading differs from the fork's:
    DepthwiseConvolution is spelled ConvolutionDepthwise (OpenCV takes the group from the
    weights' shape), and Axpy's bottoms 1 and 2 trade places: the SENet fork computes
    a * bottom[1] + bottom[2], OpenCV's importer a * bottom[2] + bottom[1]."""
    from google.protobuf import text_format

    from brewnet.netdef import parse_net

    net = parse_net(text)
    for layer in net.layer:
        if layer.type == "DepthwiseConvolution":
            layer.type = "ConvolutionDepthwise"
        elif layer.type == "Axpy" and len(layer.bottom) == 3:
            layer.bottom[1], layer.bottom[2] = layer.bottom[2], layer.bottom[1]
    return text_format.MessageToString(net)


def compare(prototxt_text, inputs=None, weights=None, seed=0, outputs=None):
    """{blob: (max |diff|, max |OpenCV value|)} for the net's outputs (or ``outputs``)."""
    import cv2

    from brewnet.layers.kernels.backend import to_numpy
    from brewnet.layers.net import Net
    from brewnet.netdef import parse_net

    rng = numpy.random.default_rng(seed)
    net = Net(parse_net(prototxt_text))
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp) / "weights.caffemodel"
        if weights:
            net.copy_trained_layers_from(str(weights))
            model = pathlib.Path(weights)
        else:
            randomize(net, rng)
            net.save(model)
        proto = pathlib.Path(tmp) / "net.prototxt"
        proto.write_text(opencv_prototxt(prototxt_text), encoding="utf-8")
        cv_net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    inputs = inputs or {name: rng.standard_normal(net.blobs[name].shape).astype(numpy.float32)
                        for name in net.inputs}
    for name, array in inputs.items():
        net.blobs[name].reshape(array.shape)
        net.blobs[name].data[...] = net.xp.asarray(array)
        cv_net.setInput(array, name)
    net.forward()
    names = list(outputs or net.outputs)
    # OpenCV names a layer's output by the layer; a blob's final value is its last writer's
    writer = {top: layer.name for layer in parse_net(prototxt_text).layer for top in layer.top}
    cv_outs = cv_net.forward([writer.get(name, name) for name in names])
    result = {}
    for name, want in zip(names, cv_outs):
        got = to_numpy(net.blobs[name].data)
        want = numpy.asarray(want).reshape(got.shape)
        result[name] = (float(numpy.abs(got.astype(numpy.float64) - want).max()), float(numpy.abs(want).max()))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prototxt")
    parser.add_argument("weights", nargs="?")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text = pathlib.Path(args.prototxt).read_text(encoding="utf-8")
    for name, (diff, scale) in compare(text, weights=args.weights, seed=args.seed).items():
        print(f"{args.prototxt}: {name}: max |brewnet - OpenCV| {diff:.3g} (max |value| {scale:.3g}, "
              f"relative {diff / max(scale, 1e-30):.3g})")


if __name__ == "__main__":
    main()
