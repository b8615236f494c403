"""Layers without inputs or outputs: Input, DummyData and Parameter (sources), Silence (sink)."""


from brewnet.layers.base import Layer
from brewnet.layers.fillers import fill
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


@register("Parameter")
class Parameter(Layer):
    exact_bottoms = 0
    exact_tops = 1

    def setup(self, bottom, top):
        shape = tuple(self.param.parameter_param.shape.dim)
        if not self.blobs:
            self.blobs.append(self.make_blob(shape))  # zeros, as Caffe's fresh blob
        top[0].reshape(self.blobs[0].shape)

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)
        top[0].data[...] = self.blobs[0].data

    def backward(self, top, propagate_down, bottom):
        if self.param_needs_grad(0):
            self.blobs[0].diff += top[0].diff


@register("Silence", v1="SILENCE")
class Silence(Layer):
    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register("Input")
class Input(Layer):
    exact_bottoms = 0
    min_tops = 1
    has_backward = False  # no bottoms: nothing to differentiate

    def setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"input_param.shape must be given once, once per top ({len(top)}), "
                             f"or not at all; got {len(shapes)}")
        for i, t in enumerate(top):
            if shapes:
                t.reshape(tuple(shapes[0 if len(shapes) == 1 else i].dim))

    def reshape(self, bottom, top):
        pass  # the user (or the net) sizes and fills inputs

    def forward(self, bottom, top):
        pass


@register("DummyData", v1="DUMMY_DATA")
class DummyData(Layer):
    exact_bottoms = 0
    min_tops = 1
    has_backward = False  # no bottoms: nothing to differentiate

    def setup(self, bottom, top):
        p = self.param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise self.error(f"dummy_data_param needs 0, 1 or {n} data_filler(s), got {len(p.data_filler)}")
        legacy = [p.num, p.channels, p.height, p.width]
        if any(len(f) for f in legacy):
            if len(p.shape):
                raise self.error("dummy_data_param: give shape or num/channels/height/width, not both")
            for name, f in zip(("num", "channels", "height", "width"), legacy):
                if len(f) not in (1, n):
                    raise self.error(f"dummy_data_param.{name} must be given once or once per top ({n})")
            shapes = [tuple(int(f[0 if len(f) == 1 else i]) for f in legacy) for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise self.error(f"dummy_data_param.shape must be given once or once per top ({n})")
            shapes = [tuple(p.shape[0 if len(p.shape) == 1 else i].dim) for i in range(n)]
        if len(p.data_filler) == 0:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        else:
            fillers = list(p.data_filler)
        self.fillers = fillers
        self.shapes = shapes
        # constant fillers fill once here; the others refill on every forward (Caffe's refill_)
        self.refill = [f.type != "constant" for f in fillers]
        for i, t in enumerate(top):
            t.reshape(shapes[i])
            f = self._filler(i)
            if not self.refill[f]:
                fill(t, self.fillers[f], self.rng)

    def _filler(self, top_index):
        return top_index if len(self.fillers) > 1 else 0

    def reshape(self, bottom, top):
        for t, shape in zip(top, self.shapes):
            t.reshape(shape)

    def forward(self, bottom, top):
        for i, t in enumerate(top):
            f = self._filler(i)
            if self.refill[f]:
                fill(t, self.fillers[f], self.rng)
