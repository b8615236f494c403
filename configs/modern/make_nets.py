#!/usr/bin/env python
"""Writes the modern ImageNet nets of configs/modern/ as Caffe prototxts.

  python configs/modern/make_nets.py            # (re)writes every NAME.prototxt here
  python configs/modern/make_nets.py --check    # exit 1 if a committed file differs

Each net is deploy-shaped: an Input "data" (batch 1, BGR, the net's crop size), random-init
fillers on every learnable layer, and a final Softmax "prob". scripts/benchmark.py turns one
into a training net (a label input and SoftmaxWithLoss in place of the Softmax). The layer
graphs follow the published models; the parameter counts (BatchNorm's running statistics not
counted, as frameworks count them) equal the published ones, which
tests/test_modern_configs.py checks:

  resnet50      He et al.'s Caffe ResNet-50 (stride on the first 1x1 of a block), no conv bias
  googlenet     BVLC GoogLeNet without the two auxiliary classifiers
  inception_v3  torchvision's Inception-v3 graph without the auxiliary classifier (BN eps 1e-3)
  mobilenet_v1  MobileNet v1 (width 1.0) as in the common Caffe port, BatchNorm + Scale + ReLU
  mobilenet_v2  MobileNet v2 (width 1.0); ReLU6 is BVLC's Clip layer (min 0, max 6)
  squeezenet11  SqueezeNet 1.1
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # a source checkout runs as it is

from brewnet.netdef import caffe_pb2  # noqa: E402
from brewnet.pycaffe.net_spec import assign_proto  # noqa: E402

MAX, AVE = caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE


def _pair(value):
    return value if isinstance(value, tuple) else (value, value)


class NetBuilder:
    """Appends Caffe layers to a NetParameter; every helper returns the name of its top blob."""

    def __init__(self, name, crop):
        self.net = caffe_pb2.NetParameter(name=name)
        self.add("data", "Input", [], ["data"], input_param=dict(shape=[dict(dim=[1, 3, crop, crop])]))

    def add(self, name, type_name, bottoms, tops, **fields):
        layer = self.net.layer.add(name=name, type=type_name)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        for key, value in fields.items():
            assign_proto(layer, key, value)
        return tops[0] if tops else None

    def conv(self, name, bottom, num_output, kernel, stride=1, pad=0, group=1, bias=True, filler="msra"):
        """A Convolution; (h, w) tuples give kernel_h/kernel_w (and pad_h/pad_w) for 1x7-style kernels."""
        cp = dict(num_output=num_output, weight_filler=dict(type=filler))
        (kh, kw), (ph, pw) = _pair(kernel), _pair(pad)
        if kh == kw:
            cp["kernel_size"] = kh
        else:
            cp.update(kernel_h=kh, kernel_w=kw)
        if ph == pw:
            if ph:
                cp["pad"] = ph
        else:
            cp.update(pad_h=ph, pad_w=pw)
        if stride != 1:
            cp["stride"] = stride
        if group != 1:
            cp["group"] = group
        if bias:
            cp["bias_filler"] = dict(type="constant", value=0.2 if filler == "xavier" else 0.0)
        else:
            cp["bias_term"] = False
        return self.add(name, "Convolution", [bottom], [name], convolution_param=cp)

    def bn_scale(self, bn_name, scale_name, blob, eps=1e-5):
        """BatchNorm then Scale (gamma and beta), both in place: Caffe's batch normalization."""
        self.add(bn_name, "BatchNorm", [blob], [blob], batch_norm_param=dict(eps=eps))
        return self.add(scale_name, "Scale", [blob], [blob], scale_param=dict(bias_term=True))

    def relu(self, name, blob):
        return self.add(name, "ReLU", [blob], [blob])

    def relu6(self, name, blob):
        return self.add(name, "Clip", [blob], [blob], clip_param=dict(min=0.0, max=6.0))

    def pool(self, name, bottom, method, kernel=None, stride=1, pad=0, global_pooling=False):
        pp = dict(pool=method)
        if global_pooling:
            pp["global_pooling"] = True
        else:
            pp.update(kernel_size=kernel, stride=stride)
            if pad:
                pp["pad"] = pad
        return self.add(name, "Pooling", [bottom], [name], pooling_param=pp)

    def concat(self, name, bottoms):
        return self.add(name, "Concat", list(bottoms), [name])

    def eltwise_sum(self, name, bottoms):
        return self.add(name, "Eltwise", list(bottoms), [name])

    def fc(self, name, bottom, num_output, filler="xavier"):
        return self.add(name, "InnerProduct", [bottom], [name], inner_product_param=dict(
            num_output=num_output, weight_filler=dict(type=filler), bias_filler=dict(type="constant", value=0)))

    def dropout(self, name, blob, ratio):
        return self.add(name, "Dropout", [blob], [blob], dropout_param=dict(dropout_ratio=ratio))

    def lrn(self, name, bottom):
        return self.add(name, "LRN", [bottom], [name], lrn_param=dict(local_size=5, alpha=1e-4, beta=0.75))

    def softmax(self, bottom):
        return self.add("prob", "Softmax", [bottom], ["prob"])


