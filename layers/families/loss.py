"""Loss layers (and Accuracy) with Caffe's formulas and normalizations.

A loss layer writes a scalar (shape ()) top. Its loss weight reaches
backward as top[0].diff, a 0-d array: every gradient is scaled by it, and
the arithmetic stays on the device (no host round-trip per iteration),
except for the label range check, which needs one boolean back.
"""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError

FLT_MIN = float(numpy.finfo(numpy.float32).tiny)  # Caffe clamps softmax probabilities here before the log
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD (multinomial logistic, infogain)

_NORM = caffe_pb2.LossParameter


def _softmax(xp, x, axis):
    """Softmax along axis: subtract the max, exponentiate, normalize (dtype kept)."""
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _one_hot(xp, labels, num_classes):
    """Boolean (outer, C, inner) mask from (outer, inner) integer labels."""
    classes = xp.arange(num_classes, dtype=labels.dtype)
    return classes[None, :, None] == labels[:, None, :]


class _Labeled(Layer):
    """Helpers for layers that read integer class labels."""

    ignore_label = None

    def const(self, value):
        # dtype-matched scalar: arithmetic never promotes float32 data to float64
        return self.dtype.type(value)

    def read_labels(self, label_data, outer, inner, num_classes):
        """Integer labels (outer, inner) and the valid mask (None without ignore_label).

        Ignored positions get label 0 so they can index safely; callers mask them out.
        """
        xp = self.xp
        labels = label_data.reshape(outer, inner).astype(xp.int32)  # truncates like static_cast<int>
        valid = None
        if self.ignore_label is not None:
            valid = labels != self.ignore_label
            labels = xp.where(valid, labels, 0)
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            value = int(labels[bad].reshape(-1)[0])
            raise self.error(f"label value {value} is outside [0, {num_classes})")
        return labels, valid

    def split_at_axis(self, bottom, axis):
        """Class axis, outer and inner sizes of bottom[0] around it; one label per position."""
        x = bottom[0]
        self.axis = x.canonical_axis(axis)
        self.outer = x.count_range(0, self.axis)
        self.inner = x.count_range(self.axis + 1)
        if self.outer * self.inner != bottom[1].count:
            raise self.error(
                f"number of labels ({bottom[1].count}) must match the number of predictions "
                f"({self.outer * self.inner}: data {x.shape} without axis {self.axis})"
            )


class _Loss(_Labeled):
    is_loss = True
    exact_bottoms = 2
    exact_tops = 1
    auto_top_blobs = True  # Caffe's LossLayer: a loss written without a top still gets one
    # bottoms Caffe refuses to backpropagate to (LOG(FATAL) in its Backward)
    label_bottoms = (1,)

    def allow_force_backward(self, bottom_index):
        return bottom_index not in self.label_bottoms

    def reshape(self, bottom, top):
        a, b = bottom[0].shape, bottom[1].shape
        if a[:1] != b[:1]:
            raise self.error(f"data and label must have the same first dimension, got {a} and {b}")
        top[0].reshape(())

    def check_label_grad(self, propagate_down):
        for i in self.label_bottoms:
            if i < len(propagate_down) and propagate_down[i]:
                raise self.error(f"cannot backpropagate to label inputs (bottom {i})")

    # -- shared by the class-scoring losses -----------------------------------
    def read_ignore_label(self):
        lp = self.param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None

    def read_normalization(self, default):
        """Caffe's rule: explicit normalization wins, else the legacy normalize bool, else default."""
        lp = self.param.loss_param
        if lp.HasField("normalization"):
            self.normalization = lp.normalization
        elif lp.HasField("normalize"):
            self.normalization = _NORM.VALID if lp.normalize else _NORM.BATCH_SIZE
        else:
            self.normalization = default

    def normalizer(self, outer, inner, valid_count):
        """Divisor of the summed loss; valid_count is a device scalar or None (no ignore_label)."""
        mode = self.normalization
        if mode == _NORM.VALID and valid_count is not None:
            return self.xp.maximum(valid_count, 1).astype(self.dtype)
        if mode in (_NORM.FULL, _NORM.VALID):
            n = outer * inner
        elif mode == _NORM.BATCH_SIZE:
            n = outer
        elif mode == _NORM.NONE:
            n = 1
        else:
            raise self.error(f"unknown normalization mode {mode}")
        return self.const(max(n, 1))

    def write_class_grad(self, grad, top, bottom):
        """bottom[0].diff from an (outer, C, inner) gradient: scaled by loss weight / normalizer,
        zero at ignored positions (grad is modified)."""
        scale = top[0].diff / self._norm
        if self._valid is not None:
            grad *= self._valid[:, None, :] * scale
        else:
            grad *= scale
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)

    def softmax_and_labels(self, bottom):
        """Softmax of bottom[0] over the class axis (as is and as (outer, C, inner)) and the labels."""
        num_classes = bottom[0].shape[self.axis]
        prob = _softmax(self.xp, bottom[0].data, self.axis)
        prob3 = prob.reshape(self.outer, num_classes, self.inner)
        labels, valid = self.read_labels(bottom[1].data, self.outer, self.inner, num_classes)
        return prob, prob3, labels, valid


