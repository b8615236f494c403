"""Axis and index helpers shared by the layer families (Caffe's CanonicalAxisIndex and friends)."""

import numpy


def canonical_axis(layer, blob, axis, what="axis"):
    n = blob.num_axes
    if not -n <= axis < max(n, 1):
        raise layer.error(f"{what} {axis} out of range for a {n}-axis blob of shape {blob.shape}")
    return axis + n if axis < 0 else axis


def axis_slice(axis, start, stop):
    """An index selecting [start, stop) along ``axis``."""
    return (slice(None),) * axis + (slice(start, stop),)


def share_view(top, bottom, shape):
    """Caffe's ShareData: ``top`` sees ``bottom``'s data under another shape (no copy)."""
    top.data = bottom.data.reshape(shape)


def int_indices(layer, values, upper, what):
    """Float-coded indices -> int array, checked to lie in [0, upper) (Caffe CHECKs them)."""
    idx = values.astype(numpy.int64)  # C++ static_cast<int>: truncation toward zero
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= upper):
        raise layer.error(f"{what} out of range [0, {upper}): min {int(idx.min())}, max {int(idx.max())}")
    return idx
