"""Reusable scratch arrays.

Hot loops (a convolution's chunks) need the same temporaries every call; allocating them
fresh (and zeroing those that need it) each time would cost more than some of the work they
hold. ``Scratch``: one object's buffers, by role, thread and shape. ``WORKSPACE``: buffers
shared by every layer of every net, by role and thread, for the big temporaries.
"""

import numpy


class Scratch:
    def __init__(self, xp):
        self.xp = xp
        self._bufs = {}

    def get(self, role, shape, dtype, worker=0, zero=False):
        """The buffer for (role, thread ``worker``, shape, dtype). ``zero``: zero-filled when
        made, for callers that write only its inside and rely on the border staying 0."""
        key = (role, worker, tuple(shape), numpy.dtype(dtype).str)
        buf = self._bufs.get(key)
        if buf is None:
            stale = [k for k in self._bufs if k[:2] == (role, worker)]
            if len(stale) >= 2:  # a batch in chunks needs two sizes; more means the batch changed
                for k in stale:
                    del self._bufs[k]
            buf = self._bufs[key] = (self.xp.zeros if zero else self.xp.empty)(shape, dtype=dtype)
        return buf


class Workspace:
    """Buffers shared by every (de)convolution: one per role, dtype, device and CPU thread.

    A net's layers run one at a time, so they can take turns with one buffer per role (Caffe
    keeps one per layer); this keeps CaffeNet's five column matrices (about 180 MB) down to the
    largest one. Whoever wrote a buffer last holds a token; a layer whose columns are still
    there at backward time (the last convolution before the fully connected part) reuses them,
    the others rebuild theirs (an im2col copy costs far less than its GEMMs).
    """

    def __init__(self):
        self._bufs = {}
        self._owner = {}

    @staticmethod
    def _key(xp, dtype, worker, role):
        cuda = getattr(xp, "cuda", None)  # one buffer per GPU under cupy
        # and one per CPU thread (layers/parallel.py): threads fill their own buffers at once
        return role, xp.__name__, numpy.dtype(dtype).str, cuda.Device().id if cuda is not None else None, worker

    def reserve(self, xp, dtype, size, worker=0, role="columns"):
        """Grow the buffer to ``size`` elements now (at reshape), so forward never reallocates."""
        key = self._key(xp, dtype, worker, role)
        buf = self._bufs.get(key)
        if buf is None or buf.size < size:
            self._bufs[key] = None  # drop the old buffer before allocating the new one
            self._bufs[key] = xp.empty(int(size), dtype=dtype)
            self._owner[key] = None

    def take(self, xp, dtype, shape, owner, worker=0, role="columns"):
        """A view of thread ``worker``'s ``role`` buffer with ``shape``, now owned by ``owner``."""
        size = int(numpy.prod(shape, dtype=numpy.int64))
        self.reserve(xp, dtype, size, worker, role)
        key = self._key(xp, dtype, worker, role)
        self._owner[key] = owner
        return self._bufs[key][:size].reshape(shape)

    def holds(self, xp, dtype, owner, worker=0, role="columns"):
        return owner is not None and self._owner.get(self._key(xp, dtype, worker, role)) is owner


WORKSPACE = Workspace()
