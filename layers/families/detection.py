"""The detection layers of two Caffe forks (netdef/forks/ssd.proto, fast_rcnn.proto).

SSD (weiliu89/caffe, branch ssd): Permute, Normalize, PriorBox and DetectionOutput.
Fast R-CNN (rbgirshick/caffe-fast-rcnn): ROIPooling and SmoothL1Loss.
Semantics follow those forks' CPU code, including their quirks (PriorBox reads its sizes as
ints; DetectionOutput's empty output is one row of -1 per image). The compute is in
brewnet.layers.kernels.detection.
"""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.fillers import fill
from brewnet.layers.kernels import backend
from brewnet.layers.kernels import detection as kernels
from brewnet.layers.registry import register

FLT_MAX = float(numpy.finfo(numpy.float32).max)


@register("Permute")
class Permute(Layer):
    """Transposes the axes: ``order`` names the new order; axes it leaves out follow in their order."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        axes = bottom[0].num_axes
        order = [int(o) for o in self.param.permute_param.order]
        for o in order:
            if o >= axes:
                raise self.error(f"order {o} is not an axis of the {axes}-axis bottom {bottom[0].shape}")
        if len(set(order)) != len(order):
            raise self.error(f"order {order} names an axis twice")
        self.order = tuple(order + [a for a in range(axes) if a not in order])
        self.inverse = tuple(numpy.argsort(self.order))

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Permute cannot work in place")
        if bottom[0].num_axes != len(self.order):
            raise self.error(f"bottom has {bottom[0].num_axes} axes, the layer was set up for {len(self.order)}")
        top[0].reshape(tuple(bottom[0].shape[a] for a in self.order))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.transpose(self.order)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.transpose(self.inverse)


@register("Normalize")
class Normalize(Layer):
    """x / sqrt(sum x^2 + eps) times a learned scale (SSD's conv4_3 L2 normalization): the sum
    runs over channels and space per sample (across_spatial) or over channels per position;
    the scale is one number (channel_shared) or one per channel."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.norm_param
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom must have at least 2 axes, got {bottom[0].shape}")
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = float(p.eps)
        channels = bottom[0].shape[1]
        if not self.blobs:
            self.blobs.append(self.make_blob(() if self.channel_shared else (channels,)))
            if p.HasField("scale_filler"):
                fill(self.blobs[0], p.scale_filler, self.rng)
            else:
                self.blobs[0].data[...] = 1
        want = 1 if self.channel_shared else channels
        if self.blobs[0].count != want:
            raise self.error(f"scale blob has {self.blobs[0].count} values, channel_shared "
                             f"{str(self.channel_shared).lower()} with {channels} channels needs {want}")

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes < 2:
            raise self.error(f"bottom must have at least 2 axes, got {b.shape}")
        if top[0] is not b:
            top[0].reshape(b.shape)
        self.shape3 = (b.shape[0], b.shape[1], b.count_range(2))

    def _scale(self):
        s = self.blobs[0].data
        return s.reshape(1, 1, 1) if self.channel_shared else s.reshape(1, -1, 1)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.shape3)
        axes = (1, 2) if self.across_spatial else (1,)
        self.norm = self.xp.sqrt((x * x).sum(axis=axes, keepdims=True) + self.dtype.type(self.eps))
        self.x = x.copy() if top[0] is bottom[0] else x  # in place: keep the input for backward
        self.unit = x / self.norm
        top[0].data[...] = (self.unit * self._scale()).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.shape3)
        if self.param_needs_grad(0):
            if self.channel_shared:
                self.blobs[0].add_to_diff((dy * self.unit).sum().reshape(()))
            else:
                self.blobs[0].add_to_diff((dy * self.unit).sum(axis=(0, 2)))
        if propagate_down[0]:
            axes = (1, 2) if self.across_spatial else (1,)
            g = dy * self._scale()
            along = (g * self.x).sum(axis=axes, keepdims=True)
            dx = (g - self.x * along / (self.norm * self.norm)) / self.norm
            bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register("PriorBox")
