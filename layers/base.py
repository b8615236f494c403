"""The layer contract, after Caffe's Layer: setup once, reshape, forward, backward.

A layer works on lists of Blobs. It computes with ``self.xp`` (numpy or cupy)
and never branches on the device. Learnable parameters live in ``self.blobs``;
their diffs are *accumulated* by backward (the net zeroes them before each
iteration), while bottom diffs are *written* (overwritten), as in Caffe.
"""

import numpy

from brewnet.layers.blob import Blob
from brewnet.netdef.errors import DefinitionError


class LayerError(DefinitionError):
    """A layer's parameters or inputs that it cannot work with; the message names the layer."""


class Layer:
    type = None  # set by @register

    # blob-count contract; None means "no constraint"
    exact_bottoms = None
    min_bottoms = None
    max_bottoms = None
    exact_tops = None
    min_tops = None
    max_tops = None
    # loss layers get loss_weight 1 on their first top unless the prototxt says otherwise
    is_loss = False
    # True (or a property that is True) where forward draws from self.rng: the
    # default resume_state then saves the generator, so a resumed run draws alike
    rng_in_forward = False

    # True for layers whose backward is meaningless w.r.t. some bottoms (labels, indices)
    def allow_force_backward(self, bottom_index):
        return True

    def __init__(self, param, xp=numpy, phase=None, rng=None, dtype=numpy.float32):
        from brewnet.netdef import caffe_pb2

        self.param = param  # caffe_pb2.LayerParameter
        self.name = param.name
        self.xp = xp
        self.dtype = numpy.dtype(dtype)
        self.phase = caffe_pb2.TEST if phase is None else phase
        # host-side generator: fillers, dropout masks, shuffling (seeded by the net)
        self.rng = rng if rng is not None else numpy.random.default_rng()
        self.blobs = []  # learnable Blobs, Caffe's order
        # set by the Net: False where lr_mult is 0 (skip that param's gradient)
        self.param_propagate_down = []

    # -- helpers for subclasses -------------------------------------------
    def error(self, message):
        """The one error a layer raises for a user's mistake: ``raise self.error("...")``."""
        return LayerError(f"layer {self.name!r} ({self.type}): {message}")

    def make_blob(self, shape):
        return Blob(shape, xp=self.xp, dtype=self.dtype, name=f"{self.name}/param{len(self.blobs)}")

    def param_needs_grad(self, index):
        flags = self.param_propagate_down
        return flags[index] if index < len(flags) else True

    @property
    def train(self):
        from brewnet.netdef import caffe_pb2

        return self.phase == caffe_pb2.TRAIN

    def check_blob_counts(self, n_bottom, n_top):
        def check(n, exact, lo, hi, what):
            if exact is not None and n != exact:
                raise self.error(f"takes {exact} {what} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {what} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {what} blob(s), got {n}")

        check(n_bottom, self.exact_bottoms, self.min_bottoms, self.max_bottoms, "bottom")
        check(n_top, self.exact_tops, self.min_tops, self.max_tops, "top")

    # -- the contract --------------------------------------------------------
    def setup(self, bottom, top):
        """Read parameters, create ``self.blobs`` if empty. Called once."""

    def reshape(self, bottom, top):
        """Size the tops (and internal buffers) from the bottoms."""
        raise NotImplementedError(f"{type(self).__name__}.reshape")

    def forward(self, bottom, top):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, top, propagate_down, bottom):
        """Write bottom diffs where propagate_down[i]; accumulate param diffs."""
        raise NotImplementedError(f"{type(self).__name__}.backward")

    # -- exact resume (brewnet's addition; Caffe saves none of this) ------------
    def resume_state(self):
        """What the next forward depends on beyond the learnable blobs (data
        positions, random generators, carried hidden state), as a JSON-able
        dict; None for a stateless layer. Saved beside solver snapshots."""
        if self.rng_in_forward:
            return {"rng": self.rng.bit_generator.state}
        return None

    def restore_resume_state(self, state):
        """Put back what ``resume_state`` returned (in a freshly built net)."""
        if self.rng_in_forward and state and "rng" in state:
            set_rng_state(self.rng, state["rng"], self.name)

    def __repr__(self):
        return f"<{self.type} layer {self.name!r}>"


def set_rng_state(rng, state, name="?"):
    """Restore a numpy Generator from ``rng.bit_generator.state`` (as saved in JSON)."""
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        from brewnet.netdef import DefinitionError

        raise DefinitionError(f"layer {name!r}: cannot restore its random generator state ({exc})") from None
