"""A Caffe NetParameter as a PyTorch module, for the benchmarks (never imported by brewnet).

``torch_model(net_param)`` walks the layers in order, as Caffe's Net does, keeping a dict of
named blobs, so branching nets (Inception's Concat, ResNet's Eltwise, Split) translate as they
are; in-place layers overwrite their blob. Shapes follow Caffe's: pooling rounds its output size
up (ceil_mode, with Caffe's rule that the last window starts inside the image), average pooling
divides by the window clipped to the padded image (count_include_pad), global pooling is an
adaptive pool. BatchNorm followed by a Scale on the same blob becomes one affine BatchNorm2d
(what a PyTorch user writes); a lone BatchNorm has no affine part. ReLU6 as Caffe writes it is
Clip(min 0, max 6). The translation stops at the first Softmax or SoftmaxWithLoss: its input
is the logits.
"""

import torch
from torch import nn
from torch.nn import functional as F

# brewnet's schema; the benchmark scripts put the repository first on sys.path
from brewnet.netdef import caffe_pb2

POOL = caffe_pb2.PoolingParameter
ELTWISE = caffe_pb2.EltwiseParameter


class TranslationError(SystemExit):
    """A layer the benchmark cannot express in PyTorch (exits with the message)."""


def _spatial(cp, field, default):
    """(h, w) of a ConvolutionParameter's repeated field or its _h/_w pair."""
    name = "kernel_size" if field == "kernel" else field
    if cp.HasField(field + "_h") or cp.HasField(field + "_w"):
        return getattr(cp, field + "_h"), getattr(cp, field + "_w")
    values = list(getattr(cp, name)) or [default]
    return (values[0], values[-1]) if len(values) <= 2 else tuple(values)


def _pool_geometry(pp):
    kh = pp.kernel_h if pp.HasField("kernel_h") else pp.kernel_size
    kw = pp.kernel_w if pp.HasField("kernel_w") else pp.kernel_size
    sh = pp.stride_h if pp.HasField("stride_h") else pp.stride
    sw = pp.stride_w if pp.HasField("stride_w") else pp.stride
    ph = pp.pad_h if pp.HasField("pad_h") else pp.pad
    pw = pp.pad_w if pp.HasField("pad_w") else pp.pad
    return (kh, kw), (sh, sw), (ph, pw)


class CaffeNetModule(nn.Module):
    """Runs ``steps`` (kind, module name or None, bottoms, tops, extra) over a blob dict."""

    def __init__(self, steps, modules, input_name, output_name):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleDict(modules)
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x):
        blobs = {self.input_name: x}
        for kind, module, bottoms, tops, extra in self.steps:
            args = [blobs[b] for b in bottoms]
            if kind == "module":
                out = self.layers[module](*args)
            elif kind == "concat":
                out = torch.cat(args, dim=extra)
            elif kind == "sum":
                out = args[0]
                for a in args[1:]:
                    out = out + a
            elif kind == "prod":
                out = args[0]
                for a in args[1:]:
                    out = out * a
            elif kind == "max":
                out = args[0]
                for a in args[1:]:
                    out = torch.maximum(out, a)
            elif kind == "split":
                for t in tops:
                    blobs[t] = args[0]
                continue
            elif kind == "flatten":
                out = torch.flatten(args[0], 1)
            else:  # pragma: no cover - steps are made below
                raise AssertionError(kind)
            blobs[tops[0]] = out
        return blobs[self.output_name].flatten(1)


