"""Layers of the segmentation forks: Interp (DeepLab/PSPNet), Upsample, BN, DenseImageData (SegNet).

- Interp: bilinear resize with aligned corners (the first and last pixels of input and output
  coincide), output size from height/width, zoom_factor and/or shrink_factor, after cropping
  by pad_beg/pad_end (<= 0). Being linear, it is two small matrices: y = Mh x Mw^T, and its
  gradient dx = Mh^T dy Mw; the matrices hold the fork's own weights (positions in float32).
- Upsample: SegNet's unpooling. bottom[1] is a MAX Pooling's mask top (flat index of each
  maximum in its H*W plane); each value goes back to where its maximum came from, the rest of
  the output is zero. The gradient reads the top diff at those places.
- BN: SegNet's batch normalization with its own scale and shift, one layer where BVLC needs
  BatchNorm + Scale. bn_mode LEARN normalizes by the batch's statistics (over N, H, W; biased
  variance, eps 1e-9) in every phase and keeps no running averages (SegNet computes them
  afterwards with a script and folds them into scale and shift); INFERENCE is y = scale * x +
  shift. Optional tops 2 and 3 are the batch mean and variance (1, C, 1, 1).
- DenseImageData: SegNet's image list of "IMAGE LABEL_IMAGE" pairs: data (N, C, H, W) through
  transform_param (mean, scale) and a label map (N, 1, H, W) of the label image's gray values,
  resized with nearest neighbours (labels are classes, never blended); its own mirror and
  crop_height/crop_width cut image and label alike (transform_param's crop and mirror would
  not, so they are refused, as in the fork).
"""

import os

import numpy

from brewnet.layers import fillers
from brewnet.layers.base import Layer, layer_error, set_rng_state
from brewnet.layers.dataio.images import read_image
from brewnet.layers.families.data import _child_rng, _next_indices, _PrefetchingDataLayer, _rng_state
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


# -- Interp -------------------------------------------------------------------------------
def interp_matrix(size_in, size_out, dtype):
    """(size_out, size_in) bilinear weights with aligned corners, the fork's arithmetic."""
    ratio = numpy.float32((size_in - 1) / (size_out - 1)) if size_out > 1 else numpy.float32(0)
    pos = ratio * numpy.arange(size_out, dtype=numpy.float32)
    low = pos.astype(numpy.int64)
    step = (low < size_in - 1).astype(numpy.int64)  # the last input row has no neighbour
    frac = (pos - low).astype(dtype)
    matrix = numpy.zeros((size_out, size_in), dtype=dtype)
    rows = numpy.arange(size_out)
    numpy.add.at(matrix, (rows, low), 1 - frac)
    numpy.add.at(matrix, (rows, low + step), frac)
    return matrix


