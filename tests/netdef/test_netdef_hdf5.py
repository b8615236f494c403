"""Caffe's HDF5 layouts for weights (Net::ToHDF5) and solver state."""

import os

import h5py
import numpy
import pytest

from brewnet import netdef
from brewnet.netdef import DefinitionError, caffe_pb2


def _net(with_diff=False):
    rng = numpy.random.default_rng(0)
    net = caffe_pb2.NetParameter(name="n")
    for name, shapes in (("conv1", [(2, 1, 3, 3), (2,)]), ("relu1", []), ("inception/1x1", [(4, 2)])):
        layer = net.layer.add(name=name, type="Convolution")
        for shape in shapes:
            data = rng.standard_normal(shape).astype(numpy.float32)
            diff = rng.standard_normal(shape).astype(numpy.float32) if with_diff else None
            layer.blobs.append(netdef.array_to_blob(data, diff))
    return net


def _arrays(net, diff=False):
    return {layer.name: [netdef.blob_to_array(b, diff=diff) for b in layer.blobs] for layer in net.layer}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name]), name
        for x, y in zip(a[name], b[name]):
            numpy.testing.assert_array_equal(x, y)


def test_weights_layout_is_caffes(tmp_path):
    path = tmp_path / "w.caffemodel.h5"
    netdef.write_weights(_net(), path)
    with h5py.File(path, "r") as h5:
        assert list(h5) == ["data"]  # no diff group without diffs
        assert h5["data/conv1/0"].shape == (2, 1, 3, 3) and h5["data/conv1/0"].dtype == numpy.float32
        assert sorted(h5["data/conv1"]) == ["0", "1"]
        assert len(h5["data/relu1"]) == 0


def test_weights_round_trip_with_diffs_and_slashed_names(tmp_path):
    net = _net(with_diff=True)
    path = tmp_path / "w.h5"
    netdef.write_weights(net, path)
    with h5py.File(path, "r") as h5:
        assert sorted(h5) == ["data", "diff"]
    back = netdef.read_weights(path)
    assert sorted(layer.name for layer in back.layer) == ["conv1", "inception/1x1", "relu1"]
    _assert_same(_arrays(back), _arrays(net))
    _assert_same(_arrays(back, diff=True), _arrays(net, diff=True))


def test_hdf5_is_found_by_signature_not_extension(tmp_path):
    netdef.write_weights(_net(), tmp_path / "w.h5")
    os.rename(tmp_path / "w.h5", tmp_path / "w.caffemodel")
    _assert_same(_arrays(netdef.read_weights(tmp_path / "w.caffemodel")), _arrays(_net()))


def test_skipped_shared_param_leaves_an_empty_blob(tmp_path):
    path = tmp_path / "gap.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data/ip/0", data=numpy.ones((2, 2), numpy.float32))
        h5.create_dataset("data/ip/2", data=numpy.ones(3, numpy.float32))
    layer = netdef.read_weights(path).layer[0]
    assert len(layer.blobs) == 3 and layer.blobs[1] == caffe_pb2.BlobProto()


def test_hdf5_without_data_group_is_a_definition_error(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("label", data=numpy.zeros(3))
    with pytest.raises(DefinitionError, match="no 'data' group"):
        netdef.read_weights(path)


def test_duplicate_layer_names_cannot_be_written_and_target_survives(tmp_path):
    net = caffe_pb2.NetParameter()
    net.layer.add(name="a")
    net.layer.add(name="a")
    path = tmp_path / "w.h5"
    path.write_bytes(b"old")
    with pytest.raises(DefinitionError, match="two layers are named 'a'"):
        netdef.write_weights(net, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["w.h5"]


def test_solverstate_layout_is_caffes(tmp_path):
    state = caffe_pb2.SolverState(iter=40, learned_net="snap_iter_40.caffemodel.h5", current_step=2)
    state.history.append(netdef.array_to_blob(numpy.arange(6, dtype=numpy.float32).reshape(2, 3)))
    state.history.append(netdef.array_to_blob(numpy.zeros(2, numpy.float32)))
    path = tmp_path / "s.solverstate.h5"
    netdef.write_solverstate(state, path)
    with h5py.File(path, "r") as h5:
        assert sorted(h5) == ["current_step", "history", "iter", "learned_net"]
        assert h5["iter"].shape == (1,) and h5["iter"][0] == 40 and h5["iter"].dtype == numpy.int32
        assert h5["learned_net"][()].rstrip(b"\0") == b"snap_iter_40.caffemodel.h5"
        assert sorted(h5["history"]) == ["0", "1"]
    assert netdef.read_solverstate(path) == state


def test_solverstate_h5_missing_fields_is_a_definition_error(tmp_path):
    path = tmp_path / "bad.solverstate.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("iter", data=numpy.array([1], numpy.int32))
    with pytest.raises(DefinitionError, match="no 'current_step'"):
        netdef.read_solverstate(path)
