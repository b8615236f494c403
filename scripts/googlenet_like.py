#!/usr/bin/env python
"""Write a GoogLeNet-shaped deploy prototxt (BVLC GoogLeNet's layer sizes, no auxiliary heads),
for the contention measurements of scripts/contention_probe.py and the benchmark.

  python scripts/googlenet_like.py OUT.prototxt [--batch 8]
"""

import sys

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
INCEPTION = [
    ("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)), "pool3",
    ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)), "pool4",
    ("5a", (256, 160, 320, 32, 128, 128)), ("5b", (384, 192, 384, 48, 128, 128)),
]


def conv(name, bottom, n, k, stride=1, pad=0):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  convolution_param {{ num_output: {n} kernel_size: {k} stride: {stride} pad: {pad}\n'
            f'    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.2 }} }} }}\n'
            f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def pool(name, bottom, k, stride, pad=0, kind="MAX"):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}"\n'
            f'  pooling_param {{ pool: {kind} kernel_size: {k} stride: {stride} pad: {pad} }} }}\n')


def lrn(name, bottom):
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}"\n'
            f'  lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def inception(tag, bottom, sizes):
    p = f"inception_{tag}"
    n1, r3, n3, r5, n5, pp = sizes
    text = conv(f"{p}_1x1", bottom, n1, 1)
    text += conv(f"{p}_3x3_reduce", bottom, r3, 1) + conv(f"{p}_3x3", f"{p}_3x3_reduce", n3, 3, pad=1)
    text += conv(f"{p}_5x5_reduce", bottom, r5, 1) + conv(f"{p}_5x5", f"{p}_5x5_reduce", n5, 5, pad=2)
    text += pool(f"{p}_pool", bottom, 3, 1, 1) + conv(f"{p}_pool_proj", f"{p}_pool", pp, 1)
    tops = "".join(f' bottom: "{p}_{b}"' for b in ("1x1", "3x3", "5x5", "pool_proj"))
    text += f'layer {{ name: "{p}_output" type: "Concat"{tops} top: "{p}_output" }}\n'
    return text, f"{p}_output"


def googlenet(batch=8):
    text = (f'name: "GoogLeNetLike"\nlayer {{ name: "data" type: "Input" top: "data"\n'
            f'  input_param {{ shape {{ dim: {batch} dim: 3 dim: 224 dim: 224 }} }} }}\n')
    text += conv("conv1", "data", 64, 7, 2, 3) + pool("pool1", "conv1", 3, 2) + lrn("norm1", "pool1")
    text += conv("conv2_reduce", "norm1", 64, 1) + conv("conv2", "conv2_reduce", 192, 3, pad=1)
    text += lrn("norm2", "conv2") + pool("pool2", "norm2", 3, 2)
    top = "pool2"
    for item in INCEPTION:
        if isinstance(item, str):
            text += pool(item, top, 3, 2)
            top = item
        else:
            block, top = inception(item[0], top, item[1])
            text += block
    text += pool("pool5", top, 7, 1, kind="AVE")
    text += ('layer { name: "drop" type: "Dropout" bottom: "pool5" top: "pool5" dropout_param { dropout_ratio: 0.4 } }\n'
             'layer { name: "classifier" type: "InnerProduct" bottom: "pool5" top: "classifier"\n'
             '  inner_product_param { num_output: 1000 weight_filler { type: "xavier" } } }\n'
             'layer { name: "prob" type: "Softmax" bottom: "classifier" top: "prob" }\n')
    return text


if __name__ == "__main__":
    args = sys.argv[1:]
    batch = 8
    if "--batch" in args:
        i = args.index("--batch")
        batch = int(args[i + 1])
        del args[i:i + 2]
    with open(args[0], "w") as f:
        f.write(googlenet(batch))
