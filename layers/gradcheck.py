"""Numerical gradient checking for layers (float64, central differences).

Used by brewnet's own tests for every layer with a backward, and usable for
your own layers: build one with ``make_layer(prototxt)`` and call
``check_gradient(layer, [bottom arrays])``.

The scalar checked is  L = sum_k <top_k.data, W_k>  for fixed random W_k, so
dL/dtop_k = W_k: set as the top diffs, backward gives the analytic gradient of
every bottom and parameter, compared to (L(x+h) - L(x-h)) / 2h per element.
"""

import numpy
from google.protobuf import text_format

from brewnet.layers.blob import Blob
from brewnet.layers.registry import get_layer_class
from brewnet.netdef import caffe_pb2


def make_layer(prototxt, phase=caffe_pb2.TEST, dtype=numpy.float64, seed=0, xp=numpy):
    """Build a layer from a LayerParameter in text form."""
    param = text_format.Parse(prototxt, caffe_pb2.LayerParameter())
    cls = get_layer_class(param.type, param.name)
    return cls(param, xp=xp, phase=phase, rng=numpy.random.default_rng(seed), dtype=dtype)


def setup_layer(layer, bottom_arrays, n_tops=1, dtype=numpy.float64):
    xp = layer.xp
    bottom = [Blob(a.shape, xp=xp, dtype=dtype) for a in bottom_arrays]
    for blob, array in zip(bottom, bottom_arrays):
        blob.data[...] = xp.asarray(array)
    top = [Blob((), xp=xp, dtype=dtype) for _ in range(n_tops)]
    layer.check_blob_counts(len(bottom), len(top))
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    return bottom, top


def _objective(layer, bottom, top, weights):
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return sum(float((t.data * w).sum()) for t, w in zip(top, weights))


def check_gradient(layer, bottom_arrays, n_tops=1, check_bottoms=None, check_params=True,
                   step=1e-6, rtol=1e-5, atol=1e-7, top_weights=None, seed=1, kink=None):
    """Compare analytic and numeric gradients; raise AssertionError on mismatch.

    check_bottoms: indices of bottoms to check (default all); labels etc. are skipped
    by passing only the data indices. top_weights: fixed W_k (default random),
    e.g. only the first top for layers whose other tops are not differentiable.
    kink: skip elements whose value is within this distance of a non-smooth point
    (a callable taking (bottom_index, array) and returning a bool mask to skip).
    """
    rng = numpy.random.default_rng(seed)
    bottom, top = setup_layer(layer, bottom_arrays, n_tops)
    layer.forward(bottom, top)
    if top_weights is None:
        top_weights = [rng.standard_normal(t.shape) for t in top]
    check_bottoms = range(len(bottom)) if check_bottoms is None else check_bottoms

    for p in layer.blobs:
        p.diff[...] = 0
    for t, w in zip(top, top_weights):
        t.diff[...] = w
    propagate = [i in check_bottoms for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    analytic = {("bottom", i): numpy.array(bottom[i].diff) for i in check_bottoms}
    if check_params:
        analytic.update({("param", j): numpy.array(p.diff) for j, p in enumerate(layer.blobs)})

    for (kind, idx), grad in analytic.items():
        blob = bottom[idx] if kind == "bottom" else layer.blobs[idx]
        flat = blob.data.reshape(-1)
        skip = kink(idx, blob.data).reshape(-1) if (kink is not None and kind == "bottom") else None
        numeric = numpy.zeros(flat.size)
        for e in range(flat.size):
            if skip is not None and skip[e]:
                continue
            saved = flat[e]
            flat[e] = saved + step
            plus = _objective(layer, bottom, top, top_weights)
            flat[e] = saved - step
            minus = _objective(layer, bottom, top, top_weights)
            flat[e] = saved
            numeric[e] = (plus - minus) / (2 * step)
        got = grad.reshape(-1)
        if skip is not None:
            got = numpy.where(skip, 0.0, got)
        if not numpy.allclose(got, numeric, rtol=rtol, atol=atol):
            worst = int(numpy.argmax(numpy.abs(got - numeric)))
            raise AssertionError(
                f"{layer.type} {kind} {idx}: analytic {got[worst]:.8g} vs numeric {numeric[worst]:.8g} "
                f"at element {worst} (max abs err {numpy.abs(got - numeric).max():.3g})"
            )


def net_numeric_gradient(net, blob, step=1e-6):
    """d(loss)/d(blob.data) of a whole net (a layers.net.Net: ``net.forward()`` returns its
    weighted loss) by central differences, element by element; compare it with blob.diff after
    ``net.forward_backward()``. Build the net in float64."""
    flat = blob.data.reshape(-1)
    numeric = numpy.zeros(flat.size)
    for e in range(flat.size):
        saved = flat[e]
        flat[e] = saved + step
        plus = net.forward()
        flat[e] = saved - step
        minus = net.forward()
        flat[e] = saved
        numeric[e] = (plus - minus) / (2 * step)
    return numeric