@register("SoftmaxWithLoss", v1="SOFTMAX_LOSS")
class SoftmaxWithLoss(_Loss):
    """Softmax over softmax_param.axis followed by the multinomial logistic loss."""

    exact_tops = None
    min_tops = 1
    max_tops = 2
    _cuda = False  # whether the last forward ran the CUDA kernels

    def setup(self, bottom, top):
        self.read_ignore_label()
        self.read_normalization(_NORM.VALID)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        x = bottom[0]
        self.split_at_axis(bottom, self.param.softmax_param.axis)
        if len(top) > 1:
            top[1].reshape(x.shape)

    def forward(self, bottom, top):
        xp = self.xp
        x, label = bottom[0].data, bottom[1].data
        self._cuda = cuda_ops.active(xp, x, label)  # BREWNET_CUDA_KERNELS: no host reads
        if self._cuda:
            classes = bottom[0].shape[self.axis]
            self._prob, total, self._valid, count, bad = cuda_ops.softmax_loss_forward(
                xp, x, label, self.outer, classes, self.inner, self.ignore_label)
            cuda_ops.defer_check(bad, lambda: self.error(f"a label is outside [0, {classes})"))
            self._norm = self.normalizer(self.outer, self.inner, None if self.ignore_label is None else count)
            top[0].data[...] = total / self._norm
            if len(top) > 1:
                top[1].data[...] = self._prob
            return
        prob, prob3, labels, valid = self.softmax_and_labels(bottom)
        p = xp.take_along_axis(prob3, labels[:, None, :], axis=1)[:, 0, :]
        nll = -xp.log(xp.maximum(p, self.const(FLT_MIN)))
        if valid is not None:
            nll = xp.where(valid, nll, self.const(0))
        self._norm = self.normalizer(self.outer, self.inner, None if valid is None else valid.sum())
        top[0].data[...] = nll.sum() / self._norm
        if len(top) > 1:
            top[1].data[...] = prob
        self._prob3, self._labels, self._valid = prob3, labels, valid

    def backward(self, top, propagate_down, bottom):
        self.check_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        if self._cuda:
            return cuda_ops.softmax_loss_backward(self.xp, self._prob, bottom[1].data, self._valid,
                                                  top[0].diff / self._norm, bottom[0].diff,
                                                  bottom[0].shape[self.axis], self.inner)
        grad = self._prob3 - _one_hot(self.xp, self._labels, self._prob3.shape[1])
        self.write_class_grad(grad, top, bottom)


@register("EuclideanLoss", v1="EUCLIDEAN_LOSS")
class EuclideanLoss(_Loss):
    """sum((a - b)^2) / (2 N); gradients for both bottoms."""

    label_bottoms = ()

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            raise self.error(f"inputs must have the same dimension, got {bottom[0].shape} and {bottom[1].shape}")

    def forward(self, bottom, top):
        a = bottom[0].data
        self._diff = a - bottom[1].data.reshape(a.shape)
        d = self._diff.reshape(-1)
        top[0].data[...] = d.dot(d) / self.const(bottom[0].shape[0]) / self.const(2)

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = sign * top[0].diff / self.const(bottom[i].shape[0])
                bottom[i].diff[...] = (alpha * self._diff).reshape(bottom[i].shape)


