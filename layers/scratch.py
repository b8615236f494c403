"""Reusable scratch arrays, by role, thread and shape.

Hot loops (a convolution's chunks, pooling planes) need the same temporaries every call;
allocating them fresh (and zeroing those that need it) each time would cost more than some
of the work they hold.
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