class _Clip(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return F.hardtanh(x, self.lo, self.hi, inplace=True)


class _InnerProduct(nn.Module):
    """Flatten from axis 1, then Linear (its input size is known after a first pass)."""

    def __init__(self, num_output, bias):
        super().__init__()
        self.linear = nn.LazyLinear(num_output, bias=bias)

    def forward(self, x):
        return self.linear(torch.flatten(x, 1))


def torch_model(net_param, who="benchmark"):
    """(module, input shape) for a train or deploy NetParameter whose first layer is an Input;
    ``who`` names the calling script in the error for a layer type it cannot translate."""
    layers = list(net_param.layer)
    if not layers or layers[0].type != "Input":
        raise TranslationError(f"{who}: the first layer must be an Input layer")
    shape = list(layers[0].input_param.shape[0].dim)
    input_name = layers[0].top[0]
    channels = {input_name: shape[1]}
    steps, modules = [], {}
    output = None

    def add_module(lp, module, channels_out=None):
        key = f"m{len(modules)}"
        modules[key] = module
        steps.append(("module", key, list(lp.bottom[:1]), list(lp.top[:1]), None))
        channels[lp.top[0]] = channels[lp.bottom[0]] if channels_out is None else channels_out

    skip = set()
    for i, lp in enumerate(layers[1:], start=1):
        t = lp.type
        if i in skip:
            continue
        if t in ("Softmax", "SoftmaxWithLoss"):
            output = lp.bottom[0]
            break
        if t == "Convolution":
            cp = lp.convolution_param
            dil = list(cp.dilation) or [1]
            add_module(lp, nn.Conv2d(channels[lp.bottom[0]], cp.num_output, _spatial(cp, "kernel", None),
                                     _spatial(cp, "stride", 1), _spatial(cp, "pad", 0), (dil[0], dil[-1]),
                                     groups=cp.group, bias=cp.bias_term), cp.num_output)
        elif t == "BatchNorm":
            bp = lp.batch_norm_param
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            # Caffe's BatchNorm + Scale(bias) on one blob is PyTorch's affine BatchNorm2d
            affine = (nxt is not None and nxt.type == "Scale" and list(nxt.bottom) == list(lp.top)
                      and nxt.scale_param.bias_term)
            if affine:
                skip.add(i + 1)
            add_module(lp, nn.BatchNorm2d(channels[lp.bottom[0]], eps=bp.eps, affine=affine))
        elif t == "ReLU":
            if lp.relu_param.negative_slope:
                add_module(lp, nn.LeakyReLU(lp.relu_param.negative_slope, inplace=True))
            else:
                add_module(lp, nn.ReLU(inplace=True))
        elif t == "Clip":
            lo, hi = lp.clip_param.min, lp.clip_param.max
            add_module(lp, nn.ReLU6(inplace=True) if (lo, hi) == (0, 6) else _Clip(lo, hi))
        elif t == "Pooling":
            pp = lp.pooling_param
            if pp.pool not in (POOL.MAX, POOL.AVE):
                raise TranslationError(f"{who}: layer {lp.name}: no PyTorch translation for STOCHASTIC pooling")
            if pp.global_pooling:
                mod = nn.AdaptiveMaxPool2d(1) if pp.pool == POOL.MAX else nn.AdaptiveAvgPool2d(1)
            else:
                k, s, p = _pool_geometry(pp)
                mod = (nn.MaxPool2d(k, s, p, ceil_mode=True) if pp.pool == POOL.MAX
                       else nn.AvgPool2d(k, s, p, ceil_mode=True, count_include_pad=True))
            add_module(lp, mod)
        elif t == "LRN":
            q = lp.lrn_param
            add_module(lp, nn.LocalResponseNorm(q.local_size, q.alpha, q.beta, q.k))
        elif t == "Dropout":
            add_module(lp, nn.Dropout(lp.dropout_param.dropout_ratio))
        elif t == "InnerProduct":
            ip = lp.inner_product_param
            add_module(lp, _InnerProduct(ip.num_output, ip.bias_term), ip.num_output)
        elif t == "Concat":
            axis = lp.concat_param.axis if lp.concat_param.HasField("axis") else 1
            steps.append(("concat", None, list(lp.bottom), list(lp.top), axis))
            channels[lp.top[0]] = sum(channels[b] for b in lp.bottom)
        elif t == "Eltwise":
            op = lp.eltwise_param.operation
            if list(lp.eltwise_param.coeff) and any(c != 1 for c in lp.eltwise_param.coeff):
                raise TranslationError(f"{who}: layer {lp.name}: Eltwise coefficients are not translated")
            kind = {ELTWISE.SUM: "sum", ELTWISE.PROD: "prod", ELTWISE.MAX: "max"}[op]
            steps.append((kind, None, list(lp.bottom), list(lp.top), None))
            channels[lp.top[0]] = channels[lp.bottom[0]]
        elif t == "Split":
            steps.append(("split", None, list(lp.bottom), list(lp.top), None))
            for top in lp.top:
                channels[top] = channels[lp.bottom[0]]
        elif t == "Flatten":
            steps.append(("flatten", None, list(lp.bottom), list(lp.top), None))
            channels[lp.top[0]] = None
        else:
            raise TranslationError(f"{who}: no PyTorch translation for layer type {t} (layer {lp.name})")
    if output is None:
        output = layers[-1].top[0]
    model = CaffeNetModule(steps, modules, input_name, output)
    with torch.no_grad():  # sizes the lazy Linear layers
        model.eval()(torch.zeros([1] + shape[1:]))
    return model.train(), shape