@register("SigmoidCrossEntropyLoss", v1="SIGMOID_CROSS_ENTROPY_LOSS")
class SigmoidCrossEntropyLoss(_Loss):
    """Cross-entropy of sigmoid(x) against targets in [0, 1], in the overflow-free form."""

    def setup(self, bottom, top):
        self.read_ignore_label()
        # unlike SoftmaxWithLoss, Caffe defaults to BATCH_SIZE here
        self.read_normalization(_NORM.BATCH_SIZE)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"inputs must have the same count, got {bottom[0].shape} and {bottom[1].shape}")
        self.outer = bottom[0].shape[0]
        self.inner = bottom[0].count_range(1)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        positive = (x >= 0).astype(self.dtype)
        # log-likelihood x (t - [x>=0]) - log(1 + exp(-|x|)), negated
        loss = xp.log1p(xp.exp(-xp.abs(x))) - x * (t - positive)
        valid = None
        if self.ignore_label is not None:
            valid = t.astype(xp.int32) != self.ignore_label
            loss = xp.where(valid, loss, self.const(0))
        self._norm = self.normalizer(self.outer, self.inner, None if valid is None else valid.sum())
        top[0].data[...] = loss.sum() / self._norm
        self._valid = valid

    def backward(self, top, propagate_down, bottom):
        self.check_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        x = bottom[0].data
        half = self.const(0.5)
        grad = half * self.xp.tanh(half * x) + half - bottom[1].data.reshape(x.shape)
        if self._valid is not None:
            grad *= self._valid
        grad *= top[0].diff / self._norm
        bottom[0].diff[...] = grad


@register("HingeLoss", v1="HINGE_LOSS")
class HingeLoss(_Loss):
    """One-vs-all hinge: sum_j max(0, 1 - s_ij x_ij) (L1) or its square (L2), over N."""

    def setup(self, bottom, top):
        self.norm = self.param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"unknown norm {self.norm}")

    def forward(self, bottom, top):
        xp = self.xp
        num = bottom[0].shape[0]
        x2 = bottom[0].data.reshape(num, -1)
        # Caffe reads the first N label values, one per sample
        labels, _ = self.read_labels(bottom[1].data.reshape(-1)[:num], num, 1, x2.shape[1])
        # s = -1 at the true class, +1 elsewhere
        sign = xp.where(_one_hot(xp, labels, x2.shape[1])[:, :, 0], self.const(-1), self.const(1))
        margin = xp.maximum(1 + sign * x2, self.const(0))
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            total = margin.sum()
        else:
            total = (margin * margin).sum()
        top[0].data[...] = total / self.const(num)
        self._sign, self._margin = sign, margin

    def backward(self, top, propagate_down, bottom):
        self.check_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        num = self.const(bottom[0].shape[0])
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            grad = self._sign * (self._margin > 0) * (top[0].diff / num)
        else:
            grad = self._sign * self._margin * (2 * top[0].diff / num)
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register("InfogainLoss", v1="INFOGAIN_LOSS")
class InfogainLoss(_Loss):
    """-sum_l H[label, l] log(softmax(x)_l); H from infogain_param.source or a third bottom."""

    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    exact_tops = None
    min_tops = 1
    max_tops = 2
    label_bottoms = (1, 2)

    def setup(self, bottom, top):
        self.read_ignore_label()
        if self.param.loss_param.HasField("normalize"):
            raise self.error('loss_param.normalize is deprecated here; use "normalization"')
        self.normalization = self.param.loss_param.normalization
        self._infogain = None
        if len(bottom) < 3:
            ip = self.param.infogain_loss_param
            if not ip.HasField("source"):
                raise self.error("without a third bottom, infogain_loss_param.source must name the matrix file")
            self._infogain = self.xp.asarray(_read_blobproto(self, ip.source).astype(self.dtype))

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        x = bottom[0]
        self.split_at_axis(bottom, self.param.infogain_loss_param.axis)
        num_classes = x.shape[self.axis]
        h_count = bottom[2].count if len(bottom) > 2 else int(self._infogain.size)
        if h_count != num_classes * num_classes:
            raise self.error(f"the infogain matrix must have {num_classes}x{num_classes} values, got {h_count}")
        if len(top) > 1:
            top[1].reshape(x.shape)

    def _matrix(self, bottom, num_classes):
        h = bottom[2].data if len(bottom) > 2 else self._infogain
        return h.reshape(num_classes, num_classes)

    def forward(self, bottom, top):
        xp = self.xp
        prob, prob3, labels, valid = self.softmax_and_labels(bottom)
        # row H[label] per position, laid out like prob3: (outer, C, inner)
        rows = self._matrix(bottom, prob3.shape[1])[labels].transpose(0, 2, 1)
        terms = rows * xp.log(xp.maximum(prob3, self.const(LOG_THRESHOLD)))
        if valid is not None:
            terms = xp.where(valid[:, None, :], terms, self.const(0))
        self._norm = self.normalizer(self.outer, self.inner, None if valid is None else valid.sum())
        top[0].data[...] = -terms.sum() / self._norm
        if len(top) > 1:
            top[1].data[...] = prob
        self._prob3, self._rows, self._labels, self._valid = prob3, rows, labels, valid

    def backward(self, top, propagate_down, bottom):
        self.check_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        num_classes = self._prob3.shape[1]
        row_sums = self._matrix(bottom, num_classes).sum(axis=1)
        grad = self._prob3 * row_sums[self._labels][:, None, :] - self._rows
        self.write_class_grad(grad, top, bottom)