@register("Interp")
class Interp(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.interp_param
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error("only pad_beg, pad_end <= 0 (cropping) are supported, as in the fork")
        if not (p.HasField("zoom_factor") or p.HasField("shrink_factor") or
                (p.HasField("height") and p.HasField("width"))):
            raise self.error("interp_param needs zoom_factor, shrink_factor, or height and width")
        for field in ("zoom_factor", "shrink_factor"):
            if p.HasField(field) and getattr(p, field) < 1:
                raise self.error(f"{field} must be at least 1")
        self._key = None

    def _out_size(self, size):
        p = self.param.interp_param
        if p.HasField("shrink_factor") and not p.HasField("zoom_factor"):
            return (size - 1) // p.shrink_factor + 1
        if p.HasField("zoom_factor") and not p.HasField("shrink_factor"):
            return size + (size - 1) * (p.zoom_factor - 1)
        if p.HasField("height") and p.HasField("width"):
            return None  # given outright
        shrunk = (size - 1) // p.shrink_factor + 1
        return shrunk + (shrunk - 1) * (p.zoom_factor - 1)

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes, got {bottom[0].shape}")
        if top[0] is bottom[0]:
            raise self.error("cannot run in place (the output has another size)")
        n, c, h, w = bottom[0].shape
        crop = self.pad_beg + self.pad_end
        h_eff, w_eff = h + crop, w + crop
        if h_eff <= 0 or w_eff <= 0:
            raise self.error(f"pad_beg/pad_end crop all of the {h}x{w} input")
        p = self.param.interp_param
        out_h, out_w = self._out_size(h_eff), self._out_size(w_eff)
        if out_h is None:
            out_h, out_w = p.height, p.width
        if out_h <= 0 or out_w <= 0:
            raise self.error(f"output size {out_h}x{out_w} is not positive")
        key = (h_eff, w_eff, out_h, out_w)
        if self._key != key:
            self._mh = self.xp.asarray(interp_matrix(h_eff, out_h, self.dtype))
            self._mw_t = self.xp.asarray(interp_matrix(w_eff, out_w, self.dtype).T.copy())
            self._key = key
        self._crop = (slice(-self.pad_beg, -self.pad_beg + h_eff), slice(-self.pad_beg, -self.pad_beg + w_eff))
        top[0].reshape(n, c, out_h, out_w)

    def forward(self, bottom, top):
        x = bottom[0].data[(Ellipsis,) + self._crop]
        top[0].data[...] = self.xp.matmul(self.xp.matmul(self._mh, x), self._mw_t)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        if self.pad_beg or self.pad_end:
            dx[...] = 0
        dx[(Ellipsis,) + self._crop] = self.xp.matmul(self.xp.matmul(self._mh.T, top[0].diff), self._mw_t.T)


# -- Upsample -----------------------------------------------------------------------------
@register("Upsample")
class Upsample(Layer):
    exact_bottoms = 2
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0  # the mask holds indices

    def setup(self, bottom, top):
        p = self.param.upsample_param
        if p.HasField("upsample_h") and p.HasField("upsample_w"):
            self.size = (p.upsample_h, p.upsample_w)
            if min(self.size) <= 1:
                raise self.error("upsample_h and upsample_w must be greater than 1")
            self.scale = self.pad_out = None
        else:
            if p.HasField("scale_h") != p.HasField("scale_w") or (p.HasField("scale") and p.HasField("scale_h")):
                raise self.error("give upsample_h and upsample_w, or scale, or scale_h and scale_w")
            self.scale = (p.scale_h, p.scale_w) if p.HasField("scale_h") else (p.scale,) * 2
            if min(self.scale) <= 1:
                raise self.error(f"scale must be greater than 1, got {self.scale}")
            self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
            if (self.pad_out[0] and self.scale[0] != 2) or (self.pad_out[1] and self.scale[1] != 2):
                raise self.error("pad_out_h/pad_out_w need a scale of 2")
            self.size = None

    def reshape(self, bottom, top):
        shape, mask = bottom[0].shape, bottom[1].shape
        if len(shape) != 4:
            raise self.error(f"input must have 4 axes, got {shape}")
        if mask != shape:
            raise self.error(f"the mask {mask} must have the input's shape {shape}")
        if top[0] is bottom[0] or top[0] is bottom[1]:
            raise self.error("cannot run in place (the output has another size)")
        n, c, h, w = shape
        if self.size is None:
            out = (h * self.scale[0] - self.pad_out[0], w * self.scale[1] - self.pad_out[1])
        else:
            out = self.size
        top[0].reshape(n, c, *out)
        self._planes, self._plane = n * c, out[0] * out[1]
        self._flat = None

    def _targets(self, mask):
        """Flat indices into the top of each input value (checked against the plane's size)."""
        xp = self.xp
        index = mask.reshape(self._planes, -1).astype(xp.int64)
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self._plane):
            raise self.error(f"mask index out of range for a {self._plane}-pixel output plane: "
                             "check the scale against the pooling that made the mask")
        return (index + xp.arange(self._planes, dtype=xp.int64)[:, None] * self._plane).reshape(-1)

    def forward(self, bottom, top):
        self._flat = self._targets(bottom[1].data)
        out = top[0].data.reshape(-1)
        out[...] = 0
        out[self._flat] = bottom[0].data.reshape(-1)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            flat = self._flat if self._flat is not None else self._targets(bottom[1].data)
            bottom[0].diff.reshape(-1)[...] = top[0].diff.reshape(-1)[flat]