class PriorBox(Layer):
    """SSD's default boxes for one feature map (bottom 0) of an image (bottom 1): top (1, 2, P * 4)
    holds the corner boxes, then their four variances."""

    # SSD declares no bottom count (its header misspells ExactBottomBlobs): bottom 1 is read only
    # for the image size, which img_size or img_h/img_w may give instead
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param needs at least one min_size")
        if any(s <= 0 for s in p.min_size):
            raise self.error(f"min_size must be positive, got {list(p.min_size)}")
        if p.max_size and len(p.max_size) != len(p.min_size):
            raise self.error(f"give one max_size per min_size ({len(p.min_size)}), got {len(p.max_size)}")
        for lo, hi in zip(p.min_size, p.max_size):
            if hi <= lo:
                raise self.error(f"max_size {hi:g} must be greater than min_size {lo:g}")
        ratios = [1.0]
        for ratio in p.aspect_ratio:
            if any(abs(ratio - r) < 1e-6 for r in ratios):
                continue
            ratios.append(ratio)
            if p.flip:
                ratios.append(1.0 / ratio)
        self.shapes = kernels.prior_shapes(list(p.min_size), list(p.max_size), ratios)
        variance = list(p.variance) or [0.1]
        if len(variance) not in (1, 4) or any(v <= 0 for v in variance):
            raise self.error(f"variance takes 1 or 4 positive values, got {variance}")
        self.variance = variance * 4 if len(variance) == 1 else variance
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("give img_size or img_h/img_w, not both")
            if p.img_h <= 0 or p.img_w <= 0:
                raise self.error("img_h and img_w must both be positive")
            self.img = (p.img_h, p.img_w)
        else:
            self.img = (p.img_size, p.img_size) if p.HasField("img_size") else (0, 0)
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("give step or step_h/step_w, not both")
            if p.step_h <= 0 or p.step_w <= 0:
                raise self.error("step_h and step_w must both be positive")
            self.step = (p.step_h, p.step_w)
        else:
            self.step = (p.step, p.step) if p.HasField("step") else (0, 0)
        self.offset, self.clip = p.offset, p.clip
        if len(bottom) < 2 and not all(self.img):
            raise self.error("without img_size (or img_h and img_w) the image is needed as bottom 1 for its size")

    def reshape(self, bottom, top):
        if any(b.num_axes != 4 for b in bottom):
            raise self.error(f"bottoms must be 4-D (N, C, H, W), got {' and '.join(str(b.shape) for b in bottom)}")
        h, w = bottom[0].shape[2:]
        top[0].reshape((1, 2, h * w * len(self.shapes) * 4))

    def forward(self, bottom, top):
        layer_h, layer_w = bottom[0].shape[2:]
        img_h, img_w = self.img if all(self.img) else bottom[1].shape[2:]
        if all(self.step):
            step_h, step_w = self.step
        else:
            step_h, step_w = numpy.float32(img_h) / layer_h, numpy.float32(img_w) / layer_w
        boxes = kernels.prior_boxes(layer_h, layer_w, img_h, img_w, step_h, step_w, self.offset,
                                    self.shapes, self.clip)
        variances = numpy.broadcast_to(numpy.asarray(self.variance), boxes.shape)
        top[0].data[...] = self.xp.asarray(numpy.stack([boxes.reshape(-1), variances.reshape(-1)])[None],
                                           dtype=self.dtype)

    def backward(self, top, propagate_down, bottom):
        # the boxes depend on the bottoms' shapes only: a zero gradient (SSD's backward is empty)
        for i, down in enumerate(propagate_down):
            if down:
                bottom[i].diff[...] = 0