# ---------------------------------------------------------------------------
# ResNet-50
# ---------------------------------------------------------------------------
def resnet50():
    b = NetBuilder("ResNet-50", 224)

    def conv_bn(name, bottom, num_output, kernel, stride=1, pad=0, relu=True):
        top = b.conv(name, bottom, num_output, kernel, stride, pad, bias=False)
        b.bn_scale("bn" + name[3:], "scale" + name[3:], top)
        return b.relu(name + "_relu", top) if relu else top

    x = conv_bn("conv1", "data", 64, 7, 2, 3)
    x = b.pool("pool1", x, MAX, 3, 2)
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=2):
        for i in range(blocks):
            tag = f"{stage}{chr(ord('a') + i)}"
            stride = 2 if (i == 0 and stage > 2) else 1
            if i == 0:
                shortcut = conv_bn(f"res{tag}_branch1", x, 4 * width, 1, stride, relu=False)
            else:
                shortcut = x
            y = conv_bn(f"res{tag}_branch2a", x, width, 1, stride)
            y = conv_bn(f"res{tag}_branch2b", y, width, 3, 1, 1)
            y = conv_bn(f"res{tag}_branch2c", y, 4 * width, 1, relu=False)
            x = b.relu(f"res{tag}_relu", b.eltwise_sum(f"res{tag}", [shortcut, y]))
    x = b.pool("pool5", x, AVE, 7, 1)
    b.softmax(b.fc("fc1000", x, 1000, filler="msra"))
    return b.net