def _read_blobproto(layer, path):
    """A BlobProto file as a numpy array (netdef's reader when present)."""
    from brewnet import netdef

    try:
        reader = getattr(netdef, "read_blobproto", None)
        if reader is not None:
            return numpy.asarray(reader(path))
        blob = caffe_pb2.BlobProto()
        with open(path, "rb") as f:
            blob.ParseFromString(f.read())
    except (OSError, DefinitionError) as exc:
        raise layer.error(f"cannot read the infogain matrix: {exc}")
    values = blob.double_data if len(blob.double_data) else blob.data
    return numpy.asarray(values, dtype=numpy.float64)


@register("MultinomialLogisticLoss", v1="MULTINOMIAL_LOGISTIC_LOSS")
class MultinomialLogisticLoss(_Loss):
    """-log(p[label]) / N for probabilities p given directly as bottom[0]."""

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[1].count != bottom[1].shape[0]:
            raise self.error(f"label must hold one value per sample (shape (N,) or (N,1,1,1)), got {bottom[1].shape}")

    def forward(self, bottom, top):
        xp = self.xp
        num = bottom[0].shape[0]
        p2 = bottom[0].data.reshape(num, -1)
        labels, _ = self.read_labels(bottom[1].data, num, 1, p2.shape[1])
        p = xp.take_along_axis(p2, labels, axis=1)[:, 0]
        self._p = xp.maximum(p, self.const(LOG_THRESHOLD))
        self._labels = labels
        top[0].data[...] = -xp.log(self._p).sum() / self.const(num)

    def backward(self, top, propagate_down, bottom):
        self.check_label_grad(propagate_down)
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        dim = bottom[0].count // num
        scale = -top[0].diff / self.const(num)
        grad = _one_hot(self.xp, self._labels, dim)[:, :, 0] * (scale / self._p)[:, None]
        bottom[0].diff[...] = grad.reshape(bottom[0].shape)


