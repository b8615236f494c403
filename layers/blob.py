"""Blob: a named array pair (data and diff) like Caffe's Blob."""

import os

import numpy

from brewnet.layers.kernels import backend
from brewnet.netdef.errors import DefinitionError

_CHECK_ABOVE = 256 << 20  # smaller arrays are allocated without asking the system first


class BlobTooLargeError(DefinitionError):
    """A blob that would need more memory than the machine (or GPU) has."""


def available_host_memory():
    """Bytes the host can still give (MemAvailable), or its physical memory where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes):
    return f"{nbytes / (1 << 30):.1f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.0f} MiB"


def zeros(xp, shape, dtype, name=None, empty=False):
    """A new array for a blob; one too large for the machine is a one-line error giving the
    figure, before the system is asked for it (an input dim of 2147483647, say)."""
    nbytes = int(numpy.prod(shape, dtype=numpy.float64)) * numpy.dtype(dtype).itemsize
    what = f"blob {name!r} of shape {tuple(shape)}" if name else f"a blob of shape {tuple(shape)}"
    if nbytes > _CHECK_ABOVE and xp is numpy:
        free = available_host_memory()
        if free is not None and nbytes > free:
            raise BlobTooLargeError(f"{what} needs {_gib(nbytes)}, more than the {_gib(free)} of memory available")
    try:
        return xp.empty(shape, dtype=dtype) if empty else xp.zeros(shape, dtype=dtype)
    except (MemoryError, ValueError) as exc:  # cupy's OutOfMemoryError is a MemoryError; ValueError: too big
        raise BlobTooLargeError(f"{what} needs {_gib(nbytes)}, which could not be allocated "
                                f"({type(exc).__name__})") from None


class Blob:
    """Holds ``data`` and ``diff`` on one device, float32 unless told otherwise.

    ``reshape`` keeps the existing arrays when the element count is unchanged
    (a view with the new shape), so steady-state training allocates nothing.
    """

    def __init__(self, shape=(), xp=None, dtype=numpy.float32, name=None):
        self.xp = xp if xp is not None else backend.get_array_module()
        self.dtype = numpy.dtype(dtype)
        self.name = name
        shape = tuple(int(d) for d in shape)
        self.data = zeros(self.xp, shape, self.dtype, name)
        self._diff = None
        self._diff_zero_pending = False

    # diff is allocated on first use: data-only blobs (test nets, inputs) never pay for it
    @property
    def diff(self):
        if self._diff is None or self._diff.shape != self.data.shape:
            self._diff = zeros(self.xp, self.data.shape, self.dtype, self.name)
        elif self._diff_zero_pending:
            self._diff.fill(0)
        self._diff_zero_pending = False
        return self._diff

    @diff.setter
    def diff(self, value):
        self._set_array("_diff", value)
        self._diff_zero_pending = False

    # Clearing a parameter's diff (every iteration) and then adding its gradient to it reads and
    # writes the diff twice; CaffeNet's fully connected weights are 224 MB. So clearing is lazy,
    # and a layer computing a whole gradient can write it where the diff would be zeros.
    def clear_diff(self, lazy=True):
        """diff = 0 (Caffe's ClearParamDiffs for one blob): written when the diff is next read,
        or at once with ``lazy=False`` (an array taken from ``.diff`` earlier then reads zeros)."""
        if self._diff is not None:
            if lazy:
                self._diff_zero_pending = True
            else:
                self._diff.fill(0)
                self._diff_zero_pending = False
        return self

    def diff_to_overwrite(self):
        """(diff, zero): zero is True when the diff holds zeros that the caller may overwrite
        instead of adding to; the caller must then write every element."""
        unallocated = self._diff is None or self._diff.shape != self.data.shape
        if unallocated:
            self._diff = zeros(self.xp, self.data.shape, self.dtype, self.name, empty=True)
        zero = unallocated or self._diff_zero_pending
        self._diff_zero_pending = False
        return self._diff, zero

    def add_to_diff(self, value):
        """diff += value, written straight in where the diff is zeros."""
        diff, zero = self.diff_to_overwrite()
        if zero:
            diff[...] = value
        else:
            diff += value

    def _set_array(self, attr, value):
        if self.xp is numpy:
            value = backend.to_numpy(value)  # a cupy array given to a CPU blob comes to the host
        value = self.xp.asarray(value, dtype=self.dtype)
        if value.shape != self.data.shape:
            raise ValueError(f"blob {self.name or ''} has shape {self.shape}, got an array of shape {value.shape}")
        setattr(self, attr, value)

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def count(self):
        return int(self.data.size)

    @property
    def num_axes(self):
        return self.data.ndim

    # Caffe's legacy 4-D accessors (pycaffe's Blob.num/channels/height/width): axes past
    # the blob's last count as 1; a blob of more than 4 axes has none of them
    def _legacy_dim(self, index):
        if self.data.ndim > 4:
            raise ValueError(f"blob {self.name or ''} of shape {self.shape} has more than 4 axes: "
                             "num/channels/height/width are undefined (use .shape)")
        return int(self.data.shape[index]) if index < self.data.ndim else 1

    @property
    def num(self):
        return self._legacy_dim(0)

    @property
    def channels(self):
        return self._legacy_dim(1)

    @property
    def height(self):
        return self._legacy_dim(2)

    @property
    def width(self):
        return self._legacy_dim(3)

    def shape_at(self, axis):
        return self.data.shape[self.canonical_axis(axis)]

    def canonical_axis(self, axis):
        n = self.data.ndim
        if not -n <= axis < max(n, 1):
            raise ValueError(f"axis {axis} out of range for a {n}-axis blob {self.shape}")
        return axis + n if axis < 0 else axis

    def count_range(self, start, end=None):
        dims = self.data.shape[start:end]
        return int(numpy.prod(dims, dtype=numpy.int64)) if dims else 1

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in blob shape {shape}")
        if shape == self.data.shape:
            return
        size = int(numpy.prod(shape, dtype=numpy.int64)) if shape else 1
        if size == self.data.size:
            self.data = self.data.reshape(shape)
            if self._diff is not None:
                self._diff = self._diff.reshape(shape)
        else:
            self.data = zeros(self.xp, shape, self.dtype, self.name)
            self._diff = None
            self._diff_zero_pending = False

    def reshape_like(self, other):
        self.reshape(other.shape)

    def share_data(self, other):
        """Use another blob's data array (Caffe's ShareData)."""
        self.data = other.data

    def to(self, xp):
        """Move data and diff to another array module (numpy <-> cupy)."""
        if xp is self.xp:
            return self
        self.data = xp.asarray(backend.to_numpy(self.data)) if xp is numpy else xp.asarray(self.data)
        if self._diff is not None:
            self._diff = xp.asarray(backend.to_numpy(self._diff)) if xp is numpy else xp.asarray(self._diff)
        self.xp = xp
        return self

    def __repr__(self):
        return f"Blob({self.name or ''} {self.shape})"


class BlobVec(list):
    """A layer's learnable blobs: a list with pycaffe's ``add_blob(*shape)``, which appends
    a zero-filled Blob on the layer's device (what a Python layer's setup calls)."""

    def __init__(self, blobs=(), xp=None, dtype=numpy.float32, prefix=None):
        super().__init__(blobs)
        self.xp = xp
        self.dtype = numpy.dtype(dtype)
        self.prefix = prefix

    def add_blob(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        name = f"{self.prefix}/param{len(self)}" if self.prefix else None
        self.append(Blob(shape, xp=self.xp, dtype=self.dtype, name=name))
        return self[-1]
