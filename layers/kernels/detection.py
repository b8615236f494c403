"""The compute of SSD's and Fast R-CNN's detection layers, as array code.

Boxes are (..., 4) arrays of (xmin, ymin, xmax, ymax) in SSD's normalized [0, 1] image
coordinates. Everything here takes the array module ``xp`` (numpy or cupy) except the
non-maximum suppression, which, as in SSD (whose GPU path copies to the host for it), runs on
host arrays: each step is one array pass over the candidates, one step per box kept.
"""

import numpy

from brewnet.layers.kernels import backend, cpu_kernels

CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3  # SSD's PriorBoxParameter.CodeType values


# -- PriorBox ------------------------------------------------------------------------
def prior_shapes(min_sizes, max_sizes, aspect_ratios):
    """(width, height) of the boxes around one cell, in SSD's order: for each min size, the
    square min box, the square sqrt(min * max) box, then one box per aspect ratio other than 1.
    SSD reads the sizes into ints (a size of 30.5 is 30); so does this."""
    shapes = []
    for i, min_size in enumerate(min_sizes):
        size = int(min_size)
        shapes.append((size, size))
        if max_sizes:
            side = numpy.sqrt(size * int(max_sizes[i]))
            shapes.append((side, side))
        for ratio in aspect_ratios:
            if abs(ratio - 1.0) < 1e-6:
                continue
            shapes.append((size * numpy.sqrt(ratio), size / numpy.sqrt(ratio)))
    return numpy.array(shapes, dtype=numpy.float64).reshape(-1, 2)


def prior_boxes(layer_h, layer_w, img_h, img_w, step_h, step_w, offset, shapes, clip):
    """(layer_h * layer_w * len(shapes), 4) corner boxes, cell by cell (row-major), the
    box shapes innermost, normalized by the image size (host float64)."""
    cx = (numpy.arange(layer_w, dtype=numpy.float32) + numpy.float32(offset)) * numpy.float32(step_w)
    cy = (numpy.arange(layer_h, dtype=numpy.float32) + numpy.float32(offset)) * numpy.float32(step_h)
    cx = numpy.broadcast_to(cx[None, :, None], (layer_h, layer_w, len(shapes))).astype(numpy.float64)
    cy = numpy.broadcast_to(cy[:, None, None], (layer_h, layer_w, len(shapes))).astype(numpy.float64)
    half_w, half_h = shapes[:, 0] / 2.0, shapes[:, 1] / 2.0
    boxes = numpy.stack([(cx - half_w) / img_w, (cy - half_h) / img_h,
                         (cx + half_w) / img_w, (cy + half_h) / img_h], axis=-1).reshape(-1, 4)
    return numpy.clip(boxes, 0.0, 1.0) if clip else boxes