@register("DetectionOutput")
class DetectionOutput(Layer):
    """SSD's inference head: decodes the location predictions (bottom 0, N x P*L*4) against the
    priors (bottom 2, PriorBox's 1 x 2 x P*4), keeps per class the boxes whose confidence (bottom
    1, N x P*C) passes the threshold and survives NMS, then the keep_top_k best per image. Top:
    (1, 1, D, 7) rows of [image, label, score, xmin, ymin, xmax, ymax]; with no detection at
    all, one row [i, -1, -1, -1, -1, -1, -1] per image."""

    # SSD's optional bottom 3 (the images, for its on-screen visualize) is accepted and not read
    min_bottoms = 3
    max_bottoms = 4
    exact_tops = 1
    has_backward = False

    def allow_force_backward(self, bottom_index):
        # force_backward (`brewnet time` on a deploy net) passes over the detections, where SSD's
        # Caffe would abort in this layer's NOT_IMPLEMENTED backward
        return False

    def setup(self, bottom, top):
        p = self.param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param needs num_classes")
        self.num_classes = p.num_classes
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background = p.background_label_id
        self.code_type = p.code_type
        self.variance_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence_threshold = p.confidence_threshold if p.HasField("confidence_threshold") else -FLT_MAX
        nms = p.nms_param
        self.nms_threshold, self.eta = float(nms.nms_threshold), float(nms.eta)
        if self.nms_threshold < 0:
            raise self.error(f"nms_threshold must be non-negative, got {self.nms_threshold:g}")
        if not 0 < self.eta <= 1:
            raise self.error(f"eta must be in (0, 1], got {self.eta:g}")
        self.top_k = nms.top_k if nms.HasField("top_k") else -1
        if p.save_output_param.output_directory:
            raise self.error("save_output_param (writing VOC/COCO result files) is not supported; "
                             "read the detections from the top blob")

    def reshape(self, bottom, top):
        loc, conf, prior = bottom[:3]
        if loc.shape[0] != conf.shape[0]:
            raise self.error(f"location and confidence bottoms differ in batch size: {loc.shape} and {conf.shape}")
        self.num_priors = prior.count // 8
        if prior.count != self.num_priors * 8:
            raise self.error(f"prior bottom {prior.shape} is not PriorBox's 1 x 2 x (priors * 4)")
        if loc.count_range(1) != self.num_priors * self.num_loc_classes * 4:
            raise self.error(f"location bottom {loc.shape} needs {self.num_priors * self.num_loc_classes * 4} "
                             f"values per image ({self.num_priors} priors x {self.num_loc_classes} x 4)")
        if conf.count_range(1) != self.num_priors * self.num_classes:
            raise self.error(f"confidence bottom {conf.shape} needs {self.num_priors * self.num_classes} "
                             f"values per image ({self.num_priors} priors x {self.num_classes} classes)")
        top[0].reshape((1, 1, 1, 7))

    def _keep(self, boxes, scores):
        """{label: kept prior indices, best first} for one image (host arrays)."""
        labels = [c for c in range(self.num_classes) if c != self.background]
        class_boxes = boxes if self.share_location else boxes[labels]
        found = kernels.nms_classes(class_boxes, scores[:, labels].T, self.confidence_threshold,
                                    self.nms_threshold, self.top_k, self.eta)
        kept = dict(zip(labels, found))
        total = sum(index.size for index in found)
        if -1 < self.keep_top_k < total:  # the best keep_top_k of all classes, still grouped by class
            label_of = numpy.concatenate([numpy.full(i.size, c) for c, i in kept.items()])
            index = numpy.concatenate(list(kept.values()))
            best = numpy.argsort(-scores[index, label_of], kind="stable")[:self.keep_top_k]
            kept = {c: index[best][label_of[best] == c] for c in kept}
        return kept

    def forward(self, bottom, top):
        xp, n, p = self.xp, bottom[0].shape[0], self.num_priors
        prior = bottom[2].data.reshape(2, p, 4)
        loc = bottom[0].data.reshape(n, p, self.num_loc_classes, 4).transpose(0, 2, 1, 3)
        boxes = kernels.decode_boxes(xp, loc, prior[0], prior[1], self.code_type, self.variance_in_target)
        boxes = backend.to_numpy(boxes)  # NMS runs on the host, as in SSD
        scores = backend.to_numpy(bottom[1].data).reshape(n, p, self.num_classes)
        rows = []
        for i in range(n):
            for label, index in sorted(self._keep(boxes[i], scores[i]).items()):
                if index.size:
                    b = boxes[i, 0 if self.share_location else label, index]
                    rows.append(numpy.column_stack([numpy.full(index.size, i), numpy.full(index.size, label),
                                                    scores[i, index, label], b]))
        if rows:
            out = numpy.concatenate(rows)
        else:
            out = numpy.full((n, 7), -1.0)
            out[:, 0] = numpy.arange(n)
        top[0].reshape((1, 1, out.shape[0], 7))
        top[0].data[...] = xp.asarray(out[None, None], dtype=self.dtype)


