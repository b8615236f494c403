"""Weight fillers with Caffe's names and formulas.

Random draws come from a host numpy Generator (the net's, seeded from the
solver's random_seed) and are copied to the blob's device, so a seed gives
the same initial weights on CPU and GPU.
"""

import numpy

from brewnet.netdef.errors import DefinitionError


class FillerError(DefinitionError):
    """A filler that cannot fill the blob it is given (unknown type, bad field)."""


def _fans(shape):
    count = int(numpy.prod(shape))
    fan_in = count // shape[0]
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _variance_n(param, shape):
    from brewnet.netdef import caffe_pb2

    fan_in, fan_out = _fans(shape)
    norm = param.variance_norm
    if norm == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if norm == caffe_pb2.FillerParameter.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def _no_sparse(param):
    if param.sparse != -1:
        raise FillerError(f"filler {param.type!r} does not support sparse (only gaussian does)")


def _constant(param, shape, rng):
    _no_sparse(param)
    return numpy.full(shape, param.value, dtype=numpy.float64)


def _uniform(param, shape, rng):
    _no_sparse(param)
    return rng.uniform(param.min, param.max, size=shape)


def _gaussian(param, shape, rng):
    values = rng.normal(param.mean, param.std, size=shape)
    if param.sparse < -1:
        raise FillerError(f"gaussian filler sparse must be >= -1, got {param.sparse}")
    if param.sparse >= 0:
        # each weight survives with probability sparse / num_outputs
        keep = rng.random(size=shape) < param.sparse / float(shape[0])
        values = values * keep
    return values


def _positive_unitball(param, shape, rng):
    _no_sparse(param)
    values = rng.uniform(0.0, 1.0, size=shape).reshape(shape[0], -1)
    values /= values.sum(axis=1, keepdims=True)
    return values.reshape(shape)


def _xavier(param, shape, rng):
    _no_sparse(param)
    scale = numpy.sqrt(3.0 / _variance_n(param, shape))
    return rng.uniform(-scale, scale, size=shape)


def _msra(param, shape, rng):
    _no_sparse(param)
    std = numpy.sqrt(2.0 / _variance_n(param, shape))
    return rng.normal(0.0, std, size=shape)


def _bilinear(param, shape, rng):
    _no_sparse(param)
    if len(shape) != 4 or shape[2] != shape[3]:
        raise FillerError(f"bilinear filler needs a 4-D blob with square kernels, got shape {tuple(shape)}")
    width = shape[3]
    f = numpy.ceil(width / 2.0)
    c = (width - 1) / (2.0 * f)
    ramp = 1 - numpy.abs(numpy.arange(width) / f - c)
    kernel = numpy.outer(ramp, ramp)
    return numpy.broadcast_to(kernel, shape).copy()


FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def fill(blob, filler_param, rng):
    """Fill ``blob.data`` in place following a caffe_pb2.FillerParameter."""
    shape = blob.shape
    if blob.count == 0:
        raise FillerError(f"cannot fill an empty blob of shape {shape}")
    try:
        make = FILLERS[filler_param.type]
    except KeyError:
        raise FillerError(
            f"unknown filler type {filler_param.type!r}; known: {', '.join(sorted(FILLERS))}"
        ) from None
    if make is _constant:
        _no_sparse(filler_param)
        # in place: no float64 array the size of the blob on the way (a big bias, a zero-filled net)
        blob.data.fill(numpy.float64(filler_param.value).astype(blob.dtype))
        return
    values = make(filler_param, shape, rng).astype(blob.dtype, copy=False)
    blob.data[...] = blob.xp.asarray(values)