# -- box decoding ----------------------------------------------------------------------
def box_area(xp, boxes):
    """Width * height, 0 for a box whose max is below its min (SSD's BBoxSize, normalized)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return xp.where((w < 0) | (h < 0), 0, w * h)


def decode_boxes(xp, loc, priors, variances, code_type, variance_encoded_in_target):
    """SSD's DecodeBBox for arrays: ``loc`` (..., P, 4) offsets against ``priors`` (P, 4) with
    ``variances`` (P, 4)."""
    if variance_encoded_in_target:
        variances = xp.ones_like(variances)
    scaled = loc * variances
    if code_type == CORNER:
        return priors + scaled
    width = (priors[:, 2] - priors[:, 0])[:, None]
    height = (priors[:, 3] - priors[:, 1])[:, None]
    if code_type == CORNER_SIZE:
        return priors + scaled * xp.concatenate([width, height, width, height], axis=1)
    if code_type != CENTER_SIZE:
        raise ValueError(f"unknown box code type {code_type}")
    center_x = (priors[:, 0] + priors[:, 2])[:, None] / 2
    center_y = (priors[:, 1] + priors[:, 3])[:, None] / 2
    cx = scaled[..., 0:1] * width + center_x
    cy = scaled[..., 1:2] * height + center_y
    w = xp.exp(scaled[..., 2:3]) * width
    h = xp.exp(scaled[..., 3:4]) * height
    return xp.concatenate([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


# -- non-maximum suppression -------------------------------------------------------------
def jaccard(a, b, area_a=None, area_b=None):
    """Jaccard overlap of boxes ``a`` and ``b`` (host arrays, broadcast against each other), SSD's
    normalized rule: boxes that only touch overlap 0. Their areas may be given."""
    iw = numpy.minimum(a[..., 2], b[..., 2]) - numpy.maximum(a[..., 0], b[..., 0])
    ih = numpy.minimum(a[..., 3], b[..., 3]) - numpy.maximum(a[..., 1], b[..., 1])
    inter = numpy.where((iw > 0) & (ih > 0), iw * ih, 0)
    area_a = box_area(numpy, a) if area_a is None else area_a
    area_b = box_area(numpy, b) if area_b is None else area_b
    union = area_a + area_b - inter
    with numpy.errstate(divide="ignore", invalid="ignore"):
        return numpy.where(inter > 0, inter / numpy.where(union > 0, union, 1), 0)


def overlaps(boxes, others):
    """Jaccard overlap of every box with every other box: (len(boxes), len(others))."""
    return jaccard(boxes[:, None, :], others[None, :, :])


def nms_classes(boxes, scores, score_threshold, nms_threshold, top_k=-1, eta=1.0):
    """SSD's ApplyNMSFast for C classes at once: ``boxes`` (C, P, 4) (or (1, P, 4), shared),
    ``scores`` (C, P); a list of the kept indices per class, best first.

    Per class, the candidates scoring above the threshold are taken in (stable) descending score
    order, at most ``top_k`` of them; one is kept when it overlaps no kept box by more than the
    current threshold, which is multiplied by ``eta`` after each keep while above 0.5 (adaptive
    NMS). Each step keeps, in every class still going, the first candidate within the threshold
    of all its kept boxes (those before it failed against the same boxes and threshold), so the
    steps number the most boxes one class keeps, each an array pass over all classes."""
    classes, num = scores.shape
    order = numpy.argsort(-scores, axis=1, kind="stable")
    valid = numpy.take_along_axis(scores, order, axis=1) > score_threshold  # a prefix of each row
    width = int(valid.sum(axis=1).max()) if num else 0
    width = min(width, top_k) if top_k > -1 else width
    order, valid = order[:, :width], valid[:, :width]
    source = boxes if boxes.shape[0] == classes else numpy.broadcast_to(boxes, (classes,) + boxes.shape[1:])
    candidates = numpy.take_along_axis(source, order[:, :, None], axis=1)  # (C, K, 4)
    areas = box_area(numpy, candidates)
    # in the boxes' precision: float32 nets compare and multiply by eta in SSD's floats
    real = candidates.dtype if candidates.dtype.kind == "f" else numpy.dtype(numpy.float64)
    worst = numpy.zeros((classes, width), dtype=real)  # largest overlap with a kept box
    threshold = numpy.full(classes, nms_threshold, dtype=real)
    start = numpy.zeros(classes, dtype=numpy.int64)
    kept = numpy.zeros((classes, width), dtype=bool)
    position = numpy.arange(width)
    going = valid.any(axis=1)
    while going.any():
        ok = valid & (position >= start[:, None]) & (worst <= threshold[:, None]) & going[:, None]
        going = ok.any(axis=1)
        rows = numpy.flatnonzero(going)
        if rows.size == 0:
            break
        pick = ok[rows].argmax(axis=1)
        kept[rows, pick] = True
        overlap = jaccard(candidates[rows, pick][:, None, :], candidates[rows], areas[rows, pick][:, None], areas[rows])
        worst[rows] = numpy.maximum(worst[rows], overlap)
        start[rows] = pick + 1
        if eta < 1:
            adapt = rows[threshold[rows] > 0.5]
            threshold[adapt] *= real.type(eta)
    return [order[c][kept[c]] for c in range(classes)]


def nms(boxes, scores, score_threshold, nms_threshold, top_k=-1, eta=1.0):
    """nms_classes for one class: ``boxes`` (P, 4), ``scores`` (P,)."""
    return nms_classes(boxes[None], scores[None], score_threshold, nms_threshold, top_k, eta)[0]


# -- ROI pooling ------------------------------------------------------------------------
def c_round(xp, x):
    """C's round(): halves away from zero (numpy rounds them to even)."""
    return xp.sign(x) * xp.floor(xp.abs(x) + 0.5)


def roi_bins(xp, rois, spatial_scale, pooled, size, column, dtype):
    """(start, end) feature-map indices of each ROI's bins along one axis (R, pooled), with Fast
    R-CNN's rounding: ROI corners rounded onto the map, bins floored/ceiled, then clamped."""
    begin = c_round(xp, rois[:, column] * dtype.type(spatial_scale)).astype(numpy.int64)
    finish = c_round(xp, rois[:, column + 2] * dtype.type(spatial_scale)).astype(numpy.int64)
    extent = xp.maximum(finish - begin + 1, 1).astype(dtype)
    bin_size = extent / dtype.type(pooled)
    index = xp.arange(pooled, dtype=dtype)
    start = xp.floor(index[None, :] * bin_size[:, None]).astype(numpy.int64) + begin[:, None]
    end = xp.ceil((index[None, :] + 1) * bin_size[:, None]).astype(numpy.int64) + begin[:, None]
    return xp.clip(start, 0, size), xp.clip(end, 0, size)


