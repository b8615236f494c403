"""Summing the learnable gradients of the ranks once per iteration.

``FlatGradients`` packs the diffs of a net's learnable blobs into one
contiguous buffer per (device, dtype) and hands each blob a view of it as its
diff, so the backward pass writes straight into the message and no copy is
needed before or after the reduction. A layer that replaces a diff array
(rather than writing into it) is copied in once and given its view back.

Two reducers sum the buffers over the ranks and scale them by 1/N:

- ``HostReducer``: MPI's Allreduce on host memory (device buffers go to the
  host and back, one copy each way);
- ``NcclReducer``: NCCL's in-place allReduce on the device buffer on the
  current stream (no host synchronization).

The signal requests of the ranks are not in these buffers: ``agree_requests``
takes the maximum of each rank's running count in a tiny host Allreduce, so
a signal that reaches the ranks an iteration apart acts once.

``choose_path`` decides which, from what every rank says of itself (gathered
by ``select_reducer``), so all ranks take the same path.
"""

import logging
import os
import socket

import numpy

log = logging.getLogger("brewnet.solver")


def _module_of(array):
    return type(array).__module__.split(".")[0]


def _address(array):
    return array.data.ptr if hasattr(array.data, "ptr") else array.__array_interface__["data"][0]


def _same_memory(a, b):
    """a is b, or another array object over the same elements (an asarray that made a view)."""
    return a is b or (type(a) is type(b) and a.shape == b.shape and a.strides == b.strides
                      and _address(a) == _address(b))


class FlatGradients:
    """The diffs of ``blobs`` as views into one flat buffer per (array module, dtype)."""

    def __init__(self, blobs):
        self.blobs = list(blobs)
        order, members = [], {}
        for blob in self.blobs:
            key = (_module_of(blob.data), numpy.dtype(blob.dtype).str)
            if key not in members:
                order.append(key)
                members[key] = []
            members[key].append(blob)
        self.groups = []  # (buffer, count of gradient values, blobs)
        self.views = {}
        for key in order:
            group = members[key]
            xp = group[0].xp
            count = sum(int(b.count) for b in group)
            buffer = xp.zeros(count, dtype=group[0].dtype)
            offset = 0
            for blob in group:
                n = int(blob.count)
                view = buffer[offset:offset + n].reshape(blob.data.shape)
                view[...] = blob.diff  # keep whatever the diff held
                blob.diff = view  # the setter keeps this very array (same dtype, same device)
                self.views[id(blob)] = view
                offset += n
            self.groups.append((buffer, count, group))
        self.count = sum(count for _, count, _ in self.groups)
        self.nbytes = sum(count * buffer.itemsize for buffer, count, _ in self.groups)
        self.copies = 0  # diffs that had to be copied in (a layer replaced the array)

    def gather(self):
        """Make every buffer hold the current diffs: pending lazy zeros are written, and a
        diff array that is no longer the blob's view is copied in and the view put back."""
        for _, _, group in self.groups:
            for blob in group:
                view = self.views[id(blob)]
                diff = blob.diff  # writes a pending lazy clear into the view
                if not _same_memory(diff, view):
                    view[...] = diff
                    blob.diff = view
                    self.copies += 1

    def scale(self, factor):
        for buffer, _, _ in self.groups:
            buffer *= buffer.dtype.type(factor)


class HostReducer:
    """MPI Allreduce (SUM) in host memory; device buffers are staged through the host."""

    name = "host"

    def __init__(self, world):
        self.world = world
        self._staging = {}

    def allreduce(self, flat):
        """Sum ``flat``'s gradients over the ranks and scale them by 1/N, in place."""
        world = self.world
        if world.size == 1:
            return
        for index, (buffer, _, _) in enumerate(flat.groups):
            on_host = isinstance(buffer, numpy.ndarray)
            host = buffer if on_host else self._stage(index, buffer)
            world.comm.Allreduce(world.MPI.IN_PLACE, host, op=world.MPI.SUM)
            host *= host.dtype.type(1.0 / world.size)
            if not on_host:
                buffer.set(host)

    def _stage(self, index, buffer):
        host = self._staging.get(index)
        if host is None or host.shape != buffer.shape:
            host = self._staging[index] = numpy.empty(buffer.shape, buffer.dtype)
        buffer.get(out=host)
        return host


def _nccl_dtype(nccl, dtype):
    names = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "float16": "NCCL_FLOAT16"}
    code = getattr(nccl, names.get(numpy.dtype(dtype).name, ""), None)
    if code is None:
        raise TypeError(f"NCCL reduction of {numpy.dtype(dtype).name} gradients is not supported")
    return code