# ---------------------------------------------------------------------------
# GoogLeNet (BVLC)
# ---------------------------------------------------------------------------
def googlenet():
    b = NetBuilder("GoogLeNet", 224)

    def conv_relu(name, bottom, num_output, kernel, stride=1, pad=0):
        top = b.conv(name, bottom, num_output, kernel, stride, pad, filler="xavier")
        return b.relu(name.replace("/", "/relu_", 1) if "/" in name else name + "_relu", top)

    def inception(tag, x, n1, n3r, n3, n5r, n5, npool):
        p = f"inception_{tag}/"
        branches = [conv_relu(p + "1x1", x, n1, 1),
                    conv_relu(p + "3x3", conv_relu(p + "3x3_reduce", x, n3r, 1), n3, 3, pad=1),
                    conv_relu(p + "5x5", conv_relu(p + "5x5_reduce", x, n5r, 1), n5, 5, pad=2),
                    conv_relu(p + "pool_proj", b.pool(p + "pool", x, MAX, 3, 1, 1), npool, 1)]
        return b.concat(p + "output", branches)

    x = conv_relu("conv1/7x7_s2", "data", 64, 7, 2, 3)
    x = b.lrn("pool1/norm1", b.pool("pool1/3x3_s2", x, MAX, 3, 2))
    x = conv_relu("conv2/3x3_reduce", x, 64, 1)
    x = conv_relu("conv2/3x3", x, 192, 3, pad=1)
    x = b.pool("pool2/3x3_s2", b.lrn("conv2/norm2", x), MAX, 3, 2)
    x = inception("3a", x, 64, 96, 128, 16, 32, 32)
    x = inception("3b", x, 128, 128, 192, 32, 96, 64)
    x = b.pool("pool3/3x3_s2", x, MAX, 3, 2)
    x = inception("4a", x, 192, 96, 208, 16, 48, 64)
    x = inception("4b", x, 160, 112, 224, 24, 64, 64)
    x = inception("4c", x, 128, 128, 256, 24, 64, 64)
    x = inception("4d", x, 112, 144, 288, 32, 64, 64)
    x = inception("4e", x, 256, 160, 320, 32, 128, 128)
    x = b.pool("pool4/3x3_s2", x, MAX, 3, 2)
    x = inception("5a", x, 256, 160, 320, 32, 128, 128)
    x = inception("5b", x, 384, 192, 384, 48, 128, 128)
    x = b.dropout("pool5/drop_7x7_s1", b.pool("pool5/7x7_s1", x, AVE, 7, 1), 0.4)
    b.softmax(b.fc("loss3/classifier", x, 1000))
    return b.net