def roi_pool_forward(xp, x, rois, pooled_h, pooled_w, spatial_scale, max_elements=1 << 23):
    """Fast R-CNN's ROI max pooling: (R, C, pooled_h, pooled_w) maxima and the flat h * W + w
    index of each within its plane (-1 for an empty bin, whose output is 0).

    On the CPU a compiled loop scans each bin (detection_jit.py). In the array code, each bin's window is gathered whole from a channels-last copy of the map, padded to the
    largest bin of a group of ROIs (ROIs go by size, so the padding stays small, in groups
    bounded in memory), and the first maximum in row-major window order wins, as in Caffe's
    scan with its strict '>'."""
    n, channels, height, width = x.shape
    num = rois.shape[0]
    out = xp.zeros((num, channels, pooled_h, pooled_w), dtype=x.dtype)
    argmax = xp.full((num, channels, pooled_h, pooled_w), -1, dtype=numpy.int64)
    if num == 0:
        return out, argmax
    hs, he = roi_bins(xp, rois, spatial_scale, pooled_h, height, 2, x.dtype)
    ws, we = roi_bins(xp, rois, spatial_scale, pooled_w, width, 1, x.dtype)
    batch = rois[:, 0].astype(numpy.int64)
    if cpu_kernels.enabled(xp):
        from brewnet.layers.kernels import detection_jit

        detection_jit.roi_pool_forward(numpy.ascontiguousarray(x), batch, hs, he, ws, we, out, argmax)
        return out, argmax
    bin_h = numpy.maximum(backend.to_numpy((he - hs).max(axis=1)), 1)
    bin_w = numpy.maximum(backend.to_numpy((we - ws).max(axis=1)), 1)
    order = numpy.argsort(bin_h * bin_w, kind="stable")
    per_roi = pooled_h * pooled_w * channels
    lowest = xp.asarray(-numpy.inf, dtype=x.dtype)
    planes = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (N, H, W, C): a window's channels side by side
    first = 0
    while first < num:
        last, kh, kw = first + 1, int(bin_h[order[first]]), int(bin_w[order[first]])
        while last < num:  # grow the group while its windows, padded to its largest, fit the budget
            grown_h, grown_w = max(kh, int(bin_h[order[last]])), max(kw, int(bin_w[order[last]]))
            if per_roi * grown_h * grown_w * (last + 1 - first) > max_elements:
                break
            last, kh, kw = last + 1, grown_h, grown_w
        group = xp.asarray(order[first:last])
        rows = hs[group][:, :, None] + xp.arange(kh)  # (g, PH, kh)
        cols = ws[group][:, :, None] + xp.arange(kw)  # (g, PW, kw)
        inside = (rows < he[group][:, :, None])[:, :, None, :, None] & (cols < we[group][:, :, None])[:, None, :, None, :]
        windows = planes[batch[group][:, None, None, None, None],
                         xp.minimum(rows, height - 1)[:, :, None, :, None],
                         xp.minimum(cols, width - 1)[:, None, :, None, :]]  # (g, PH, PW, kh, kw, C)
        windows = xp.where(inside[..., None], windows, lowest).reshape(len(group), pooled_h, pooled_w, kh * kw, channels)
        best = windows.argmax(axis=3)  # (g, PH, PW, C): the first maximum, row-major
        value = xp.take_along_axis(windows, best[:, :, :, None, :], axis=3)[:, :, :, 0, :]
        h_at = xp.take_along_axis(rows[:, :, None, :], (best // kw).transpose(0, 1, 3, 2), axis=3)  # (g, PH, C, PW)
        w_at = xp.take_along_axis(cols[:, None, :, :], (best % kw).transpose(0, 3, 2, 1), axis=3)  # (g, C, PW, PH)
        index = h_at.transpose(0, 2, 1, 3) * width + w_at.transpose(0, 1, 3, 2)  # (g, C, PH, PW)
        value = value.transpose(0, 3, 1, 2)
        found = value > lowest  # not an empty bin
        out[group] = xp.where(found, value, 0)
        argmax[group] = xp.where(found, index, -1)
        first = last
    return out, argmax


def roi_pool_backward(xp, dy, argmax, batch, shape):
    """The gradient of ROI max pooling: each output's diff added to the input element it took
    (a weighted bincount: the same element may be taken by many bins and ROIs)."""
    n, channels, height, width = shape
    if cpu_kernels.enabled(xp):
        from brewnet.layers.kernels import detection_jit

        dx = numpy.zeros((n, channels, height * width), dtype=dy.dtype)
        detection_jit.roi_pool_backward(numpy.ascontiguousarray(dy), argmax, batch, dx)
        return dx.reshape(shape)
    hit = argmax >= 0
    plane = (batch[:, None, None, None] * channels + xp.arange(channels)[None, :, None, None]) * (height * width)
    index = xp.where(hit, plane + argmax, 0).reshape(-1)
    weights = xp.where(hit, dy, 0).reshape(-1)
    dx = xp.bincount(index, weights=weights, minlength=n * channels * height * width)
    return dx.astype(dy.dtype).reshape(shape)
