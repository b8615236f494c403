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
    # (it sometimes renames a layer after its top, hence the fallback)
    writer = {top: layer.name for layer in parse_net(prototxt_text).layer for top in layer.top}
    cv_layers = set(cv_net.getLayerNames())
    cv_outs = cv_net.forward([writer[n] if writer.get(n) in cv_layers else n for n in names])
    result = {}
    for name, want in zip(names, cv_outs):
        got = to_numpy(net.blobs[name].data)
        want = numpy.asarray(want).reshape(got.shape)
        result[name] = (float(numpy.abs(got.astype(numpy.float64) - want).max()), float(numpy.abs(want).max()))
    return result


def torch_forward(net_param, net, inputs):
    """An independent forward of a SegNet-style net in torch (test/benchmark only), reading the
    weights from brewnet's net: {blob: array}. Knows only the layer types such nets use."""
    import torch
    import torch.nn.functional as F

    from brewnet.layers.kernels.backend import to_numpy
    from brewnet.netdef import caffe_pb2

    blobs = {name: torch.tensor(array, dtype=torch.float64) for name, array in inputs.items()}
    for layer in net_param.layer:
        if layer.type in ("Input", "Dropout", "Silence"):
            continue
        weights = [torch.tensor(to_numpy(b.data), dtype=torch.float64) for b in net.layer_by_name(layer.name).blobs]
        x = blobs[layer.bottom[0]] if layer.bottom else None
        if layer.type == "Convolution":
            cp = layer.convolution_param
            y = F.conv2d(x, weights[0], weights[1] if cp.bias_term else None, stride=cp.stride[0] if cp.stride else 1,
                         padding=cp.pad[0] if cp.pad else 0, dilation=cp.dilation[0] if cp.dilation else 1,
                         groups=cp.group)
        elif layer.type == "BN":
            scale, shift = (w.reshape(-1) for w in weights)
            if layer.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE:
                y = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
            else:
                y = F.batch_norm(x, None, None, scale, shift, training=True, eps=1e-9)
        elif layer.type == "ReLU":
            y = F.relu(x)
        elif layer.type == "Pooling" and len(layer.top) == 2:  # MAX with its mask, Caffe's ceil rounding
            pp = layer.pooling_param
            y, mask = F.max_pool2d(x, pp.kernel_size, pp.stride, ceil_mode=True, return_indices=True)
            blobs[layer.top[1]] = mask
        elif layer.type == "Upsample":
            up = layer.upsample_param
            size = (up.upsample_h, up.upsample_w) if up.HasField("upsample_h") else \
                (x.shape[2] * up.scale, x.shape[3] * up.scale)
            y = F.max_unpool2d(x, blobs[layer.bottom[1]], up.scale, up.scale, output_size=size)
        elif layer.type == "Softmax":
            y = F.softmax(x, dim=1)
        elif layer.type == "ArgMax":
            y = x.argmax(dim=1, keepdim=True).to(torch.float64)
        else:
            raise SystemExit(f"torch_forward: layer type {layer.type} is not in its list")
        blobs[layer.top[0]] = y
    return {name: value.numpy() for name, value in blobs.items()}


def compare_torch(prototxt_text, seed=0, skip_types=("ArgMax",)):
    """{blob: (max |diff|, max |torch value|)} of the outputs of brewnet's forward against
    torch_forward's, both in float64, with seeded random weights."""
    from brewnet.layers.kernels.backend import to_numpy
    from brewnet.layers.net import Net
    from brewnet.netdef import parse_net

    rng = numpy.random.default_rng(seed)
    net_param = parse_net(prototxt_text)
    kept = [layer for layer in net_param.layer if layer.type not in skip_types]
    del net_param.layer[:]
    net_param.layer.extend(kept)
    # float64 on both sides: in float32 a near-tie in a max pooling window may pick the other
    # maximum, and Upsample then puts its value elsewhere (a true difference of the precisions)
    net = Net(net_param, dtype=numpy.float64)
    randomize(net, rng)
    inputs = {name: rng.standard_normal(net.blobs[name].shape) for name in net.inputs}
    for name, array in inputs.items():
        net.blobs[name].data[...] = array
    net.forward()
    want = torch_forward(net.to_proto(), net, inputs)
    result = {}
    for name in net.outputs:
        got = to_numpy(net.blobs[name].data)
        result[name] = (float(numpy.abs(got - want[name]).max()), float(numpy.abs(want[name]).max()))
    return result


def _input(name, *dims):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