# -- BN (SegNet) ----------------------------------------------------------------------------
@register("BN")
class BN(Layer):
    exact_bottoms = 1
    min_tops = 1
    max_tops = 3
    eps = 1e-9  # SegNet's, fixed

    def __init__(self, param, *args, **kwargs):
        super().__init__(param, *args, **kwargs)
        if param.bn_param.bn_mode != caffe_pb2.BNParameter.LEARN:
            self.max_tops = 1  # the statistics tops exist in LEARN only, as in the fork

    def setup(self, bottom, top):
        p = self.param.bn_param
        self.learn = p.bn_mode == caffe_pb2.BNParameter.LEARN
        if bottom[0].num_axes < 2:
            raise self.error(f"input needs a channel axis, got {bottom[0].shape}")
        c = bottom[0].shape[1]
        if self.blobs:
            got = [tuple(b.shape) for b in self.blobs]
            if len(got) != 2 or any(int(numpy.prod(s)) != c for s in got):
                raise self.error(f"expects 2 parameter blobs of {c} values (scale, shift), got {got}")
        else:
            for filler in (p.scale_filler, p.shift_filler):
                self.blobs.append(self.make_blob((1, c, 1, 1)))
                fillers.fill(self.blobs[-1], filler, self.rng)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        top[0].reshape(shape)
        for t in top[1:]:
            t.reshape(1, shape[1], 1, 1)

    def _view(self, array):
        return array.reshape(array.shape[0], array.shape[1], -1)  # (N, C, rest)

    def _param(self, i):
        return self.blobs[i].data.reshape(1, -1, 1)

    def forward(self, bottom, top):
        x = self._view(bottom[0].data)
        y = self._view(top[0].data)
        if not self.learn:
            # backward needs x for the scale's gradient: keep a copy when running in place
            self._x_norm = x.copy() if top[0] is bottom[0] else x
            y[...] = self._param(0) * x + self._param(1)
            return
        mean = x.mean(axis=(0, 2), keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=(0, 2), keepdims=True)
        self._inv_std = 1 / self.xp.sqrt(var + self.dtype.type(self.eps))
        self._x_norm = centered * self._inv_std
        y[...] = self._param(0) * self._x_norm + self._param(1)
        for t, stat in zip(top[1:], (mean, var)):
            t.data[...] = stat.reshape(t.shape)

    def backward(self, top, propagate_down, bottom):
        dy = self._view(top[0].diff)
        normed = self._x_norm
        if self.param_needs_grad(0):
            self.blobs[0].diff += (dy * normed).sum(axis=(0, 2)).reshape(self.blobs[0].shape)
        if self.param_needs_grad(1):
            self.blobs[1].diff += dy.sum(axis=(0, 2)).reshape(self.blobs[1].shape)
        if not propagate_down[0]:
            return
        dx = self._view(bottom[0].diff)
        d_norm = dy * self._param(0)
        if not self.learn:
            dx[...] = d_norm
            return
        # the batch statistics depend on x too: remove the mean and the x_norm component
        dx[...] = (d_norm - d_norm.mean(axis=(0, 2), keepdims=True)
                   - normed * (d_norm * normed).mean(axis=(0, 2), keepdims=True)) * self._inv_std


# -- DenseImageData (SegNet) ----------------------------------------------------------------
def read_pair_list(path, where):
    """[(image, label image)] of a SegNet list file: two whitespace-separated names a line."""
    from brewnet.netdef import DefinitionError

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{where}: cannot read the image list {path}: {exc}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        names = line.split()
        if not names:
            continue
        if len(names) != 2:
            raise DefinitionError(f"{where}: expected 'IMAGE LABEL_IMAGE', got {line!r}", path=path, line=number)
        pairs.append((names[0], names[1]))
    if not pairs:
        raise DefinitionError(f"{where}: the image list {path} is empty")
    return pairs


def resize_nearest(img, height, width):
    """cv::resize with INTER_NEAREST of an HWC image: source index floor(i * src / dst)."""
    h, w = img.shape[:2]
    if (h, w) == (height, width) or height <= 0 or width <= 0:
        return img
    rows = numpy.minimum((numpy.arange(height) * (h / height)).astype(numpy.int64), h - 1)
    cols = numpy.minimum((numpy.arange(width) * (w / width)).astype(numpy.int64), w - 1)
    return img[rows[:, None], cols[None, :]]