@register("ContrastiveLoss", v1="CONTRASTIVE_LOSS")
class ContrastiveLoss(_Loss):
    """Pairs (a, b) with a similarity flag: d^2 if similar, max(margin - d, 0)^2 if not; over 2N.

    legacy_version uses max(margin - d^2, 0) for dissimilar pairs.
    """

    exact_bottoms = 3
    # Caffe never propagates to the similarity flag, and does not complain when asked
    label_bottoms = ()

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def setup(self, bottom, top):
        p = self.param.contrastive_loss_param
        self.margin = self.const(p.margin)
        self.legacy = p.legacy_version

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        num = bottom[0].shape[0]
        if bottom[0].count != bottom[1].count or bottom[1].shape[0] != num:
            raise self.error(f"the two inputs must have the same shape (N, C), got {bottom[0].shape} and {bottom[1].shape}")
        if bottom[2].count != num:
            raise self.error(f"the similarity input must hold one value per pair, got {bottom[2].shape}")

    def forward(self, bottom, top):
        xp = self.xp
        num = bottom[0].shape[0]
        self._diff = (bottom[0].data - bottom[1].data.reshape(bottom[0].shape)).reshape(num, -1)
        self._dist_sq = (self._diff * self._diff).sum(axis=1)
        self._similar = bottom[2].data.reshape(-1).astype(xp.int32) != 0
        zero = self.const(0)
        if self.legacy:
            apart = xp.maximum(self.margin - self._dist_sq, zero)
        else:
            apart = xp.maximum(self.margin - xp.sqrt(self._dist_sq), zero) ** 2
        loss = xp.where(self._similar, self._dist_sq, apart).sum()
        top[0].data[...] = loss / self.const(num) / self.const(2)

    def backward(self, top, propagate_down, bottom):
        xp = self.xp
        num = bottom[0].shape[0]
        for i, sign in ((0, 1), (1, -1)):
            if not propagate_down[i]:
                continue
            alpha = sign * top[0].diff / self.const(num)
            if self.legacy:
                mdist = self.margin - self._dist_sq
                beta = -alpha
            else:
                dist = xp.sqrt(self._dist_sq)
                mdist = self.margin - dist
                beta = -alpha * mdist / (dist + self.const(1e-4))
            coef = xp.where(self._similar, alpha, xp.where(mdist > 0, beta, self.const(0)))
            bottom[i].diff[...] = (coef[:, None] * self._diff).reshape(bottom[i].shape)


@register("Accuracy", v1="ACCURACY")
class Accuracy(_Labeled):
    """Top-k accuracy over accuracy_param.axis; optional second top: accuracy per class."""

    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    has_backward = False  # Caffe's backward is NOT_IMPLEMENTED: it cannot be used as a loss

    def allow_force_backward(self, bottom_index):
        # no gradient exists (Caffe would abort); keep force_backward from asking for one
        return False

    def setup(self, bottom, top):
        p = self.param.accuracy_param
        self.top_k = p.top_k
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        x = bottom[0]
        if bottom[1].count == 0 or self.top_k > x.count // bottom[1].count:
            raise self.error(f"top_k ({self.top_k}) must be at most the number of classes")
        self.split_at_axis(bottom, self.param.accuracy_param.axis)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((x.shape[self.axis],))

    def forward(self, bottom, top):
        xp = self.xp
        num_classes = bottom[0].shape[self.axis]
        if len(top) == 1 and cuda_ops.active(xp, bottom[0].data, bottom[1].data):  # BREWNET_CUDA_KERNELS
            correct, count, bad = cuda_ops.accuracy(xp, bottom[0].data, bottom[1].data, self.outer, num_classes,
                                                    self.inner, self.top_k, self.ignore_label)
            cuda_ops.defer_check(bad, lambda: self.error(f"a label is outside [0, {num_classes})"))
            total = self.const(max(self.outer * self.inner, 1)) if self.ignore_label is None else xp.maximum(count, 1)
            top[0].data[...] = correct / total
            return
        scores = bottom[0].data.reshape(self.outer, num_classes, self.inner)
        labels, valid = self.read_labels(bottom[1].data, self.outer, self.inner, num_classes)
        true_score = xp.take_along_axis(scores, labels[:, None, :], axis=1)
        # correct when at most top_k classes (the true one included) score >= the true class
        at_least = (scores >= true_score).sum(axis=1)
        correct = at_least <= self.top_k
        if valid is not None:
            correct &= valid
        # Caffe reports 0 when every label is ignored
        count = self.const(max(self.outer * self.inner, 1)) if valid is None else xp.maximum(valid.sum(), 1)
        top[0].data[...] = correct.sum() / count
        if len(top) > 1:
            onehot = _one_hot(xp, labels, num_classes)
            if valid is not None:
                onehot &= valid[:, None, :]
            per_class_hits = (onehot & correct[:, None, :]).sum(axis=(0, 2))
            # classes never seen get 0 (hits are 0 there too)
            top[1].data[...] = per_class_hits / xp.maximum(onehot.sum(axis=(0, 2)), 1)