class NcclReducer:
    """NCCL allReduce in place on each device buffer, on the current stream (host buffers, if
    any, go through MPI)."""

    name = "nccl"

    def __init__(self, world, nccl=None):
        if nccl is None:
            from cupy.cuda import nccl
        self.world, self.nccl = world, nccl
        unique_id = nccl.get_unique_id() if world.root else None
        unique_id = world.comm.bcast(unique_id, root=0)
        self.comm = nccl.NcclCommunicator(world.size, unique_id, world.rank)
        self._host = HostReducer(world)

    def allreduce(self, flat):
        import cupy

        world, nccl = self.world, self.nccl
        stream = cupy.cuda.get_current_stream().ptr
        for buffer, count, _ in flat.groups:
            if isinstance(buffer, numpy.ndarray):
                world.comm.Allreduce(world.MPI.IN_PLACE, buffer, op=world.MPI.SUM)
            else:
                self.comm.allReduce(buffer.data.ptr, buffer.data.ptr, count, _nccl_dtype(nccl, buffer.dtype),
                                    nccl.NCCL_SUM, stream)
            buffer *= buffer.dtype.type(1.0 / world.size)  # on a device: queued on the same stream


def agree_requests(world, counts):
    """The element-wise maximum over the ranks of ``counts`` (each rank's running count of
    snapshot and stop requests), in one small host Allreduce."""
    counts = numpy.array(counts, dtype=numpy.int64)  # a copy: the caller's counts stay its own
    if world.size > 1:
        world.comm.Allreduce(world.MPI.IN_PLACE, counts, op=world.MPI.MAX)
    return counts


# -- choosing the path, the same on every rank ---------------------------------------------

def nccl_problem():
    """Why this process cannot use NCCL (a short reason), or None when it can."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # ImportError, or cupy's own errors when CUDA libraries are missing
        return f"cupy.cuda.nccl cannot be imported ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        return "cupy was built without NCCL (pip install nvidia-nccl-cu12, or cupy's NCCL wheel)"
    return None


def describe_rank(device_key, environ=None):
    """What this rank says of itself: (host, device key or None for CPU, NCCL forced off,
    why NCCL is unusable here or None). Probing NCCL only happens on GPU ranks."""
    environ = os.environ if environ is None else environ
    forced_off = environ.get("BREWNET_NCCL", "").strip() == "0"
    problem = nccl_problem() if device_key is not None and not forced_off else None
    return (socket.gethostname(), device_key, forced_off, problem)


def choose_path(entries):
    """('nccl' or 'host', reason) from every rank's ``describe_rank`` (index = rank).
    NCCL needs several ranks, each on a GPU of its own (distinct devices on each host),
    NCCL usable everywhere, and no rank with BREWNET_NCCL=0."""
    if len(entries) < 2:
        return "host", "one rank: nothing to reduce"
    if any(forced for _, _, forced, _ in entries):
        return "host", "BREWNET_NCCL=0"
    cpu = [rank for rank, (_, key, _, _) in enumerate(entries) if key is None]
    if len(cpu) == len(entries):
        return "host", "CPU ranks"
    if cpu:
        return "host", f"rank {cpu[0]} is on the CPU"
    seen = {}
    for rank, (host, key, _, _) in enumerate(entries):
        if (host, key) in seen:
            return "host", f"ranks {seen[(host, key)]} and {rank} share GPU {key} on {host}"
        seen[(host, key)] = rank
    broken = [(rank, problem) for rank, (_, _, _, problem) in enumerate(entries) if problem]
    if broken:
        rank, problem = broken[0]
        return "host", f"NCCL unusable on rank {rank}: {problem}"
    return "nccl", "every rank on a GPU of its own"


def device_key(array_module):
    """This process's device as NCCL would see it (its PCI bus id where cupy tells it, so
    CUDA_VISIBLE_DEVICES renumbering cannot hide two ranks on one GPU), None on the CPU."""
    if array_module is numpy:
        return None
    device = array_module.cuda.Device()
    try:
        return device.pci_bus_id
    except Exception:  # older cupy: the device number
        return str(device.id)


def select_reducer(world, array_module):
    """The reducer every rank of ``world`` agrees on; rank 0 logs the choice (and warns when
    NCCL was possible but could not be used)."""
    entries = world.comm.allgather(describe_rank(device_key(array_module)))
    path, reason = choose_path(entries)
    if world.root:
        if path == "host" and reason.startswith("NCCL unusable"):
            log.warning("Gradients through host MPI, not NCCL: %s", reason)
        else:
            log.info("Gradient reduction: %s (%s)", "NCCL" if path == "nccl" else "host MPI", reason)
    return NcclReducer(world) if path == "nccl" else HostReducer(world)
