"""Caffe's DataTransformer, vectorized over a batch (host numpy).

Per sample, Caffe computes ``out[c, h, w'] = (x[c, h_off + h, w_off + w] - mean) * scale``
where ``mean`` is the mean image at the same (uncropped) position or the
channel's mean_value, and ``w' = width - 1 - w`` when the sample is mirrored.
Crop offsets are random at TRAIN and centred at TEST; mirroring is random in
both phases whenever ``mirror`` is set (as in Caffe).
"""

import numpy

from brewnet.layers.dataio.db import read_mean_file
from brewnet.netdef import DefinitionError, caffe_pb2


class DataTransformer:
    def __init__(self, param, phase, rng, dtype=numpy.float32, where="data transformer"):
        # how errors name the owner, e.g. "layer 'data' (Data)" (the loader thread holds no layer)
        self.where = where
        self.dtype = numpy.dtype(dtype)
        self.phase = phase
        self.rng = rng
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = self.dtype.type(param.scale)
        if param.force_color and param.force_gray:
            raise self.error("cannot set both force_color and force_gray")
        # decoding mode for encoded data: True colour, False gray, None as stored
        self.color = True if param.force_color else False if param.force_gray else None
        self.mean = None
        self.mean_values = None
        if param.HasField("mean_file"):
            if len(param.mean_value):
                raise self.error("cannot specify mean_file and mean_value at the same time")
            mean = read_mean_file(param.mean_file, where)
            if mean.ndim == 4 and mean.shape[0] == 1:
                mean = mean[0]
            if mean.ndim != 3:
                raise self.error(f"mean file {param.mean_file} holds shape {mean.shape}, expected (1, C, H, W)")
            self.mean = mean.astype(self.dtype)
        elif len(param.mean_value):
            self.mean_values = numpy.asarray(param.mean_value, dtype=self.dtype)

    def error(self, message):
        return DefinitionError(f"{self.where}: {message}")

    def output_shape(self, channels, height, width):
        """(C, H, W) after the transformation (Caffe's InferBlobShape)."""
        if channels <= 0:
            raise self.error("data has no channels")
        if self.crop and (height < self.crop or width < self.crop):
            raise self.error(f"crop_size {self.crop} is larger than the {height}x{width} data")
        return (channels, self.crop or height, self.crop or width)

    def __call__(self, batch):
        """(N, C, H, W) uint8 or float -> transformed (N, C, H', W') of self.dtype."""
        n, c, h, w = batch.shape
        self.output_shape(c, h, w)
        x = batch.astype(self.dtype)
        if self.mean is not None:
            if self.mean.shape != (c, h, w):
                raise self.error(f"mean file has shape {self.mean.shape}, data has {(c, h, w)}")
            x -= self.mean
        elif self.mean_values is not None:
            if len(self.mean_values) not in (1, c):
                raise self.error(f"specify either 1 mean_value or as many as channels: {c}")
            x -= self.mean_values.reshape(-1, 1, 1)
        x = self._crop_and_mirror(x)
        if self.scale != 1:
            x *= self.scale
        return x

    def _crop_and_mirror(self, x):
        n, c, h, w = x.shape
        size_h, size_w = (self.crop, self.crop) if self.crop else (h, w)
        flip = self.rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        if self.crop and self.phase == caffe_pb2.TRAIN:
            h_off = self.rng.integers(0, h - size_h + 1, size=n)
            w_off = self.rng.integers(0, w - size_w + 1, size=n)
        else:
            top, left = (h - size_h) // 2, (w - size_w) // 2
            if flip is None:
                return numpy.ascontiguousarray(x[:, :, top:top + size_h, left:left + size_w])
            h_off = numpy.full(n, top)
            w_off = numpy.full(n, left)
        rows = h_off[:, None] + numpy.arange(size_h)
        steps = numpy.arange(size_w)
        if flip is not None:
            steps = numpy.where(flip[:, None], size_w - 1 - steps, steps)
        cols = w_off[:, None] + steps
        return x[numpy.arange(n)[:, None, None, None], numpy.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
