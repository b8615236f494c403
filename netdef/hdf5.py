"""Caffe's HDF5 files: weights (Net::ToHDF5) and solver state (SnapshotSolverStateToHDF5).

Weights: group ``data`` (and ``diff`` when diffs were saved) with one subgroup per
layer name holding datasets "0", "1", ... (the layer's blobs, in order).
Solver state: ``iter`` and ``current_step`` (int, shape (1,)), ``learned_net``
(string), and group ``history`` with datasets "0", "1", ...
h5py is imported on first use so `import netdef` stays light.
"""

import numpy

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError
from brewnet.netdef.io import array_to_blob, atomic_write, blob_shape, blob_to_array


def _h5py():
    import h5py

    return h5py


def _open(path):
    """Open an HDF5 file for reading; failures are DefinitionErrors naming it."""
    try:
        return _h5py().File(path, "r")
    except FileNotFoundError:
        raise DefinitionError("no such file", path) from None
    except OSError as exc:
        raise DefinitionError(f"not a readable HDF5 file ({exc})", path) from None


# what h5py raises on a damaged file, depending on where the damage is
_DAMAGE = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError, UnicodeDecodeError)


def _read_hdf5(path, read):
    """``read(open file)``, with a damaged file's low-level errors as one DefinitionError."""
    try:
        with _open(path) as handle:
            return read(handle)
    except DefinitionError:
        raise
    except _DAMAGE as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DefinitionError(f"damaged HDF5 file ({reason})", path) from None


# -- weights -----------------------------------------------------------------------

def _indexed_datasets(group):
    """{index: dataset} for the datasets named "0", "1", ... in ``group``."""
    h5py = _h5py()
    return {int(name): item for name, item in group.items()
            if isinstance(item, h5py.Dataset) and name.isdigit()}


def _layer_groups(group, prefix=""):
    """(layer name, group) pairs; layer names holding "/" come back from nested groups."""
    h5py = _h5py()
    subgroups = [(name, item) for name, item in group.items() if isinstance(item, h5py.Group)]
    if prefix and (_indexed_datasets(group) or not subgroups):
        yield prefix, group
    for name, item in subgroups:
        yield from _layer_groups(item, f"{prefix}/{name}" if prefix else name)


def _blobs_from_group(group, diff_group=None):
    """BlobProtos from datasets "0".."n-1"; a gap (a shared param Caffe skipped) stays empty."""
    datasets = _indexed_datasets(group)
    diffs = _indexed_datasets(diff_group) if diff_group is not None else {}
    blobs = []
    for index in range(max(datasets, default=-1) + 1):
        if index not in datasets:
            blobs.append(caffe_pb2.BlobProto())
            continue
        data = datasets[index][()]
        diff = diffs[index][()] if index in diffs else None
        blobs.append(array_to_blob(data, diff, double=data.dtype == numpy.float64))
    return blobs


def read_weights_hdf5(path):
    """A NetParameter whose layers carry only a name and blobs (as Caffe reads them)."""
    def read(handle):
        if "data" not in handle or not isinstance(handle["data"], _h5py().Group):
            raise DefinitionError("HDF5 file has no 'data' group; not a Caffe .caffemodel.h5", path)
        diff_root = handle.get("diff")
        net = caffe_pb2.NetParameter()
        for name, group in _layer_groups(handle["data"]):
            diff_group = diff_root.get(name) if isinstance(diff_root, _h5py().Group) else None
            layer = net.layer.add(name=name)
            layer.blobs.extend(_blobs_from_group(group, diff_group if isinstance(diff_group, _h5py().Group) else None))
        return net

    return _read_hdf5(path, read)


def _blob_dtype(blob):
    return numpy.float64 if len(blob.double_data) else numpy.float32


def _write_layer(data_root, diff_root, layer):
    """One layer's group under ``data`` (and ``diff``), datasets named by blob index."""
    if layer.name in data_root:
        raise DefinitionError(f"two layers are named {layer.name!r}; HDF5 weights need unique names")
    data_group = data_root.create_group(layer.name)
    diff_group = diff_root.create_group(layer.name) if diff_root is not None else None
    for index, blob in enumerate(layer.blobs):
        dtype = _blob_dtype(blob)
        data_group.create_dataset(str(index), data=blob_to_array(blob, dtype))
        if diff_group is not None:
            has_diff = len(blob.diff) or len(blob.double_diff)
            diff = blob_to_array(blob, dtype, diff=True) if has_diff else numpy.zeros(blob_shape(blob), dtype)
            diff_group.create_dataset(str(index), data=diff)


def _has_diffs(net):
    return any(len(b.diff) or len(b.double_diff) for layer in net.layer for b in layer.blobs)


def write_weights_hdf5(net, path):
    """Write ``net``'s layers and blobs in Net::ToHDF5's layout; a ``diff`` group when blobs carry diffs."""
    if len(net.layers):  # V1 messages: write the upgraded form
        from brewnet.netdef.upgrade import upgrade_net

        upgraded = caffe_pb2.NetParameter()
        upgraded.CopyFrom(net)
        upgrade_net(upgraded, str(path))
        net = upgraded
    with atomic_write(path, "w+b") as handle:
        with _h5py().File(handle, "w") as h5:
            data_root = h5.create_group("data")
            diff_root = h5.create_group("diff") if _has_diffs(net) else None
            for layer in net.layer:
                _write_layer(data_root, diff_root, layer)


# -- solver state ----------------------------------------------------------------------

def _read_int(handle, name, path):
    if name not in handle:
        raise DefinitionError(f"HDF5 solver state has no {name!r} dataset", path)
    return int(numpy.asarray(handle[name][()]).reshape(-1)[0])


def _read_string(handle, name):
    value = handle[name][()]
    if isinstance(value, numpy.ndarray):
        value = value.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_solverstate_hdf5(path):
    """A SolverState from Caffe's .solverstate.h5 layout."""
    def read(handle):
        state = caffe_pb2.SolverState(iter=_read_int(handle, "iter", path))
        if "learned_net" in handle:
            state.learned_net = _read_string(handle, "learned_net")
        state.current_step = _read_int(handle, "current_step", path)
        if "history" not in handle or not isinstance(handle["history"], _h5py().Group):
            raise DefinitionError("HDF5 solver state has no 'history' group", path)
        state.history.extend(_blobs_from_group(handle["history"]))
        return state

    return _read_hdf5(path, read)


def write_solverstate_hdf5(state, path):
    """Write a SolverState in Caffe's .solverstate.h5 layout, atomically."""
    with atomic_write(path, "w+b") as handle:
        with _h5py().File(handle, "w") as h5:
            h5.create_dataset("iter", data=numpy.array([state.iter], dtype=numpy.int32))
            # NUL-terminated like H5LTmake_dataset_string, so Caffe's reader finds the end
            name = state.learned_net.encode("utf-8") + b"\0"
            h5.create_dataset("learned_net", data=numpy.array(name, dtype=f"S{len(name)}"))
            h5.create_dataset("current_step", data=numpy.array([state.current_step], dtype=numpy.int32))
            history = h5.create_group("history")
            for index, blob in enumerate(state.history):
                history.create_dataset(str(index), data=blob_to_array(blob, _blob_dtype(blob)))
