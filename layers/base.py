"""The layer contract, after Caffe's Layer: setup once, reshape, forward, backward.

A layer works on lists of Blobs. It computes with ``self.xp`` (numpy or cupy)
and never branches on the device. Learnable parameters live in ``self.blobs``;
their diffs are *accumulated* by backward (the net zeroes them before each
iteration), while bottom diffs are *written* (overwritten), as in Caffe.
"""

import numpy

from brewnet.layers.blob import Blob, BlobVec
from brewnet.netdef.errors import DefinitionError


class LayerError(DefinitionError):
    """A layer's parameters or inputs that it cannot work with; the message names the layer."""


def layer_where(name, type_name=None):
    """How messages name a layer: ``layer 'conv1' (Convolution)``."""
    return f"layer {name!r} ({type_name})" if type_name else f"layer {name!r}"


def layer_error(name, type_name, message):
    """The LayerError of layer ``name`` of type ``type_name``: for code that holds no
    layer (loader threads, the Python layer's factory); layers use ``self.error``."""
    return LayerError(f"{layer_where(name, type_name)}: {message}")


class Layer:
    type = None  # set by @register

    # The blob-count contract, Caffe's ExactNumBottomBlobs ... EqualNumBottomTopBlobs:
    # declared here, checked by the Net (check_blob_counts) before setup. None means
    # "no constraint". Counts that depend on the layer's parameters (Pooling, RNN, LSTM)
    # are set per instance in __init__; the class then holds the loosest bounds.
    exact_bottoms = None
    min_bottoms = None
    max_bottoms = None
    exact_tops = None
    min_tops = None
    max_tops = None
    equal_bottom_top = False  # one top per bottom (Convolution)
    # Caffe's AutoTopBlobs: the Net adds anonymous tops up to max(min_tops, exact_tops)
    # when the prototxt names fewer (a loss layer written without a top)
    auto_top_blobs = False
    # loss layers get loss_weight 1 on their first top unless the prototxt says otherwise
    is_loss = False
    # False where Caffe's backward is NOT_IMPLEMENTED (Accuracy, ArgMax, Threshold) or there
    # is nothing to differentiate (data sources): asking such a layer for a bottom gradient
    # is an error. True layers override backward and have a gradient check in the tests.
    has_backward = True
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
        # learnable Blobs, Caffe's order (a list; a Python layer may call self.blobs.add_blob(*shape))
        self.blobs = BlobVec(xp=xp, dtype=dtype, prefix=self.name)
        # set by the Net: False where lr_mult is 0 (skip that param's gradient)
        self.param_propagate_down = []

    # -- helpers for subclasses -------------------------------------------
    def error(self, message):
        """The one error a layer raises for a user's mistake: ``raise self.error("...")``."""
        return layer_error(self.name, self.type, message)

    @property
    def where(self):
        """``layer 'name' (Type)``, the prefix of this layer's messages (for file readers' ``what``)."""
        return layer_where(self.name, self.type)

    def make_blob(self, shape):
        return Blob(shape, xp=self.xp, dtype=self.dtype, name=f"{self.name}/param{len(self.blobs)}")

    def param_needs_grad(self, index):
        flags = self.param_propagate_down
        return flags[index] if index < len(flags) else True

    @property
    def train(self):
        from brewnet.netdef import caffe_pb2

        return self.phase == caffe_pb2.TRAIN

    def blob_count_problem(self, n_bottom, n_top):
        """What is wrong with these blob counts under the declared contract, or None."""
        for n, exact, lo, hi, what in ((n_bottom, self.exact_bottoms, self.min_bottoms, self.max_bottoms, "bottom"),
                                       (n_top, self.exact_tops, self.min_tops, self.max_tops, "top")):
            if exact is not None and n != exact:
                return f"takes {exact} {what} blob(s), got {n}"
            if lo is not None and n < lo:
                return f"takes at least {lo} {what} blob(s), got {n}"
            if hi is not None and n > hi:
                return f"takes at most {hi} {what} blob(s), got {n}"
        if self.equal_bottom_top and n_bottom != n_top:
            return f"produces one top blob per bottom blob, got {n_bottom} bottom(s) and {n_top} top(s)"
        return None

    def tops_with_auto(self, n_top):
        """How many tops the layer ends up with: Caffe's AutoTopBlobs adds anonymous ones up to
        the exact or minimum count."""
        if not self.auto_top_blobs:
            return n_top
        return max(n_top, self.min_tops or 0, self.exact_tops or 0)

    def check_blob_counts(self, n_bottom, n_top):
        """Caffe's CheckBlobCounts; the Net calls it once, after adding automatic tops."""
        problem = self.blob_count_problem(n_bottom, n_top)
        if problem:
            raise self.error(problem)

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
        if self.has_backward:
            raise NotImplementedError(f"{type(self).__name__}.backward")
        asked = [i for i, down in enumerate(propagate_down) if down]
        if asked:
            # Caffe aborts here (NOT_IMPLEMENTED); the net routes a loss gradient through this layer
            raise self.error(f"has no gradient (as in Caffe), but the net asks one for bottom(s) {asked}; "
                             "keep it off the path to a loss")

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
            set_rng_state(self.rng, state["rng"], self.name, self.type)

    def __repr__(self):
        return f"<{self.type} layer {self.name!r}>"


def set_rng_state(rng, state, name="?", type_name=None):
    """Restore a numpy Generator from ``rng.bit_generator.state`` (as saved in JSON)."""
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise layer_error(name, type_name, f"cannot restore its random generator state ({exc})") from None
