"""pycaffe's ``caffe.coord_map``: how coordinates of one blob map to another's through
the spatial layers of a NetSpec, and the Crop layer that aligns them.

A map is (axis, a, b): output coordinate ``a * x + b`` for input coordinate ``x``,
on the spatial axes from ``axis`` on (``None`` for pointwise layers, which map
every axis to itself). Convolution-like layers scale by 1/stride, Deconvolution
by stride; Crop shifts by its offset. ``a`` and ``b`` are numpy arrays, one
value per spatial axis (or one for all).
"""

import numpy

from brewnet.pycaffe.net_spec import layers as L

__all__ = ["PASS_THROUGH_LAYERS", "UndefinedMapException", "AxisMismatchException", "conv_params",
           "crop_params", "coord_map", "compose", "inverse", "coord_map_from_to", "crop"]

# layers whose output pixel i comes from input pixel i
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN", "Exp",
                       "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH", "Threshold"]

_LEGACY_FIELDS = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}


class UndefinedMapException(Exception):
    """The layer has no coordinate mapping (InnerProduct, ...)."""


class AxisMismatchException(Exception):
    """Two maps act on different axes and cannot be composed."""


def _vector(value):
    return numpy.array(value, ndmin=1)


def conv_params(fn):
    """(axis, stride, effective kernel extent, pad) of a Convolution-like layer spec
    (kernel extent: (kernel_size - 1) * dilation + 1)."""
    params = fn.params.get("convolution_param", fn.params.get("pooling_param", fn.params))
    assert not (_LEGACY_FIELDS & set(fn.params)) and not (_LEGACY_FIELDS & set(params)), \
        "cropping does not support legacy _h/_w params"
    kernel = _vector(params["kernel_size"])
    dilation = _vector(params.get("dilation", 1))
    return (params.get("axis", 1), _vector(params.get("stride", 1)), (kernel - 1) * dilation + 1,
            _vector(params.get("pad", 0)))


def crop_params(fn):
    """(axis, offset) of a Crop layer spec (axis 2 by default: height, width of N x C x H x W)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), _vector(params.get("offset", 0))


def coord_map(fn):
    """The (axis, a, b) map of one layer spec, from its input to its output.
    UndefinedMapException for layers without one."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # the map's axis is the last one before the cropped ones
    raise UndefinedMapException(fn.type_name)


def compose(base_map, next_map):
    """``next_map`` applied after ``base_map``: scales multiply, and the later shift is
    scaled by the earlier scale."""
    axis1, a1, b1 = base_map
    axis2, a2, b2 = next_map
    if axis1 is None:
        axis = axis2
    elif axis2 is None or axis1 == axis2:
        axis = axis1
    else:
        raise AxisMismatchException(f"cannot compose maps on axes {axis1} and {axis2}")
    return axis, a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map back: 1/a scale, -b/a shift."""
    axis, a, b = coord_map
    return axis, 1 / a, -b / a


def _mapped_bottoms(top):
    """The inputs whose coordinates map to ``top``'s: all of a layer's, except that Crop's
    second input only gives the size."""
    inputs = top.fn.inputs
    return inputs[:1] if top.fn.type_name == "Crop" else inputs


def _ancestors(top):
    """Yield (ancestor, map between the ancestor's coordinates and ``top``'s), walking down
    through every layer that has a map; ``top`` itself first, with the identity map."""
    maps = {top: (None, 1, 0)}
    frontier = [top]
    while frontier:
        current = frontier.pop()
        yield current, maps[current]
        try:
            step = coord_map(current.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(current):
            maps[bottom] = compose(maps[current], step)
            frontier.append(bottom)


def coord_map_from_to(top_from, top_to):
    """The (axis, a, b) map from ``top_from``'s coordinates to ``top_to``'s, through their
    nearest common ancestor. RuntimeError when no chain of spatial layers connects them."""
    from_maps = dict(_ancestors(top_from))
    for top, to_map in _ancestors(top_to):
        if top in from_maps:
            return compose(to_map, inverse(from_maps[top]))
    raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")


def crop(top_from, top_to):
    """A Crop layer spec that cuts ``top_from`` to ``top_to``'s extent, aligned by their
    coordinate map (which must be a pure, non-negative, whole shift)."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    assert (a == 1).all(), f"scale mismatch on crop (a = {a})"
    assert (b <= 0).all(), f"cannot crop negative offset (b = {b})"
    assert (numpy.round(b) == b).all(), f"cannot crop noninteger offset (b = {b})"
    offset = [int(v) for v in -numpy.round(b).astype(int)]
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis + 1, offset=offset))