# ---------------------------------------------------------------------------
# Inception-v3
# ---------------------------------------------------------------------------
def inception_v3():
    b = NetBuilder("Inception-v3", 299)

    def unit(name, bottom, num_output, kernel, stride=1, pad=0):
        """conv (no bias) + BatchNorm (eps 1e-3) + Scale + ReLU: torchvision's BasicConv2d."""
        top = b.conv(name, bottom, num_output, kernel, stride, pad, bias=False)
        b.bn_scale(name + "/bn", name + "/scale", top, eps=1e-3)
        return b.relu(name + "/relu", top)

    def avg_pool_branch(p, x, n):
        return unit(p + "branch_pool", b.pool(p + "pool", x, AVE, 3, 1, 1), n, 1)

    def block_a(p, x, pool_features):
        b5 = unit(p + "branch5x5_2", unit(p + "branch5x5_1", x, 48, 1), 64, 5, pad=2)
        d = unit(p + "branch3x3dbl_1", x, 64, 1)
        d = unit(p + "branch3x3dbl_3", unit(p + "branch3x3dbl_2", d, 96, 3, pad=1), 96, 3, pad=1)
        return b.concat(p + "output", [unit(p + "branch1x1", x, 64, 1), b5, d, avg_pool_branch(p, x, pool_features)])

    def block_b(p, x):
        b3 = unit(p + "branch3x3", x, 384, 3, 2)
        d = unit(p + "branch3x3dbl_2", unit(p + "branch3x3dbl_1", x, 64, 1), 96, 3, pad=1)
        d = unit(p + "branch3x3dbl_3", d, 96, 3, 2)
        return b.concat(p + "output", [b3, d, b.pool(p + "pool", x, MAX, 3, 2)])

    def block_c(p, x, c7):
        s = unit(p + "branch7x7_1", x, c7, 1)
        s = unit(p + "branch7x7_2", s, c7, (1, 7), pad=(0, 3))
        s = unit(p + "branch7x7_3", s, 192, (7, 1), pad=(3, 0))
        d = unit(p + "branch7x7dbl_1", x, c7, 1)
        for i, (k, pad, n) in enumerate([((7, 1), (3, 0), c7), ((1, 7), (0, 3), c7), ((7, 1), (3, 0), c7),
                                         ((1, 7), (0, 3), 192)], start=2):
            d = unit(p + f"branch7x7dbl_{i}", d, n, k, pad=pad)
        return b.concat(p + "output", [unit(p + "branch1x1", x, 192, 1), s, d, avg_pool_branch(p, x, 192)])

    def block_d(p, x):
        b3 = unit(p + "branch3x3_2", unit(p + "branch3x3_1", x, 192, 1), 320, 3, 2)
        s = unit(p + "branch7x7x3_1", x, 192, 1)
        s = unit(p + "branch7x7x3_2", s, 192, (1, 7), pad=(0, 3))
        s = unit(p + "branch7x7x3_3", s, 192, (7, 1), pad=(3, 0))
        s = unit(p + "branch7x7x3_4", s, 192, 3, 2)
        return b.concat(p + "output", [b3, s, b.pool(p + "pool", x, MAX, 3, 2)])

    def block_e(p, x):
        def fork(prefix, y):
            # a 1x3 and a 3x1 convolution side by side, concatenated
            return [unit(prefix + "a", y, 384, (1, 3), pad=(0, 1)), unit(prefix + "b", y, 384, (3, 1), pad=(1, 0))]

        s = unit(p + "branch3x3_1", x, 384, 1)
        d = unit(p + "branch3x3dbl_2", unit(p + "branch3x3dbl_1", x, 448, 1), 384, 3, pad=1)
        return b.concat(p + "output", [unit(p + "branch1x1", x, 320, 1), *fork(p + "branch3x3_2", s),
                                       *fork(p + "branch3x3dbl_3", d), avg_pool_branch(p, x, 192)])

    x = unit("Conv2d_1a_3x3", "data", 32, 3, 2)
    x = unit("Conv2d_2a_3x3", x, 32, 3)
    x = unit("Conv2d_2b_3x3", x, 64, 3, pad=1)
    x = b.pool("pool1", x, MAX, 3, 2)
    x = unit("Conv2d_3b_1x1", x, 80, 1)
    x = unit("Conv2d_4a_3x3", x, 192, 3)
    x = b.pool("pool2", x, MAX, 3, 2)
    for tag, features in (("5b", 32), ("5c", 64), ("5d", 64)):
        x = block_a(f"Mixed_{tag}/", x, features)
    x = block_b("Mixed_6a/", x)
    for tag, c7 in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
        x = block_c(f"Mixed_{tag}/", x, c7)
    x = block_d("Mixed_7a/", x)
    x = block_e("Mixed_7c/", block_e("Mixed_7b/", x))
    x = b.dropout("drop", b.pool("pool3", x, AVE, global_pooling=True), 0.5)
    b.softmax(b.fc("fc", x, 1000))
    return b.net