FILLERS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 }'
# (label, small net) of every fork layer of this branch that OpenCV runs; ``compare`` fills the weights
LAYER_NETS = [
    ("ShuffleChannel group 3", _input("x", 2, 6, 4, 5) +
     'layer { name: "s" type: "ShuffleChannel" bottom: "x" top: "y" shuffle_channel_param { group: 3 } }'),
    ("DepthwiseConvolution 3x3 s2", _input("x", 2, 8, 9, 10) +
     'layer { name: "d" type: "DepthwiseConvolution" bottom: "x" top: "y" convolution_param { num_output: 8 '
     f'kernel_size: 3 stride: 2 pad: 1 {FILLERS} }} }}'),
    ("ConvolutionDepthwise 3x3", _input("x", 2, 8, 9, 10) +
     'layer { name: "d" type: "ConvolutionDepthwise" bottom: "x" top: "y" convolution_param { num_output: 8 '
     f'kernel_size: 3 pad: 1 {FILLERS} }} }}'),
    ("Convolution group = channels, 2 outputs each, dilation 2", _input("x", 2, 4, 11, 9) +
     'layer { name: "d" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 8 group: 4 '
     f'kernel_size: 3 pad: 2 dilation: 2 {FILLERS} }} }}'),
    # batch 1: OpenCV's Scale (its Axpy is Scale + Eltwise) takes a 4-D scale only so
    ("Axpy (SE block)", _input("x", 1, 6, 5, 4) + _input("r", 1, 6, 5, 4) +
     'layer { name: "g" type: "Pooling" bottom: "x" top: "g" pooling_param { pool: AVE global_pooling: true } }\n'
     'layer { name: "p" type: "Sigmoid" bottom: "g" top: "p" }\n'
     'layer { name: "a" type: "Axpy" bottom: "p" bottom: "x" bottom: "r" top: "y" }'),
    ("ReLU6", _input("x", 2, 3, 4, 5) +
     'layer { name: "s" type: "Power" bottom: "x" top: "s" power_param { scale: 5 } }\n'
     'layer { name: "r" type: "ReLU6" bottom: "s" top: "y" }'),
    ("Pooling MAX 3x3 s2 ceil_mode: false", _input("x", 2, 3, 8, 9) +
     'layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX kernel_size: 3 stride: 2 '
     'ceil_mode: false } }'),
    ("Pooling AVE 3x3 s2 pad 1 ceil_mode: false", _input("x", 2, 3, 8, 9) +
     'layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE kernel_size: 3 stride: 2 '
     'pad: 1 ceil_mode: false } }'),
    ("Pooling MAX 2x2 s2 ceil_mode: true", _input("x", 2, 3, 7, 9) +
     'layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX kernel_size: 2 stride: 2 '
     'ceil_mode: true } }'),
    ("Interp zoom_factor 3", _input("x", 2, 3, 5, 6) +
     'layer { name: "i" type: "Interp" bottom: "x" top: "y" interp_param { zoom_factor: 3 } }'),
    ("Interp height 17 width 11", _input("x", 2, 3, 5, 6) +
     'layer { name: "i" type: "Interp" bottom: "x" top: "y" interp_param { height: 17 width: 11 } }'),
    # OpenCV ignores pad_beg/pad_end: tests/layers/families/test_segmentation.py checks the cropping
]


def layers_table(seed=0):
    """[(label, max |diff|, max |value|)] of every LAYER_NETS net."""
    rows = []
    for label, text in LAYER_NETS:
        (diff, scale), = compare('name: "t"\n' + text, seed=seed, outputs=["y"]).values()
        rows.append((label, diff, scale))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prototxt", nargs="?", help="omit it with --layers")
    parser.add_argument("--layers", action="store_true", help="the small per-layer nets instead")
    parser.add_argument("--torch", action="store_true", help="against torch_forward instead of OpenCV "
                        "(SegNet's BN and Upsample, which OpenCV lacks)")
    parser.add_argument("weights", nargs="?")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers:
        for label, diff, scale in layers_table(args.seed):
            print(f"{label}: max |brewnet - OpenCV| {diff:.3g} (max |value| {scale:.3g})")
        return
    text = pathlib.Path(args.prototxt).read_text(encoding="utf-8")
    result = compare_torch(text, args.seed) if args.torch else compare(text, weights=args.weights, seed=args.seed)
    for name, (diff, scale) in result.items():
        print(f"{args.prototxt}: {name}: max |brewnet - {'torch' if args.torch else 'OpenCV'}| {diff:.3g} "
              f"(max |value| {scale:.3g}, "
              f"relative {diff / max(scale, 1e-30):.3g})")


if __name__ == "__main__":
    main()