@register("DenseImageData")
class DenseImageData(_PrefetchingDataLayer):
    exact_tops = 2
    min_tops = None
    max_tops = None

    def setup(self, bottom, top):
        p = self.param.dense_image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("new_height and new_width must be set together")
        if (p.crop_height > 0) != (p.crop_width > 0):
            raise self.error("crop_height and crop_width must be set together")
        if p.batch_size <= 0:
            raise self.error("dense_image_data_param.batch_size must be positive")
        tp = self.param.transform_param
        if tp.crop_size or tp.mirror:
            raise self.error("transform_param's crop_size and mirror would cut the image and not its label: "
                             "use dense_image_data_param's crop_height/crop_width and mirror")
        if not p.source or not os.path.isfile(p.source):
            raise self.error(f"image list {p.source or '(source not set)'} does not exist")
        pairs = read_pair_list(p.source, self.where)
        self.epoch_size = len(pairs)
        rng = _child_rng(self.rng)
        order_rng = _rng_state(rng)
        order = rng.permutation(len(pairs)) if p.shuffle else numpy.arange(len(pairs))
        position = int(self.rng.integers(0, p.rand_skip)) if p.rand_skip else 0
        if position >= len(pairs):
            raise self.error(f"rand_skip {p.rand_skip}: not enough images ({len(pairs)}) to skip {position}")
        root, size, color = p.root_folder, (int(p.new_height), int(p.new_width)), bool(p.is_color)
        crop = (int(p.crop_height), int(p.crop_width))
        name, type_name = self.name, self.type  # the loader holds no reference to the layer

        def read(i):
            image_path, label_path = root + pairs[i][0], root + pairs[i][1]
            img = read_image(image_path, size[0], size[1], color)
            label = read_image(label_path, 0, 0, False)
            for path, loaded in ((image_path, img), (label_path, label)):
                if loaded is None:
                    raise layer_error(name, type_name, f"could not load image {path}")
            label = resize_nearest(label, *size)
            if label.shape[:2] != img.shape[:2]:
                raise layer_error(name, type_name, f"label image {label_path} is {label.shape[1]}x{label.shape[0]}, "
                                  f"its image {img.shape[1]}x{img.shape[0]}")
            if crop[0] and (img.shape[0] < crop[0] or img.shape[1] < crop[1]):
                raise layer_error(name, type_name, f"image {image_path} is smaller than the crop {crop[1]}x{crop[0]}")
            return img, label

        transform = self._transformer()
        first, _ = read(order[position])
        c, h, w = first.shape[2], crop[0] or first.shape[0], crop[1] or first.shape[1]
        batch_size = int(p.batch_size)
        self._shapes = ((batch_size, c, h, w), (batch_size, 1, h, w))
        state = {"order": order, "pos": position, "order_rng": order_rng}
        dtype = self.dtype
        rank, ranks = self._shard()
        draw = _child_rng(self.rng)  # mirror and crop offsets

        def load():
            picks = _next_indices(state, batch_size * ranks, len(pairs), p.shuffle, rng)
            images, labels = [], []
            for i in picks[rank::ranks]:
                img, label = read(i)
                if p.mirror and draw.integers(0, 2):
                    img, label = img[:, ::-1], label[:, ::-1]
                if crop[0]:
                    top_ = int(draw.integers(0, img.shape[0] - crop[0] + 1))
                    left = int(draw.integers(0, img.shape[1] - crop[1] + 1))
                    img = img[top_:top_ + crop[0], left:left + crop[1]]
                    label = label[top_:top_ + crop[0], left:left + crop[1]]
                if img.shape[:2] != (h, w):
                    raise layer_error(name, type_name, f"image {root + pairs[i][0]} is {img.shape[1]}x{img.shape[0]}, "
                                      f"the batch's is {w}x{h} (set new_height/new_width or crop_height/crop_width)")
                images.append(img)
                labels.append(label)
            data = transform(numpy.stack(images).transpose(0, 3, 1, 2))
            return data, numpy.stack(labels).transpose(0, 3, 1, 2).astype(dtype)

        def capture():
            return {"position": state["pos"], "images": len(pairs),
                    "order_rng": state["order_rng"] if p.shuffle else None,
                    "draw_rng": _rng_state(draw), "transform_rng": _rng_state(transform.rng)}

        def apply(saved):
            if saved["images"] != len(pairs) or not 0 <= saved["position"] < len(pairs):
                raise ValueError(f"saved for a list of {saved['images']} images, {p.source} has {len(pairs)}")
            if p.shuffle:
                set_rng_state(rng, saved["order_rng"], name, type_name)
                state["order_rng"] = saved["order_rng"]
                state["order"] = rng.permutation(len(pairs))
            state["pos"] = int(saved["position"])
            set_rng_state(draw, saved["draw_rng"], name, type_name)
            set_rng_state(transform.rng, saved["transform_rng"], name, type_name)

        self._start(load, self.param.data_param.prefetch, capture, apply)
