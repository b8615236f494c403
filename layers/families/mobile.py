"""Layers of the mobile-net and SENet forks: ShuffleChannel, the depthwise convolution types, Axpy.

- ShuffleChannel (farmingyard/ShuffleNet): channels seen as a (group, C/group) grid, transposed.
- DepthwiseConvolution (yonghenglh6/DepthwiseConvolution) and ConvolutionDepthwise
  (farmingyard/ShuffleNet's deploy nets): Convolution with group = channels, whatever
  convolution_param says of group; they run on the depthwise kernel, as every Convolution with
  group == channels does (layers/kernels/depthwise.py).
- Axpy (hujie-frank/SENet): top = a * x + y, a (N, C) or (N, C, 1, 1) scaling x's channels.
"""

from brewnet.layers.base import Layer
from brewnet.layers.families.conv import Convolution
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


@register("ShuffleChannel")
class ShuffleChannel(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        self.group = self.param.shuffle_channel_param.group
        if self.group <= 0:
            raise self.error("shuffle_channel_param.group must be positive")

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2 or shape[1] % self.group:
            raise self.error(f"channels of {shape} are not a multiple of group {self.group}")
        if top[0] is bottom[0]:
            raise self.error("cannot run in place")
        top[0].reshape(shape)

    def _grid(self, array, rows):
        """(N, rows, C/rows, rest) view of an (N, C, ...) array."""
        n, c = array.shape[:2]
        return array.reshape(n, rows, c // rows, -1)

    def forward(self, bottom, top):
        # output channel j * group + i is input channel i * (C / group) + j
        x = bottom[0].data
        out = self._grid(top[0].data, x.shape[1] // self.group)
        out[...] = self._grid(x, self.group).transpose(0, 2, 1, 3)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff
            dx = self._grid(bottom[0].diff, self.group)
            dx[...] = self._grid(dy, dy.shape[1] // self.group).transpose(0, 2, 1, 3)


class _Depthwise(Convolution):
    """Convolution whose group is the input's channel count."""

    def setup(self, bottom, top):
        cp = self.param.convolution_param
        channels = bottom[0].shape[bottom[0].canonical_axis(cp.axis)]
        if cp.group not in (1, channels):
            raise self.error(f"group {cp.group} given, but a depthwise convolution has group = channels ({channels})")
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(self.param)
        param.convolution_param.group = channels
        self.param = param
        super().setup(bottom, top)


@register("DepthwiseConvolution")
class DepthwiseConvolution(_Depthwise):
    pass


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(_Depthwise):
    pass


@register("Axpy")
class Axpy(Layer):
    exact_bottoms = 3
    exact_tops = 1

    def reshape(self, bottom, top):
        a, x, y = (b.shape for b in bottom)
        if len(x) < 2 or a[:2] != x[:2] or any(d != 1 for d in a[2:]):
            raise self.error(f"the scale {a} must be (N, C) or (N, C, 1, 1) of x {x}")
        if x != y:
            raise self.error(f"x {x} and y {y} must have one shape")
        if top[0] is bottom[1]:
            raise self.error("cannot run in place on x")
        top[0].reshape(x)

    def _scale(self, array, like):
        """a as (N, C, 1, ...) against x's shape."""
        return array.reshape(array.shape[:2] + (1,) * (len(like.shape) - 2))

    def forward(self, bottom, top):
        a, x, y = (b.data for b in bottom)
        top[0].data[...] = self._scale(a, x) * x + y

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        a, x = bottom[0].data, bottom[1].data
        if propagate_down[0]:
            n, c = x.shape[:2]
            bottom[0].diff[...] = (dy * x).reshape(n, c, -1).sum(axis=2).reshape(bottom[0].shape)
        if propagate_down[1]:
            bottom[1].diff[...] = self._scale(a, x) * dy
        if propagate_down[2] and bottom[2] is not top[0]:
            bottom[2].diff[...] = dy