@register("ROIPooling")
class ROIPooling(Layer):
    """Fast R-CNN's max pooling of regions (bottom 1: R x 5 rows [image, x1, y1, x2, y2] in image
    coordinates, scaled by spatial_scale) of a feature map (bottom 0) into pooled_h x pooled_w."""

    min_bottoms = max_bottoms = 2  # as Fast R-CNN declares them
    min_tops = max_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom, top):
        p = self.param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error("roi_pooling_param needs pooled_h and pooled_w greater than 0")
        self.pooled = (p.pooled_h, p.pooled_w)
        self.spatial_scale = p.spatial_scale

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"bottom 0 must be 4-D (N, C, H, W), got {bottom[0].shape}")
        if bottom[1].count_range(1) != 5:
            raise self.error(f"bottom 1 must hold rows of 5 values [image, x1, y1, x2, y2], got {bottom[1].shape}")
        top[0].reshape((bottom[1].shape[0], bottom[0].shape[1]) + self.pooled)

    def forward(self, bottom, top):
        rois = bottom[1].data.reshape(-1, 5)
        batch = rois[:, 0].astype(numpy.int64)
        if batch.size and bool(((batch < 0) | (batch >= bottom[0].shape[0])).any()):
            raise self.error(f"an ROI names image {int(backend.to_numpy(batch).max())} "
                             f"of a batch of {bottom[0].shape[0]}")
        out, self.argmax = kernels.roi_pool_forward(self.xp, bottom[0].data, rois, *self.pooled,
                                                    self.spatial_scale)
        self.batch = batch
        top[0].data[...] = out

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = kernels.roi_pool_backward(self.xp, top[0].diff, self.argmax, self.batch,
                                                            bottom[0].shape)


@register("SmoothL1Loss")
class SmoothL1Loss(Layer):
    """Fast R-CNN's box regression loss: sum(w_out * f(w_in * (a - b))) / N with f(d) = 0.5 (sigma
    d)^2 where |d| < 1 / sigma^2, else |d| - 0.5 / sigma^2. Bottoms: a, b, and optionally the
    inside and outside weights (both or neither)."""

    is_loss = True
    auto_top_blobs = True
    min_bottoms = 2
    max_bottoms = 4
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index < 2

    def setup(self, bottom, top):
        if len(bottom) == 3:
            raise self.error("give both inside and outside weights (4 bottoms), or neither (2)")
        self.sigma2 = float(self.param.smooth_l1_loss_param.sigma) ** 2

    def reshape(self, bottom, top):
        for i in range(1, len(bottom)):
            if bottom[i].count_range(1) != bottom[0].count_range(1) or bottom[i].shape[0] != bottom[0].shape[0]:
                raise self.error(f"bottom {i} {bottom[i].shape} does not match bottom 0 {bottom[0].shape}")
        top[0].reshape(())

    def forward(self, bottom, top):
        xp, t = self.xp, self.dtype.type
        d = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        if len(bottom) == 4:
            d = d * bottom[2].data.reshape(d.shape)
        small = xp.abs(d) < t(1 / self.sigma2)
        errors = xp.where(small, t(0.5 * self.sigma2) * d * d, xp.abs(d) - t(0.5 / self.sigma2))
        if len(bottom) == 4:
            errors = errors * bottom[3].data.reshape(d.shape)
        # the slope of f at d, kept for backward
        self.slope = xp.where(small, t(self.sigma2) * d, xp.sign(d))
        top[0].data[...] = errors.sum() / t(bottom[0].shape[0])

    def backward(self, top, propagate_down, bottom):
        grad = self.slope
        if len(bottom) == 4:
            grad = grad * bottom[2].data.reshape(grad.shape) * bottom[3].data.reshape(grad.shape)
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = sign * top[0].diff / self.dtype.type(bottom[i].shape[0])
                bottom[i].diff[...] = (alpha * grad).reshape(bottom[i].shape)
