"""Vision layers: importing this module registers them all.

Convolution / Deconvolution / Im2col live in layers/conv.py (kernels in layers/im2col.py),
Pooling / SPP in layers/pooling.py, LRN in layers/lrn.py; Crop is here.
"""

from netdef import DefinitionError

from . import conv, lrn, pooling  # noqa: F401  (registration)
from .base import Layer
from .registry import register


@register("Crop")
class Crop(Layer):
    """Crop bottom[0] to the shape of bottom[1] on the axes from `axis` on, at the given offsets."""

    exact_bottoms = 2
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def setup(self, bottom, top):
        cp = self.param.crop_param
        n = bottom[0].num_axes
        self.axis = bottom[0].canonical_axis(cp.axis)
        offsets = list(cp.offset)
        if len(offsets) > 1 and self.axis + len(offsets) != n:
            raise DefinitionError(
                f"layer {self.name!r} (Crop): {len(offsets)} offsets given for the {n - self.axis} axes "
                f"from axis {self.axis} of a {n}-axis input; give one, or one per cropped axis")
        self.offsets = offsets

    def reshape(self, bottom, top):
        src, ref = bottom[0].shape, bottom[1].shape
        if len(src) != len(ref):
            raise ValueError(f"layer {self.name!r} (Crop): bottoms have different numbers of axes: {src} vs {ref}")
        slices, shape = [], []
        for i, size in enumerate(src):
            if i < self.axis:
                slices.append(slice(None))
                shape.append(size)
                continue
            off = 0
            if len(self.offsets) == 1:
                off = self.offsets[0]
            elif self.offsets:
                off = self.offsets[i - self.axis]
            if size - off < ref[i]:
                raise ValueError(
                    f"layer {self.name!r} (Crop): the crop for axis {i} is out of bounds: size {ref[i]} "
                    f"at offset {off} in an axis of size {size}")
            slices.append(slice(off, off + ref[i]))
            shape.append(ref[i])
        self.slices = tuple(slices)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top, propagate_down, bottom):
        # Caffe never propagates to the reference bottom
        if propagate_down[0]:
            dx = bottom[0].diff
            dx.fill(0)
            dx[self.slices] = top[0].diff