# ---------------------------------------------------------------------------
# MobileNet v1 and v2
# ---------------------------------------------------------------------------
def mobilenet_v1():
    b = NetBuilder("MobileNet-v1", 224)

    def unit(name, bottom, num_output, kernel, stride=1, group=1):
        top = b.conv(name, bottom, num_output, kernel, stride, kernel // 2, group, bias=False)
        b.bn_scale(name + "/bn", name + "/scale", top)
        return b.relu(name + "/relu", top)

    x = unit("conv1", "data", 32, 3, 2)
    # (name, output channels of the pointwise conv, stride of the depthwise conv)
    plan = [("conv2_1", 64, 1), ("conv2_2", 128, 2), ("conv3_1", 128, 1), ("conv3_2", 256, 2),
            ("conv4_1", 256, 1), ("conv4_2", 512, 2)] + [(f"conv5_{i}", 512, 1) for i in range(1, 6)] + \
           [("conv5_6", 1024, 2), ("conv6", 1024, 1)]
    channels = 32
    for name, out, stride in plan:
        x = unit(name + "/dw", x, channels, 3, stride, group=channels)
        x = unit(name + "/sep", x, out, 1)
        channels = out
    x = b.pool("pool6", x, AVE, global_pooling=True)
    b.softmax(b.fc("fc7", x, 1000, filler="msra"))
    return b.net


def mobilenet_v2():
    b = NetBuilder("MobileNet-v2", 224)

    def unit(name, bottom, num_output, kernel, stride=1, group=1, relu6=True):
        top = b.conv(name, bottom, num_output, kernel, stride, kernel // 2, group, bias=False)
        b.bn_scale(name + "/bn", name + "/scale", top)
        return b.relu6(name + "/relu6", top) if relu6 else top

    x = unit("conv1", "data", 32, 3, 2)
    channels = 32
    # (expansion t, output channels c, repeats n, first stride s), as in the paper's table 2
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    block = 0
    for t, c, n, s in settings:
        for i in range(n):
            block += 1
            p = f"block{block}/"
            stride = s if i == 0 else 1
            hidden = channels * t
            y = unit(p + "expand", x, hidden, 1) if t != 1 else x
            y = unit(p + "dwise", y, hidden, 3, stride, group=hidden)
            y = unit(p + "linear", y, c, 1, relu6=False)
            x = b.eltwise_sum(p + "add", [x, y]) if stride == 1 and channels == c else y
            channels = c
    x = unit("conv_last", x, 1280, 1)
    x = b.dropout("drop", b.pool("pool", x, AVE, global_pooling=True), 0.2)
    b.softmax(b.fc("fc", x, 1000, filler="msra"))
    return b.net


# ---------------------------------------------------------------------------
# SqueezeNet 1.1
# ---------------------------------------------------------------------------
def squeezenet11():
    b = NetBuilder("SqueezeNet-1.1", 227)

    def conv_relu(name, bottom, num_output, kernel, stride=1, pad=0):
        return b.relu("relu_" + name, b.conv(name, bottom, num_output, kernel, stride, pad, filler="xavier"))

    def fire(tag, x, squeeze, expand):
        p = f"fire{tag}/"
        s = conv_relu(p + "squeeze1x1", x, squeeze, 1)
        return b.concat(p + "concat", [conv_relu(p + "expand1x1", s, expand, 1),
                                       conv_relu(p + "expand3x3", s, expand, 3, pad=1)])

    x = conv_relu("conv1", "data", 64, 3, 2)
    x = b.pool("pool1", x, MAX, 3, 2)
    x = fire(3, fire(2, x, 16, 64), 16, 64)
    x = b.pool("pool3", x, MAX, 3, 2)
    x = fire(5, fire(4, x, 32, 128), 32, 128)
    x = b.pool("pool5", x, MAX, 3, 2)
    for tag, squeeze, expand in ((6, 48, 192), (7, 48, 192), (8, 64, 256), (9, 64, 256)):
        x = fire(tag, x, squeeze, expand)
    x = b.dropout("drop9", x, 0.5)
    # conv10's weights start small (gaussian 0.01 in the release), so the first loss is near log(1000)
    x = b.relu("relu_conv10", b.add("conv10", "Convolution", [x], ["conv10"], convolution_param=dict(
        num_output=1000, kernel_size=1, weight_filler=dict(type="gaussian", std=0.01),
        bias_filler=dict(type="constant", value=0))))
    b.softmax(b.pool("pool10", x, AVE, global_pooling=True))
    return b.net


NETS = {"resnet50": resnet50, "googlenet": googlenet, "inception_v3": inception_v3,
        "mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2, "squeezenet11": squeezenet11}


def prototxt(name):
    from google.protobuf import text_format

    header = f"# generated by configs/modern/make_nets.py ({name}); edit that script, not this file\n"
    return header + text_format.MessageToString(NETS[name]())


def main(argv):
    check = "--check" in argv
    stale = []
    for name in NETS:
        path = HERE / f"{name}.prototxt"
        text = prototxt(name)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run configs/modern/make_nets.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
